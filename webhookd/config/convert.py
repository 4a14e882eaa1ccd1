"""Key-by-key conversion of loaded YAML data into the schema's Structs, collecting every problem.

msgspec stops at the first error, and CONTRACT §2 wants every problem: so each present key is converted on
its own (and each item of a list), following the field's annotations (`units`), and every problem is kept
as ``key.path: message``. A key whose value is invalid is left out (the field keeps its default), so the
remaining checks still run; follow-up problems under a reported key path are suppressed. ``${VAR}`` is
substituted first; a value from the environment is converted leniently (``"3"`` is an integer) and never
shown in a message.
"""

import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, TypeVar

import msgspec
from msgspec import Meta

from .units import NOT_IN_FILE, OR_NULL, At, Check, FileDefault, Many, Read

S = TypeVar("S", bound=msgspec.Struct)
_MISSING: Any = object()
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_MSGSPEC_ERR = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_BOUNDS = {"gt": "greater than", "ge": ">=", "lt": "less than", "le": "<="}


def _type_word(name: str) -> str:
    return " or ".join(_TYPE_WORDS.get(p.strip(), p.strip()) for p in name.split("|"))


def kind(v: object) -> str:
    """What a YAML value is, for a message (``a string``, ``a list``...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def key_path(path: str, key: object) -> str:
    text = str(key)
    if not text or len(text) > 100 or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        # A key path is one line of a problem list: a key with a newline (or an empty or huge one) is quoted.
        text = repr(text) if len(text) <= 100 else repr(text[:97]) + "..."
    return f"{path}.{text}" if path else text


# ----------------------------------------------------------------------------------------------------
# What a field's annotations say
# ----------------------------------------------------------------------------------------------------


class Spec(NamedTuple):
    base: Any  # the type without its annotations
    metas: tuple[Meta, ...]
    read: Read | None
    checks: tuple[Check, ...]
    many: Many | None
    or_null: bool
    file_default: object
    in_file: bool


@functools.cache
def spec(tp: Any) -> Spec:
    base: Any = tp
    extras: tuple[Any, ...] = ()
    if typing.get_origin(tp) is Annotated:
        base, *rest = typing.get_args(tp)
        extras = tuple(rest)

    def one(cls: type) -> Any:
        return next((x for x in extras if isinstance(x, cls)), None)

    fd, read = one(FileDefault), one(Read)
    section = _is_struct(base) and read is None  # absent or null: all its defaults
    return Spec(
        base=base,
        metas=tuple(x for x in extras if isinstance(x, Meta)),
        read=read,
        checks=tuple(x for x in extras if isinstance(x, Check)),
        many=one(Many),
        or_null=section or any(x is OR_NULL for x in extras),
        file_default={} if section else _MISSING if fd is None else fd.value,
        in_file=all(x is not NOT_IN_FILE for x in extras),
    )


class _Field(NamedTuple):
    key: str  # as the file spells it
    attr: str
    tp: Any
    required: bool
    spec: Spec


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in msgspec.structs.fields(cls):
        sp = spec(hints[f.name])
        if sp.in_file:
            out.append(_Field(f.encode_name, f.name, hints[f.name], f.required, sp))
    return tuple(out)


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _optional(tp: Any) -> Any:
    """X for ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and len(args) == 2:
            return next(a for a in args if a is not type(None))
    return None


@functools.cache
def _annotated(tp: Any, metas: tuple[Meta, ...]) -> Any:
    """The same type object each time: msgspec caches what it learns about a type on it."""
    return Annotated[(tp, *metas)] if metas else tp


class Converter:
    def __init__(self, base_dir: Path, env: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.env = env
        self.problems: list[str] = []
        self.paths: list[str] = []  # the key path of each problem (for its line in the file)
        self.from_env: set[str] = set()  # key paths whose string had a ${VAR} substituted
        self.failed: set[str] = set()  # key paths already reported: no follow-up problems below them

    # -- problems -------------------------------------------------------------------------------------------

    def add(self, path: str, message: str) -> None:
        if self.bad(path):
            return
        self.problems.append(f"{path or 'config'}: {message}")
        self.paths.append(path)
        self.failed.add(path)

    def bad(self, path: str) -> bool:
        """Was a problem already reported at `path` (or above it)?"""
        return any(path == f or path.startswith((f + ".", f + "[")) for f in self.failed)

    def at(self, path: str) -> At:
        return At(self.base_dir, path in self.from_env)

    def read_text(self, path: str, p: Path) -> str | None:
        """The UTF-8 text of the file `p` named at `path`, or None with the problem reported there."""
        try:
            return p.read_text(encoding="utf-8")
        except FileNotFoundError:
            self.add(path, f"file not found: {p}")
        except UnicodeDecodeError:
            self.add(path, f"not a UTF-8 text file: {p}")
        except OSError as e:
            self.add(path, f"cannot read {p}: {e.strerror or e.__class__.__name__}")
        return None

    # -- ${VAR} ---------------------------------------------------------------------------------------------

    def substitute(self, node: object, path: str) -> object:
        if isinstance(node, str):
            return self._subst_str(node, path)
        if isinstance(node, list):
            return [self.substitute(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: self.substitute(v, key_path(path, k)) for k, v in node.items()}
        return node

    def _subst_str(self, s: str, path: str) -> str:
        if "${" not in s:
            return s
        missing: list[str] = []
        bad = False

        def repl(m: re.Match[str]) -> str:
            nonlocal bad
            text = m.group(0)
            if text == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                bad = True
                return ""
            if name not in self.env:
                missing.append(name)
                return ""
            return self.env[name]

        out = _ENV_REF.sub(repl, s)
        self.from_env.add(path)
        if bad:
            self.add(path, "invalid ${...} reference (use ${NAME}; write $${ for a literal ${)")
        elif missing:
            names = ", ".join(dict.fromkeys(missing))
            plural = "s" if len(set(missing)) > 1 else ""
            self.add(path, f"environment variable{plural} {names} not set")
        return out

    # -- mappings -------------------------------------------------------------------------------------------

    def fields(
        self,
        value: object,
        cls: type[msgspec.Struct],
        path: str,
        *,
        custom: Mapping[str, Callable[[object, str, dict[str, Any]], object]] | None = None,
    ) -> dict[str, Any] | None:
        """The converted values of mapping `value` for `cls`, by attribute: keys that are absent or invalid are
        left out. `custom` converts some keys itself: (value, key path, the values before it) -> value."""
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping, got {kind(value)}")
            return None
        fields = _fields(cls)
        keys = [f.key for f in fields]
        for k in value:
            if not isinstance(k, str) or k not in keys:
                hint = ""
                if isinstance(k, str):
                    close = difflib.get_close_matches(k, keys, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.add(key_path(path, k), f"unknown key{hint}")
        out: dict[str, Any] = {}
        for f in fields:
            kpath = key_path(path, f.key)
            v = value.get(f.key, _MISSING)
            if v is None and f.spec.or_null:
                v = _MISSING
            if custom is not None and f.key in custom:
                if v is not _MISSING:
                    out[f.attr] = custom[f.key](v, kpath, out)
                continue
            if v is _MISSING:
                v = f.spec.file_default
            if v is _MISSING:
                if f.required:
                    self.add(kpath, "missing required key")
                continue
            ok, converted = self.value(v, f.tp, kpath, or_null=f.spec.or_null)
            if ok:
                out[f.attr] = converted
        return out

    def struct(self, value: object, cls: type[S], path: str) -> S | None:
        values = self.fields(value, cls, path)
        if values is None:
            return None
        try:
            return cls(**values)
        except TypeError:  # a required key is missing or invalid (reported)
            return None

    # -- values ---------------------------------------------------------------------------------------------

    def value(self, v: object, tp: Any, path: str, *, or_null: bool = False) -> tuple[bool, Any]:
        """(True, `v` converted to `tp`), or (False, None) with the problem reported (`or_null`: in a type
        problem, the file may also have null)."""
        s = spec(tp)
        if (inner := _optional(s.base)) is not None:
            return (True, None) if v is None else self.value(v, inner, path, or_null=True)
        if _is_struct(s.base) and s.read is None:
            obj = self.struct(v, s.base, path)
            return obj is not None, obj
        at = self.at(path)
        original = v
        if s.read is not None:
            ok, v = self._convert(v, s.read.file_type, path, at, v, or_null)
            if not ok:
                return False, None
            try:
                v = s.read.fn(v, at)
            except ValueError as e:
                self.add(path, str(e))
                return False, None
        if s.many is not None or typing.get_origin(s.base) in (tuple, list, frozenset):
            ok, v = self._collection(v, s, path, at)
        else:
            ok, v = self._convert(v, _annotated(s.base, s.metas), path, at, original, or_null)
        if not ok:
            return False, None
        for check in s.checks:
            try:
                v = check.fn(v, at)
            except ValueError as e:
                self.add(path, str(e))
                return False, None
        return True, v

    def _collection(self, v: object, s: Spec, path: str, at: At) -> tuple[bool, Any]:
        """A list (or with `Many`, a single string), item by item: every bad item is reported, the good ones
        are kept for later checks."""
        items: list[tuple[str, object]]
        if s.many is not None and isinstance(v, str) and s.many.one:
            items = [(path, v)]
        elif s.many is not None and isinstance(v, str):
            # Not one item: `tokens: abc` is a mistake for `tokens: [abc]` (the value is not shown: a token).
            self.add(path, f"expected {s.many.title}, got a string (write [...] even for one)")
            return False, None
        else:
            file_type = list[Any] | str if s.many is not None and s.many.one else list[Any]
            metas = (*s.metas, Meta(title=s.many.title)) if s.many is not None else s.metas
            ok, v = self._convert(v, _annotated(file_type, metas), path, at, v)
            if not ok or not isinstance(v, list):
                return False, None
            if not v and s.many is not None and s.many.empty is not None:
                self.add(path, s.many.empty)
                return False, None
            items = [(f"{path}[{i}]", x) for i, x in enumerate(v)]
        item_tp = s.many.item if s.many is not None and s.many.item is not None else typing.get_args(s.base)[0]
        good = []
        for ipath, x in items:
            ok, y = self.value(x, item_tp, ipath)
            if ok:
                good.append(y)
        return True, typing.get_origin(s.base)(good)

    def _convert(
        self, v: object, tp: Any, path: str, at: At, original: object, or_null: bool = False
    ) -> tuple[bool, Any]:
        try:
            return True, msgspec.convert(v, tp, strict=not at.from_env)
        except msgspec.ValidationError as e:
            self._problem(path, str(e), tp, v, original, at, or_null)
            return False, None

    def _problem(self, path: str, err: str, tp: Any, v: object, original: object, at: At, or_null: bool) -> None:
        """Translate a msgspec ValidationError (``... - at `$[1]```) into ``path[1]: message``."""
        m = _MSGSPEC_ERR.match(err)
        msg, sub = (m.group("msg"), m.group("path") or "") if m else (err, "")
        if sub.startswith("[...]"):  # a mapping key/value: msgspec does not name it
            sub = ""
        s = spec(tp)
        got = re.search(r"got `([^`]+)`", msg)
        if msg.startswith("Expected") and got:
            title = next((meta.title for meta in s.metas if meta.title), None) if not sub else None
            expected = re.match(r"Expected `([^`]+)`", msg)
            want = title or (_type_word(expected.group(1)) if expected else "another type")
            if or_null and not title:
                want += " or null"
            got_word = "a boolean" if got.group(1) == "bool" else _type_word(got.group(1))
            self.add(path + sub, f"expected {want}, got {got_word}")
        elif msg.startswith("Invalid enum value") and typing.get_origin(s.base) is Literal:
            shown = at.shown(original)
            choices = ", ".join(typing.get_args(s.base))
            self.add(path + sub, f"must be one of {choices}" + (f" (got{shown})" if shown else ""))
        else:
            self.add(path + sub, _constraint(msg, s.metas, v) or msg.replace("`", "'").rstrip(".").lower())


def _constraint(msg: str, metas: tuple[Meta, ...], v: object) -> str | None:
    """The problem for a failed `Meta` constraint, in the words of the schema."""

    def first(attr: str) -> Any:
        return next((getattr(m, attr) for m in metas if getattr(m, attr) is not None), None)

    if " matching regex " in msg:
        extra = next((m.extra for m in metas if m.pattern is not None), None) or {}
        return str(extra.get("message", "invalid value"))
    lo, hi = first("min_length"), first("max_length")
    if msg.startswith("Expected `str` of length"):
        n = len(v) if isinstance(v, str) else 0
        if lo is not None and hi is not None:
            return f"must be {lo}-{hi} characters (got {n})"
        if hi is not None:
            return f"must be at most {hi} characters (got {n})"
        return f"must be at least {lo} characters (got {n})"
    if " of length " in msg:
        n = lo if ">" in msg else hi
        return f"must have {'at least' if '>' in msg else 'at most'} {n} {'entry' if n == 1 else 'entries'}"
    for attr in ("gt", "ge") if ">" in msg else ("lt", "le"):
        bound = first(attr)
        if bound is not None:
            return f"must be {_BOUNDS[attr]} {bound}"
    return None
