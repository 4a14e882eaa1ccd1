"""webhookd.mutes: mute rules as pure data (ids and globs, expiry without action, replace by match)."""

from __future__ import annotations

from webhookd.mutes import MuteRule, Mutes, is_glob

T = 1_800_000_000.0


def test_an_exact_rule_covers_only_its_id() -> None:
    m = Mutes([MuteRule("printer-1", None)])
    assert m.covering("printer-1", T) == MuteRule("printer-1", None)
    assert m.covering("printer-10", T) is None
    assert m.covering("Printer-1", T) is None


def test_a_glob_covers_matching_ids_case_sensitively_also_new_ones() -> None:
    m = Mutes([MuteRule("printer-*", None, "toner")])
    assert m.covering("printer-1", T) is not None
    assert m.covering("printer-new", T + 1e6) is not None  # any id, whenever it first appears
    assert m.covering("PRINTER-1", T) is None
    assert m.covering("scanner-1", T) is None
    assert Mutes([MuteRule("lab-?", None)]).covering("lab-7", T) is not None
    assert Mutes([MuteRule("lab-[ab]", None)]).covering("lab-c", T) is None


def test_brackets_in_an_id_are_a_glob_but_an_exact_match_still_covers() -> None:
    assert is_glob("a[1]") and is_glob("x*") and is_glob("x?") and not is_glob("plain-id")
    m = Mutes([MuteRule("a[1]", None)])
    assert m.covering("a[1]", T) is not None  # the id itself
    assert m.covering("a1", T) is not None  # and what the glob matches


def test_expired_rules_cover_nothing_and_are_pruned_lazily() -> None:
    m = Mutes([MuteRule("printer-*", T + 10), MuteRule("old-1", T - 1)])
    assert len(m) == 2  # nothing acts at expiry
    assert m.covering("printer-1", T + 9.9) is not None
    assert m.covering("printer-1", T + 10) is None
    assert m.covering("old-1", T) is None
    assert len(m) == 0  # the lookups dropped them
    m.add(MuteRule("x", T + 1))
    assert [r.match for r in m.prune(T + 2)] == ["x"] and not m


def test_add_replaces_by_match_and_remove_takes_the_exact_match_only() -> None:
    m = Mutes()
    assert m.add(MuteRule("printer-*", None, "first")) is None
    old = m.add(MuteRule("printer-*", T + 60, "second"))
    assert old is not None and old.reason == "first"
    assert len(m) == 1 and m.get("printer-*") == MuteRule("printer-*", T + 60, "second")
    assert m.remove("printer-1") is None  # not a match of a rule, even though the glob covers it
    assert m.remove("printer-*") is not None and m.covering("printer-1", T) is None


def test_covering_prefers_the_exact_rule_then_the_longest_glob() -> None:
    m = Mutes([MuteRule("p*", T + 10), MuteRule("printer-*", None), MuteRule("pr*", T + 100)])
    rule = m.covering("printer-1", T)
    assert rule is not None and rule.match == "printer-*"  # no end beats any end
    m.remove("printer-*")
    rule = m.covering("printer-1", T)
    assert rule is not None and rule.match == "pr*"
    m.add(MuteRule("printer-1", T + 1))
    rule = m.covering("printer-1", T)
    assert rule is not None and rule.match == "printer-1"
    assert [r.match for r in m.covering_all("printer-1", T)] == ["p*", "pr*", "printer-1"]


def test_muted_until_is_the_latest_end_or_none_for_a_mute_without_end() -> None:
    m = Mutes([MuteRule("a-*", T + 10), MuteRule("a-1", T + 20)])
    assert m.muted_until("a-1", T) == (True, T + 20)
    assert m.muted_until("a-2", T) == (True, T + 10)
    assert m.muted_until("b-1", T) == (False, None)
    m.add(MuteRule("a*", None))
    assert m.muted_until("a-1", T) == (True, None)
    assert m.muted_until("a-1", T + 30) == (True, None)


def test_active_lists_the_rules_in_force_by_match() -> None:
    m = Mutes([MuteRule("z", None), MuteRule("b", T + 5), MuteRule("a", T - 5)])
    assert [r.match for r in m.active(T)] == ["b", "z"]
    assert MuteRule("b", T + 5).live(T) and not MuteRule("b", T + 5).live(T + 5)


def test_every_local_change_moves_the_generation_a_hub_s_stale_read_is_checked_against() -> None:
    m = Mutes()
    start = m.generation
    m.add(MuteRule("a-*", None))
    assert m.generation == start + 1
    m.remove("a-*")
    m.remove("never-there")  # nothing held, nothing changed: a read overlapping it stands
    m.reset([MuteRule("b", None)])
    assert m.generation == start + 3
    m.prune(1e12)  # expiry is no local change: the store's rules expire alike
    assert m.generation == start + 3
