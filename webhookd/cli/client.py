"""Reaching the daemon: the CLI's errors and exit codes, the admin socket named by the config, and the JSON
client of the admin API (HTTP over that unix socket, CONTRACT §8).

Imported by every command, so ``http.client``, ``socket`` and msgspec are imported only when a request is made.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

if TYPE_CHECKING:
    import argparse
    import socket
    from typing import TypeVar

    T = TypeVar("T")

DEFAULT_CONFIG = "/etc/webhookd/config.yaml"
DEFAULT_SOCKET = "./var/admin.sock"
DEFAULT_LIMIT = 100  # the daemon's page size for GET /v1/deliveries without ?limit=

EXIT_OK = 0
EXIT_FAILURE = 1  # bad config, API error, failed test delivery
EXIT_ERROR = 2  # usage error or unexpected error
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------------- errors


class CLIError(Exception):
    """A failure with a message for the operator (printed to stderr as is) and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class DaemonNotRunning(CLIError):
    def __init__(self, socket_path: Path | str) -> None:
        super().__init__(f"webhookd is not running (no admin socket at {socket_path})", EXIT_NOT_RUNNING)
        self.socket_path = socket_path


class AdminError(CLIError):
    """The admin API answered 4xx/5xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)
        self.status = status


class BadAnswer(CLIError):
    """A 2xx answer that is not the document the command expects (names the field, exit 1)."""

    def __init__(self, socket_path: Path | str, detail: str) -> None:
        super().__init__(f"bad answer from the daemon on {socket_path}: {detail}", EXIT_FAILURE)


class ConfigProblems(CLIError):
    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems) or ["invalid configuration"]
        super().__init__("\n".join(f"config error: {p}" for p in self.problems), EXIT_FAILURE)


# ---------------------------------------------------------------------------------------- config and socket


def config_path(args: argparse.Namespace) -> str:
    path = getattr(args, "config", None)
    if path:
        return str(path)
    return os.environ.get("WEBHOOKD_CONFIG") or DEFAULT_CONFIG


def load_config(path: str) -> Any:
    """The validated config at ``path``; ``ConfigProblems`` listing every problem otherwise."""
    from webhookd import config as config_mod

    try:
        return config_mod.load_config(path)
    except config_mod.ConfigError as e:
        raise ConfigProblems(e.problems) from e
    except OSError as e:
        raise ConfigProblems([f"{path}: {e.strerror or e}"]) from e


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _socket_from_yaml(path: str) -> Path | None:
    """``admin.socket`` read straight from the YAML, for when the whole config does not validate (a secret's
    ``${VAR}`` only set in the service's environment, or a bad edit that the running daemon refused on reload:
    the operator still needs to reach the daemon). ``None`` when even that is not possible."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None
    admin = data.get("admin")
    if admin is None:
        admin = {}
    if not isinstance(admin, dict):
        return None
    value = admin.get("socket", DEFAULT_SOCKET)
    if not isinstance(value, str) or not value:
        return None
    missing = [name for name in _ENV_REF.findall(value.replace("$${", "")) if name not in os.environ]
    if missing:
        return None
    value = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value.replace("$${", "\0")).replace("\0", "${")
    sock = Path(value).expanduser()
    if not sock.is_absolute():
        sock = Path(os.path.abspath(path)).parent / sock
    return Path(os.path.normpath(sock))


def admin_socket(path: str) -> Path:
    """The admin socket named by the config at ``path``."""
    try:
        cfg = load_config(path)
    except ConfigProblems:
        fallback = _socket_from_yaml(path)
        if fallback is None:
            raise
        return fallback
    return Path(cfg.admin.socket)


def admin_client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(admin_socket(config_path(args)))


# --------------------------------------------------------------------------------------------- admin client

_NOT_RUNNING_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR})


def _connect(socket_path: str, timeout: float) -> socket.socket:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
    except BaseException:
        sock.close()
        raise
    return sock


def _error_message(raw: bytes, status: int, reason: str) -> str:
    """The ``error`` of an error answer; else its text if it is not JSON; else the status line."""
    import msgspec

    from webhookd.api_types import ApiError

    try:
        return msgspec.json.decode(raw, type=ApiError).error
    except msgspec.ValidationError:  # JSON, but not an error document
        pass
    except msgspec.DecodeError:
        text = raw.decode("utf-8", "replace").strip()
        if text:
            return text[:200]
    return f"{status} {reason}"


class AdminClient:
    """JSON client of the admin API on ``socket_path``; every answer is decoded into the type asked for."""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        timeout: float | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> bytes:
        """The body of a 2xx answer (its headers into ``headers_out`` when given); raises ``DaemonNotRunning``,
        ``AdminError`` (4xx/5xx) or ``CLIError``."""
        import http.client

        import msgspec

        wait = self.timeout if timeout is None else timeout
        headers = {"Accept": "application/json", "Host": "webhookd"}
        payload: bytes | None = None
        if body is not None:
            payload = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("localhost", timeout=wait)
        try:
            conn.sock = _connect(str(self.socket_path), wait)
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            status, reason = resp.status, resp.reason
            if headers_out is not None:
                headers_out.update(resp.getheaders())
        except TimeoutError as e:
            raise CLIError(f"the daemon did not answer within {wait:g} s (admin socket {self.socket_path})") from e
        except OSError as e:
            if e.errno in _NOT_RUNNING_ERRNOS:
                raise DaemonNotRunning(self.socket_path) from e
            if e.errno in (errno.EACCES, errno.EPERM):
                raise CLIError(f"permission denied on the admin socket {self.socket_path}") from e
            detail = e.strerror or str(e)
            raise CLIError(f"cannot talk to the daemon on {self.socket_path}: {detail}") from e
        except http.client.HTTPException as e:
            raise CLIError(f"bad answer from the daemon on {self.socket_path}: {e!r}") from e
        finally:
            conn.close()
        if status >= 400:
            raise AdminError(status, _error_message(raw, status, reason))
        return raw

    def decode(self, raw: bytes, as_type: type[T]) -> T:
        """``raw`` as ``as_type`` (``object``: any JSON); ``BadAnswer`` naming the field otherwise."""
        import msgspec

        try:
            return msgspec.json.decode(raw, type=as_type)
        except msgspec.ValidationError as e:
            raise BadAnswer(self.socket_path, str(e)) from e
        except msgspec.DecodeError as e:
            raise BadAnswer(self.socket_path, "not JSON") from e

    def get(
        self,
        path: str,
        as_type: type[T],
        query: Mapping[str, object] | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> T:
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        target = path + ("?" + urlencode(params) if params else "")
        return self.decode(self.request("GET", target, headers_out=headers_out), as_type)

    def post(self, path: str, as_type: type[T], body: object = None, timeout: float | None = None) -> T:
        raw = self.request("POST", path, body if body is not None else {}, timeout=timeout)
        return self.decode(raw, as_type)
