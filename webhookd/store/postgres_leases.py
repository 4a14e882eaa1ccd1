"""The SQL of a hub of several processes on one PostgreSQL database: lease rows, members, fenced receipts, the
shared endpoint row, and the notices that wake the others (CONTRACT §14).

Lease times are the database's clock (`clock_timestamp()`), so processes on different boxes agree on expiry.
Each function takes a connection: reads and lease renewals run on the claims loop's own connection (autocommit,
each statement its own transaction), fenced receipts inside the writer's group commit.
"""

# ruff: noqa: S608  (the f-strings splice only the constants DB_NOW and _ENDPOINT_COLUMNS; values are parameters)
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from webhookd.leases import LeaseRow
from webhookd.store.postgres_schema import Conn

CHANNEL = "webhookd_pending"  # NOTIFY channel: "new <endpoints>", "rescan <endpoint> <after id>", "endpoint <name>",
# "mutes"
MUTES_NOTICE = "mutes"  # the mute rules changed: read them again (sent by the transaction that changed them)
# pg_advisory_xact_lock key held by every transaction that inserts deliveries on a hub: ids then commit in id
# order, so that a process paging by id never passes a row another process's transaction commits later.
DELIVERY_ID_LOCK = int.from_bytes(b"wh-ids!!", "big", signed=True)
DB_NOW = "extract(epoch from clock_timestamp())"


class Fence(Protocol):
    """What a fenced write needs: who we are and the leases we hold now."""

    owner: str

    def fence(self) -> tuple[list[int], list[int]]:
        """(parts, epochs) of the leases held and still valid."""


# Receipts of one group commit land only on rows whose partition lease is still ours, at the epoch we hold: the
# FOR SHARE lock makes a takeover's claim wait for this commit (and this commit see a claim that came first).
FENCED = (
    "WITH f AS (SELECT l.part FROM leases l JOIN unnest(%b::int[], %b::bigint[]) AS o(part, epoch)"
    " ON l.part = o.part AND l.epoch = o.epoch WHERE l.owner = %s FOR SHARE OF l) "
)
# A hold (the attempt of an endpoint this process saw disabled) lands as pending when the shared row says the
# endpoint is enabled by now: another process's enable released the held rows already.
HELD_UNLESS_ENABLED = (
    "CASE WHEN r.status = 'held' AND NOT EXISTS (SELECT 1 FROM endpoints x WHERE x.name = d.endpoint AND x.disabled)"
    " THEN 'pending' ELSE r.status END"
)
UPDATE_RECEIPTS_FENCED = FENCED + (
    f"UPDATE deliveries d SET status={HELD_UNLESS_ENABLED}, attempts=r.attempts, next_attempt_at=r.nxt,"
    " last_status=r.ls,"
    " last_error=r.le, updated_at=r.now FROM unnest(%b::text[], %b::int[], %b::float8[], %b::int[], %b::text[],"
    " %b::float8[], %b::bigint[], %b::text[]) AS r(status, attempts, nxt, ls, le, now, id, also)"
    " WHERE d.id = r.id AND d.status IN ('pending', r.also) AND d.part IN (SELECT part FROM f)"
)
UPDATE_RECEIPT_FENCED = FENCED + (  # parameters: the fence's, then the status twice, then the receipt's
    f"UPDATE deliveries d SET status={HELD_UNLESS_ENABLED.replace('r.status', '%s')}, attempts=%s,"
    " next_attempt_at=%s, last_status=%s, last_error=%s, updated_at=%s WHERE d.id=%s"
    " AND d.status IN ('pending', %s) AND d.part IN (SELECT part FROM f)"
)


async def db_now(c: Conn) -> float:
    cur = await c.execute(f"SELECT {DB_NOW}")
    row = await cur.fetchone()
    assert row is not None
    return float(row[0])


async def heartbeat(c: Conn, me: str) -> None:
    """Say this process is alive (a member counts for the fair share while seen within MEMBER_TTL)."""
    await c.execute(
        f"INSERT INTO hub_members (owner, started_at, seen_at) VALUES (%s, {DB_NOW}, {DB_NOW})"
        " ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at",
        (me,),
    )


async def fence_off(c: Conn, me: str, ttl: float) -> list[str]:
    """End the database sessions of members not seen within `ttl` (their leases have expired): a stopped process
    can hold locks in an open transaction, mid-pipeline, where no server timeout applies. Returns the members."""
    cur = await c.execute(
        "WITH victims AS MATERIALIZED (SELECT a.pid, a.application_name AS member FROM pg_stat_activity a"
        " JOIN hub_members m ON m.owner = a.application_name WHERE a.datname = current_database()"
        f" AND a.pid <> pg_backend_pid() AND m.owner <> %s AND m.seen_at < {DB_NOW} - %s)"
        " SELECT DISTINCT member FROM victims WHERE pg_terminate_backend(pid)",
        (me, ttl),
    )
    return [r[0] for r in await cur.fetchall()]


async def members(c: Conn, ttl: float) -> list[str]:
    cur = await c.execute(f"SELECT owner FROM hub_members WHERE seen_at > {DB_NOW} - %s ORDER BY owner", (ttl,))
    return [r[0] for r in await cur.fetchall()]


async def leases(c: Conn) -> tuple[float, list[LeaseRow]]:
    """The database's now and every lease row."""
    cur = await c.execute(f"SELECT {DB_NOW}, part, owner, epoch, expires_at FROM leases ORDER BY part")
    rows = await cur.fetchall()
    now = float(rows[0][0]) if rows else await db_now(c)
    return now, [LeaseRow(int(r[1]), r[2], int(r[3]), float(r[4])) for r in rows]


async def renew(c: Conn, me: str, held: dict[int, int], ttl: float) -> dict[int, int]:
    """Extend the leases we hold at their epoch; returns those that are still ours (part -> epoch)."""
    if not held:
        return {}
    parts = sorted(held)
    cur = await c.execute(
        f"UPDATE leases l SET expires_at = {DB_NOW} + %s FROM unnest(%s::int[], %s::bigint[]) AS o(part, epoch)"
        " WHERE l.part = o.part AND l.epoch = o.epoch AND l.owner = %s RETURNING l.part, l.epoch",
        (ttl, parts, [held[p] for p in parts], me),
    )
    return {int(r[0]): int(r[1]) for r in await cur.fetchall()}


async def claim(c: Conn, me: str, parts: list[int], ttl: float) -> dict[int, int]:
    """Take those of `parts` that are free or expired (another process may be taking them at this moment:
    SKIP LOCKED leaves those to it), each with a new epoch."""
    if not parts:
        return {}
    cur = await c.execute(
        f"UPDATE leases SET owner = %s, epoch = epoch + 1, expires_at = {DB_NOW} + %s WHERE part IN ("
        f" SELECT part FROM leases WHERE part = ANY(%s) AND (owner IS NULL OR expires_at <= {DB_NOW})"
        " FOR UPDATE SKIP LOCKED) RETURNING part, epoch",
        (me, ttl, parts),
    )
    return {int(r[0]): int(r[1]) for r in await cur.fetchall()}


async def release(c: Conn, me: str, parts: list[int]) -> None:
    """Give partitions back at once (over our share, or stopping): the next claimer bumps the epoch."""
    if parts:
        await c.execute(
            "UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = %s AND part = ANY(%s)", (me, parts)
        )


async def leave(c: Conn, me: str) -> None:
    await c.execute("UPDATE leases SET owner = NULL, expires_at = 0 WHERE owner = %s", (me,))
    await c.execute("DELETE FROM hub_members WHERE owner = %s", (me,))


async def notify(c: Conn, payload: str) -> None:
    await c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


async def mutes_changed(c: Conn) -> None:
    """Inside the transaction that wrote the mutes: PostgreSQL delivers the notice at its commit and never for a
    rollback, so the other processes read the rules only once they are there."""
    await notify(c, MUTES_NOTICE)


# --- the shared endpoint row -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedEndpoint:
    name: str
    disabled: bool
    disabled_reason: str | None
    consecutive_failures: int
    last_error: str | None
    paused_until: float  # database time
    pause_step: int
    probe_by: str | None
    probe_until: float


_ENDPOINT_COLUMNS = (
    "name, disabled, disabled_reason, consecutive_failures, last_error, paused_until, pause_step, probe_by, probe_until"
)


def _shared(r: tuple[object, ...]) -> SharedEndpoint:
    return SharedEndpoint(
        str(r[0]),
        bool(r[1]),
        r[2] if isinstance(r[2], str) else None,
        int(r[3]),  # type: ignore[call-overload]
        r[4] if isinstance(r[4], str) else None,
        float(r[5]),  # type: ignore[arg-type]
        int(r[6]),  # type: ignore[call-overload]
        r[7] if isinstance(r[7], str) else None,
        float(r[8]),  # type: ignore[arg-type]
    )


async def endpoints(c: Conn) -> tuple[float, dict[str, SharedEndpoint]]:
    cur = await c.execute(f"SELECT {DB_NOW}, {_ENDPOINT_COLUMNS} FROM endpoints")
    rows = await cur.fetchall()
    now = float(rows[0][0]) if rows else await db_now(c)
    return now, {str(r[1]): _shared(tuple(r[1:])) for r in rows}


async def failed(c: Conn, name: str, error: str | None) -> tuple[float, SharedEndpoint | None]:
    """One more consecutive failure of the endpoint, counted for the whole hub (an atomic increment); the probe,
    if one was out, is over."""
    cur = await c.execute(
        f"UPDATE endpoints SET consecutive_failures = consecutive_failures + 1, last_error = %s, probe_by = NULL,"
        f" probe_until = 0 WHERE name = %s RETURNING {DB_NOW}, {_ENDPOINT_COLUMNS}",
        (error, name),
    )
    row = await cur.fetchone()
    if row is None:
        return await db_now(c), None
    return float(row[0]), _shared(tuple(row[1:]))


async def pause(c: Conn, name: str, until: float, step: int) -> None:
    """Lengthen the endpoint's shared pause (never shorten it: the longest pause any process decided wins)."""
    await c.execute(
        "UPDATE endpoints SET paused_until = greatest(paused_until, %s), pause_step = greatest(pause_step, %s)"
        " WHERE name = %s AND consecutive_failures > 0",
        (until, step, name),
    )


async def succeeded(c: Conn, name: str) -> None:
    """A success reopens the endpoint for the whole hub (unless it was disabled meanwhile: that stays)."""
    await c.execute(
        "UPDATE endpoints SET consecutive_failures = 0, last_error = NULL, paused_until = 0, pause_step = 0,"
        " probe_by = NULL, probe_until = 0 WHERE name = %s AND NOT disabled",
        (name,),
    )


async def take_probe(c: Conn, name: str, me: str, hold: float) -> tuple[bool, float, SharedEndpoint | None]:
    """Compare-and-swap the endpoint's single probe to us: only while it is failing, its pause is over and no
    other process holds a probe that is still running. Returns (won, database now, the row as it is)."""
    cur = await c.execute(
        f"UPDATE endpoints SET probe_by = %s, probe_until = {DB_NOW} + %s WHERE name = %s AND NOT disabled"
        f" AND consecutive_failures > 0 AND paused_until <= {DB_NOW}"
        f" AND (probe_by IS NULL OR probe_by = %s OR probe_until <= {DB_NOW}) RETURNING {DB_NOW}, {_ENDPOINT_COLUMNS}",
        (me, hold, name, me),
    )
    row = await cur.fetchone()
    if row is not None:
        return True, float(row[0]), _shared(tuple(row[1:]))
    cur = await c.execute(f"SELECT {DB_NOW}, {_ENDPOINT_COLUMNS} FROM endpoints WHERE name = %s", (name,))
    row = await cur.fetchone()
    if row is None:
        return False, await db_now(c), None
    return False, float(row[0]), _shared(tuple(row[1:]))


async def disable_once(c: Conn, name: str, reason: str) -> bool:
    """Compare-and-swap the endpoint to disabled: True for the one process that flipped it."""
    cur = await c.execute(
        "UPDATE endpoints SET disabled = true, disabled_reason = %s, probe_by = NULL, probe_until = 0"
        " WHERE name = %s AND NOT disabled RETURNING name",
        (reason, name),
    )
    return await cur.fetchone() is not None
