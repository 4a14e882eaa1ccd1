"""Partition leases of a hub of several processes (CONTRACT §14), as pure functions of their inputs and `now`.

A hub's deliveries are split into PARTITIONS by (endpoint, device), so that one lane is always in one partition
and per-(endpoint, device) order needs no coordination beyond "one holder per partition". Each partition has a
lease row (owner, epoch, expires_at) in the database. A process claims free or expired partitions up to its fair
share of the live processes, renews what it holds, and gives back what is over its share so that a newcomer gets
some. Every change of owner bumps the epoch, and the holder's writes are accepted only while the row still
carries its (owner, epoch): a process that was paused past its lease and resumes changes nothing.

Locally a lease is valid until the monotonic time its last successful renew was *sent* plus TTL minus a margin:
that is never later than the expiry the database recorded, so no attempt starts after another process may have
taken the partition over. `plan` and `Holdings` do no I/O; the claims loop (dispatch/claims.py) does.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PARTITIONS = 32  # the lease rows PostgreSQL schema version 2 made (part 0 .. 31)
TTL = 5.0  # seconds a lease lasts in the database after each renew
RENEW_EVERY = 1.0  # seconds between renews (and between claims of what is free)
MARGIN = 0.5  # seconds of the TTL a holder does not use: its clock and the database's may disagree a little
MEMBER_TTL = TTL  # a member not seen for this long no longer counts for the fair share (its leases expire too)


def partition_of(endpoint: str, device_id: str) -> int:
    """The partition of a lane: stable across processes, versions and restarts (crc32, not hash())."""
    return zlib.crc32(f"{endpoint}\0{device_id}".encode()) % PARTITIONS


@dataclass(frozen=True, slots=True)
class LeaseRow:
    part: int
    owner: str | None
    epoch: int
    expires_at: float  # database time, unix seconds


@dataclass(frozen=True, slots=True)
class Plan:
    claim: tuple[int, ...]  # free or expired partitions to claim (their epoch is bumped)
    release: tuple[int, ...]  # held partitions to give back (over the fair share)


def fair_share(members: int, partitions: int = PARTITIONS) -> int:
    return math.ceil(partitions / max(1, members))


def plan(me: str, leases: Sequence[LeaseRow], members: Iterable[str], now: float) -> Plan:
    """What `me` claims and releases now, given every lease row and the live members (me included).

    Claims go to the free partitions first (lowest number first, so processes starting together collide little:
    SKIP LOCKED sorts out the rest), up to the fair share. A process over its share releases the surplus only
    while some live member is under it: that one then claims what was released."""
    live = set(members) | {me}
    share = fair_share(len(live))
    held = sorted(r.part for r in leases if r.owner == me and r.expires_at > now)
    free = [r.part for r in leases if r.owner is None or r.expires_at <= now]
    if len(held) < share:
        return Plan(tuple(free[: share - len(held)]), ())
    counts = {m: 0 for m in live}
    for r in leases:
        if r.owner in counts and r.expires_at > now:
            counts[r.owner] += 1
    starving = any(n < share - 1 for m, n in counts.items() if m != me)
    if len(held) > share and starving:
        return Plan((), tuple(held[share:]))
    return Plan((), ())


@dataclass(slots=True)
class Holdings:
    """The partitions this process holds: part -> (epoch, valid until, monotonic)."""

    held: dict[int, tuple[int, float]] = field(default_factory=dict)

    def valid(self, part: int, now: float) -> bool:
        entry = self.held.get(part)
        return entry is not None and now < entry[1]

    def owned(self, now: float) -> frozenset[int]:
        return frozenset(p for p, (_, until) in self.held.items() if now < until)

    def epochs(self, now: float) -> tuple[list[int], list[int]]:
        """(parts, epochs) of the valid leases: what a fenced write may touch."""
        parts = sorted(self.owned(now))
        return parts, [self.held[p][0] for p in parts]

    def renewed(self, got: dict[int, int], sent_at: float) -> tuple[set[int], set[int]]:
        """Apply the result of a renew or claim sent at monotonic `sent_at`: `got` maps every partition held
        after it to its epoch. Returns (gained, lost)."""
        until = sent_at + TTL - MARGIN
        before = set(self.held)
        lost = {p for p in before if p not in got or got[p] != self.held[p][0]}
        gained = {p for p in got if p not in self.held or self.held[p][0] != got[p]}
        self.held = {p: (epoch, until) for p, epoch in got.items()}
        return gained, lost

    def expire(self, now: float) -> set[int]:
        """Drop the leases this process can no longer count on (it could not renew them in time)."""
        gone = {p for p, (_, until) in self.held.items() if now >= until}
        for p in gone:
            del self.held[p]
        return gone
