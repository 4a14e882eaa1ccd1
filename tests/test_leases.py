"""The partition lease rule of a hub of several processes (webhookd/leases.py), pure and in milliseconds."""

from __future__ import annotations

from webhookd.leases import MARGIN, PARTITIONS, TTL, Holdings, LeaseRow, fair_share, partition_of, plan

NOW = 1_000_000.0


def rows(owners: dict[int, str | None], expires: float = NOW + TTL) -> list[LeaseRow]:
    return [LeaseRow(p, owners.get(p), 1, expires if owners.get(p) else 0.0) for p in range(PARTITIONS)]


def test_a_lane_always_falls_in_the_same_partition() -> None:
    assert partition_of("ops", "site-a:dev-1") == partition_of("ops", "site-a:dev-1")
    assert 0 <= partition_of("ops", "x") < PARTITIONS
    # spread: 1,000 devices of one endpoint land in every partition
    assert len({partition_of("ops", f"d{i}") for i in range(1000)}) == PARTITIONS


def test_a_lone_process_claims_every_partition() -> None:
    p = plan("a", rows({}), ["a"], NOW)
    assert p.claim == tuple(range(PARTITIONS)) and p.release == ()


def test_three_processes_share_fairly() -> None:
    assert fair_share(3) == 11
    p = plan("c", rows({i: "a" if i < 11 else "b" for i in range(22)}), ["a", "b", "c"], NOW)
    assert p.claim == tuple(range(22, PARTITIONS)) and len(p.claim) == 10


def test_a_newcomer_gets_a_share_from_the_ones_over_it() -> None:
    owners: dict[int, str | None] = {i: "a" for i in range(PARTITIONS)}
    p = plan("a", rows(owners), ["a", "b"], NOW)
    assert p.release == tuple(range(16, PARTITIONS))
    # at its share, with nobody starving, nothing moves (no churn between 11/11/10)
    owners = {i: ("a" if i < 11 else "b" if i < 22 else "c") for i in range(PARTITIONS)}
    for me in "abc":
        decided = plan(me, rows(owners), ["a", "b", "c"], NOW)
        assert decided.claim == () and decided.release == ()


def test_a_dead_process_s_expired_leases_are_claimed() -> None:
    owners: dict[int, str | None] = {i: ("a" if i < 16 else "dead") for i in range(PARTITIONS)}
    leases = [LeaseRow(r.part, r.owner, 3, NOW - 0.1 if r.owner == "dead" else NOW + 4) for r in rows(owners)]
    # the dead one no longer counts as a member: the survivor's share is everything
    p = plan("a", leases, ["a"], NOW)
    assert p.claim == tuple(range(16, PARTITIONS))


def test_local_validity_ends_before_the_database_s_expiry() -> None:
    h = Holdings()
    gained, lost = h.renewed({1: 5, 2: 7}, sent_at=100.0)
    assert gained == {1, 2} and lost == set()
    assert h.valid(1, 100.0 + TTL - MARGIN - 0.01) and not h.valid(1, 100.0 + TTL - MARGIN)
    assert h.epochs(101.0) == ([1, 2], [5, 7])
    # a renew that gives one back at a new epoch (lost and taken again meanwhile) counts as lost and gained
    gained, lost = h.renewed({1: 6}, sent_at=101.0)
    assert gained == {1} and lost == {1, 2}
    # a process stopped past its lease: nothing valid, every write fenced off
    assert h.expire(101.0 + TTL) == {1} and h.epochs(200.0) == ([], [])
