"""Mute rules (maintenance windows): which devices' events make no deliveries right now (pure, no I/O).

A rule's `match` is a device id or a glob (`printer-*`, case-sensitive, like `devices:` rules). It covers every
device whose id it matches, also devices that first appear while it lasts. A timed rule (`until`, wall clock)
stops covering at `until` by itself: nothing has to run at expiry, and an expired rule is dropped the next time
the set is looked at (`prune`, `covering`, `active`). Nothing here sends anything: a mute that ends is not
retroactive.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_GLOB_CHARS = frozenset("*?[")


def is_glob(match: str) -> bool:
    """Whether `match` is a pattern rather than one device id."""
    return any(c in _GLOB_CHARS for c in match)


@dataclass(frozen=True, slots=True)
class MuteRule:
    match: str  # a device id or a glob on device ids
    until: float | None  # wall clock (unix seconds) the mute ends; None: until unmuted
    reason: str | None = None
    created_at: float = 0.0  # wall clock
    created_by: str | None = None  # who muted (the admin socket peer's user)

    def live(self, wall: float) -> bool:
        return self.until is None or wall < self.until

    def covers(self, device_id: str, wall: float) -> bool:
        if not self.live(wall):
            return False
        if self.match == device_id:
            return True
        return is_glob(self.match) and fnmatch.fnmatchcase(device_id, self.match)


class Mutes:
    """The set of mute rules, one per `match` (adding a rule for a match replaces the old one)."""

    def __init__(self, rules: Iterable[MuteRule] = ()) -> None:
        self._rules: dict[str, MuteRule] = {}
        # Counts the changes made here (add, remove, reset): a hub's read of the stored rules that overlapped a
        # local change is stale for it and must not replace the set (see daemon._sync_mutes).
        self.generation = 0
        for rule in rules:
            self.add(rule)

    def __len__(self) -> int:
        return len(self._rules)

    def __bool__(self) -> bool:
        return bool(self._rules)

    def __iter__(self) -> Iterator[MuteRule]:
        """Every rule held, expired ones included (nothing is pruned)."""
        return iter(list(self._rules.values()))

    def get(self, match: str) -> MuteRule | None:
        return self._rules.get(match)

    def add(self, rule: MuteRule) -> MuteRule | None:
        """Add `rule`, replacing the rule with the same match; returns the replaced one."""
        old = self._rules.get(rule.match)
        self._rules[rule.match] = rule
        self.generation += 1
        return old

    def reset(self, rules: Iterable[MuteRule]) -> None:
        """Replace every rule with `rules` in place (holders of this set see the new rules)."""
        self._rules = {r.match: r for r in rules}
        self.generation += 1

    def remove(self, match: str) -> MuteRule | None:
        """Remove the rule whose match is exactly `match`; returns it (None: there was none)."""
        rule = self._rules.pop(match, None)
        if rule is not None:  # removing nothing is no change (a forget of an unmuted device sends no notice)
            self.generation += 1
        return rule

    def prune(self, wall: float) -> list[MuteRule]:
        """Drop the rules that have expired by `wall`; returns them."""
        gone = [r for r in self._rules.values() if not r.live(wall)]
        for rule in gone:
            del self._rules[rule.match]
        return gone

    def active(self, wall: float) -> list[MuteRule]:
        """The rules in force at `wall`, by match."""
        self.prune(wall)
        return [self._rules[m] for m in sorted(self._rules)]

    def covering(self, device_id: str, wall: float) -> MuteRule | None:
        """The rule that mutes `device_id` at `wall` (an exact match first, else the glob that ends last;
        untimed ones last longest), or None."""
        if not self._rules:
            return None
        exact = self._rules.get(device_id)
        if exact is not None and exact.live(wall):
            return exact
        best: MuteRule | None = None
        stale = False
        for rule in self._rules.values():
            if not rule.live(wall):
                stale = True
                continue
            globbed = rule.match != device_id and is_glob(rule.match) and fnmatch.fnmatchcase(device_id, rule.match)
            if globbed and (best is None or _ends_later(rule, best)):
                best = rule
        if stale:
            self.prune(wall)
        return best

    def covering_all(self, device_id: str, wall: float) -> list[MuteRule]:
        """Every rule in force that covers `device_id`, by match."""
        return [r for r in self.active(wall) if r.covers(device_id, wall)]

    def muted_until(self, device_id: str, wall: float) -> tuple[bool, float | None]:
        """(muted, until) of a device: until is None for a mute without end (or when not muted)."""
        rules = self.covering_all(device_id, wall)
        if not rules:
            return False, None
        if any(r.until is None for r in rules):
            return True, None
        return True, max(r.until for r in rules if r.until is not None)


@dataclass(frozen=True, slots=True)
class MuteSync:
    """What the stored rules change in the set held (a hub process learning of another's mute or unmute)."""

    rules: tuple[MuteRule, ...]  # the rules to hold from now on: the stored ones in force
    added: tuple[str, ...]  # matches in force now that were not, or whose rule changed (a mute made again)
    removed: tuple[str, ...]  # matches no longer stored (unmuted, forgotten)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def sync(held: Mutes, stored: Iterable[MuteRule], wall: float) -> MuteSync:
    """The set to hold given the store's rules at `wall`: the store is the truth on a hub (every process writes
    it), expired rules are left out (nothing has to happen at expiry) and one that merely expired is not
    `removed`."""
    now = {r.match: r for r in stored if r.live(wall)}
    before = {r.match: r for r in held if r.live(wall)}
    added = tuple(m for m in sorted(now) if before.get(m) != now[m])
    removed = tuple(m for m in sorted(before) if m not in now)
    return MuteSync(tuple(now[m] for m in sorted(now)), added, removed)


def _ends_later(a: MuteRule, b: MuteRule) -> bool:
    if a.until is None:
        return b.until is not None
    return b.until is not None and a.until > b.until
