"""Unit tests for broker/registry.py, with an injected clock (`now` arguments)."""

from __future__ import annotations

import pytest

from broker.registry import Holder, Registry
from common.ranges import SegmentSet

pytestmark = pytest.mark.timeout(30)

F1 = b"\x01" * 32
F2 = b"\x02" * 32
EXPIRY = 10.0


def ep(n: int) -> str:
    return f"tcp://10.0.0.{n}:7000"


def reg(**kwargs: float) -> Registry:
    return Registry(expiry_s=EXPIRY, **kwargs)  # type: ignore[arg-type]


def names(holders: list[Holder]) -> list[str]:
    return sorted(h.name for h in holders)


def test_register_new_peer() -> None:
    r = reg()
    assert r.register("a", b"rid-a", ep(1), [(F1, [(0, 10)])], now=0.0) is False
    rec = r.peers["a"]
    assert (rec.name, rec.routing_id, rec.endpoint, rec.registered_at, rec.last_seen) == (
        "a",
        b"rid-a",
        ep(1),
        0.0,
        0.0,
    )
    assert r.holdings_of("a", F1) == SegmentSet([(0, 10)])
    assert r.holdings_of("a", F2) == SegmentSet()
    assert r.holdings_of("nobody", F1) == SegmentSet()
    hs = r.holders(F1, now=0.0)
    assert len(hs) == 1
    assert (hs[0].name, hs[0].endpoint, hs[0].segments, hs[0].load) == (
        "a",
        ep(1),
        SegmentSet([(0, 10)]),
        0.0,
    )


def test_holdings_of_returns_a_copy() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    copy = r.holdings_of("a", F1)
    copy.remove(0, 10)
    assert r.holdings_of("a", F1) == SegmentSet([(0, 10)])


def test_register_replaces_record_with_exactly_the_new_holdings() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)]), (F2, [(0, 1)])], now=0.0)
    assert r.register("a", b"ra2", ep(2), [(F1, [(50, 5)])], now=3.0) is True
    rec = r.peers["a"]
    assert rec.endpoint == ep(2)
    assert rec.registered_at == 3.0
    assert r.holdings_of("a", F1) == SegmentSet([(50, 5)])
    assert r.holders(F2, now=3.0) == []
    assert F2 not in rec.holdings
    # the old routing id no longer maps; the new one does
    assert r.peer_by_routing(b"ra") is None
    found = r.peer_by_routing(b"ra2")
    assert found is not None
    assert found.name == "a"
    assert len(r.peers) == 1


def test_routing_id_maps_to_peer() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("b", b"rb", ep(2), [], now=0.0)
    a, b = r.peer_by_routing(b"ra"), r.peer_by_routing(b"rb")
    assert a is not None and a.name == "a"
    assert b is not None and b.name == "b"
    assert r.peer_by_routing(b"zz") is None


def test_new_name_on_a_used_routing_id_drops_the_stale_peer() -> None:
    r = reg()
    r.register("old", b"same", ep(1), [(F1, [(0, 4)])], now=0.0)
    r.register("new", b"same", ep(2), [], now=1.0)
    assert "old" not in r.peers
    rec = r.peer_by_routing(b"same")
    assert rec is not None
    assert rec.name == "new"
    assert r.holders(F1, now=1.0) == []


def test_remove() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 4)])], now=0.0)
    r.register("b", b"rb", ep(2), [(F1, [(0, 4)])], now=0.0)
    assert r.remove("a") is True
    assert r.remove("a") is False
    assert r.peer_by_routing(b"ra") is None
    assert names(r.holders(F1, now=0.0)) == ["b"]
    r.remove("b")
    assert r.holders(F1, now=0.0) == []


def test_touch() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    assert r.touch("a", 4.0) is True
    assert r.peers["a"].last_seen == 4.0
    assert r.touch("ghost", 4.0) is False


def test_expire_at_the_boundary() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 1)])], now=100.0)
    assert r.next_expiry() == 100.0 + EXPIRY
    assert r.expire(100.0 + EXPIRY - 1e-6) == []
    assert "a" in r.peers
    # alive while now - last_seen < expiry_s: at exactly expiry_s it is gone
    assert r.expire(100.0 + EXPIRY) == ["a"]
    assert "a" not in r.peers
    assert r.peer_by_routing(b"ra") is None
    assert r.holders(F1, now=100.0 + EXPIRY) == []
    assert r.evicted_total == 1
    assert r.expire(1000.0) == []
    assert r.evicted_total == 1


def test_expire_well_after_the_deadline() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("b", b"rb", ep(2), [], now=5.0)
    assert sorted(r.expire(12.0)) == ["a"]
    assert sorted(r.expire(100.0)) == ["b"]
    assert r.evicted_total == 2
    assert r.next_expiry() is None


def test_touched_peer_survives_lazy_heap_and_expires_later() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("b", b"rb", ep(2), [], now=0.0)
    r.touch("a", 6.0)
    # b's time is up; a's heap entry comes due too but a was seen since: pushed back, not evicted
    assert r.expire(EXPIRY) == ["b"]
    assert "a" in r.peers
    assert r.next_expiry() == 16.0
    assert r.expire(16.0 - 1e-6) == []
    r.touch("a", 15.0)  # seen again before the new deadline
    assert r.expire(16.0) == []
    assert r.next_expiry() == 25.0
    assert r.expire(25.0) == ["a"]


def test_heartbeats_keep_a_peer_alive_indefinitely() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    t = 0.0
    for _ in range(100):
        t += EXPIRY * 0.9
        r.touch("a", t)
        assert r.expire(t) == []
    assert "a" in r.peers
    assert r.expire(t + EXPIRY) == ["a"]


def test_reregistered_peer_is_judged_by_its_new_record() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("a", b"ra", ep(1), [], now=8.0)
    assert r.expire(EXPIRY) == []  # the first heap entry is stale
    assert r.expire(18.0) == ["a"]
    assert r.evicted_total == 1


def test_removed_peer_heap_entry_is_skipped() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.remove("a")
    assert r.expire(100.0) == []
    assert r.evicted_total == 0


def test_holders_excludes_requester_benched_and_empty() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    r.register("b", b"rb", ep(2), [(F1, [(0, 5)])], now=0.0)
    r.register("c", b"rc", ep(3), [(F1, [(5, 5)])], now=0.0)
    r.register("d", b"rd", ep(4), [(F2, [(0, 5)])], now=0.0)
    assert names(r.holders(F1, now=1.0)) == ["a", "b", "c"]
    assert names(r.holders(F1, now=1.0, exclude="a")) == ["b", "c"]
    assert names(r.holders(F2, now=1.0)) == ["d"]
    assert r.holders(b"\x09" * 32, now=1.0) == []
    r.remove_runs("c", F1, [(5, 5)])  # claim emptied: not a holder
    assert names(r.holders(F1, now=1.0)) == ["a", "b"]
    r.peers["b"].benched_until = 5.0
    assert names(r.holders(F1, now=4.9)) == ["a"]
    assert names(r.holders(F1, now=5.0)) == ["a", "b"]


def test_add_runs_and_remove_runs() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.add_runs("a", F1, [(0, 5), (10, 5)])
    r.add_runs("a", F1, [(5, 5)])
    assert r.holdings_of("a", F1).runs() == [(0, 15)]
    assert r.holders(F1, now=0.0)[0].segments.runs() == [(0, 15)]
    r.remove_runs("a", F1, [(3, 2), (14, 10)])
    assert r.holdings_of("a", F1).runs() == [(0, 3), (5, 9)]
    # unknown peer or file: ignored
    r.add_runs("ghost", F1, [(0, 1)])
    r.remove_runs("ghost", F1, [(0, 1)])
    r.remove_runs("a", F2, [(0, 1)])
    assert "ghost" not in r.peers
    assert r.holders(F2, now=0.0) == []


def test_forget_file() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 5)]), (F2, [(0, 5)])], now=0.0)
    r.register("b", b"rb", ep(2), [(F1, [(0, 5)])], now=0.0)
    r.forget_file(F1)
    assert r.holders(F1, now=0.0) == []
    assert r.holdings_of("a", F1) == SegmentSet()
    assert F1 not in r.peers["a"].holdings
    assert F1 not in r.peers["b"].holdings
    assert names(r.holders(F2, now=0.0)) == ["a"]
    r.forget_file(F1)  # twice: harmless
    # the file can be claimed again afterwards
    r.add_runs("b", F1, [(1, 1)])
    assert names(r.holders(F1, now=0.0)) == ["b"]
    # and removing a peer after forget_file does not trip over the missing index
    assert r.remove("a") is True
    assert names(r.holders(F2, now=0.0)) == []


def test_report_bad_without_strike_only_drops_the_claim() -> None:
    r = reg(strike_limit=1)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    assert r.report_bad("a", F1, [(2, 3)], "refused", now=1.0, strike=False) is False
    assert r.holdings_of("a", F1).runs() == [(0, 2), (5, 5)]
    assert r.peers["a"].strikes == []
    assert r.peers["a"].benched_until == 0.0
    assert names(r.holders(F1, now=1.0)) == ["a"]


def test_report_bad_strikes_and_benches_after_the_limit() -> None:
    r = reg(strike_limit=3, strike_window_s=60.0, bench_s=30.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    assert r.report_bad("a", F1, [(0, 1)], "checksum mismatch", now=1.0, reporter="x") is False
    assert r.report_bad("a", F1, [(1, 1)], "checksum mismatch", now=2.0, reporter="y") is False
    assert names(r.holders(F1, now=2.0)) == ["a"]
    assert r.report_bad("a", F1, [(2, 1)], "malformed reply", now=3.0, reporter="z") is True
    rec = r.peers["a"]
    assert rec.benched_until == 33.0
    assert rec.bench_reason == "malformed reply"
    assert r.holdings_of("a", F1).runs() == [(3, 7)]  # every reported claim dropped
    assert r.holders(F1, now=3.0) == []
    assert r.holders(F1, now=32.9) == []
    # benched again while benched: no new bench, no extension
    assert r.report_bad("a", F1, [(3, 1)], "checksum mismatch", now=10.0, reporter="w") is False
    assert rec.benched_until == 33.0
    # un-benched after bench_s
    assert names(r.holders(F1, now=33.0)) == ["a"]


def test_strikes_outside_the_window_do_not_count() -> None:
    r = reg(strike_limit=3, strike_window_s=10.0, bench_s=5.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 100)])], now=0.0)
    assert r.report_bad("a", F1, [(0, 1)], "bad", now=0.0, reporter="x") is False
    assert r.report_bad("a", F1, [(1, 1)], "bad", now=5.0, reporter="y") is False
    # the strike at t=0 is exactly window old at t=10: it no longer counts
    assert r.report_bad("a", F1, [(2, 1)], "bad", now=10.0, reporter="z") is False
    assert r.peers["a"].strikes == [(5.0, "y"), (10.0, "z")]
    assert r.report_bad("a", F1, [(3, 1)], "bad", now=14.9, reporter="x") is True
    assert r.peers["a"].benched_until == pytest.approx(19.9)


def test_report_bad_on_unknown_peer() -> None:
    r = reg(strike_limit=1)
    assert r.report_bad("ghost", F1, [(0, 1)], "bad", now=0.0) is False


def test_strikes_and_bench_survive_reregistration() -> None:
    r = reg(strike_limit=2, bench_s=30.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    r.report_bad("a", F1, [(0, 1)], "bad", now=1.0, reporter="x")
    assert r.report_bad("a", F1, [(1, 1)], "bad", now=2.0, reporter="y") is True
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=3.0)  # restarting must not clear them
    rec = r.peers["a"]
    assert rec.benched_until == 32.0
    assert rec.strikes == [(1.0, "x"), (2.0, "y")]
    assert rec.bench_reason == "bad"
    assert r.holders(F1, now=4.0) == []
    assert names(r.holders(F1, now=32.0)) == ["a"]


def test_load_decays_with_half_life() -> None:
    r = reg(load_half_life_s=2.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    rec = r.peers["a"]
    assert r.load_of(rec, 0.0) == 0.0
    r.note_planned("a", 100, now=10.0)
    assert r.load_of(rec, 10.0) == pytest.approx(100.0)
    assert r.load_of(rec, 12.0) == pytest.approx(50.0)
    assert r.load_of(rec, 14.0) == pytest.approx(25.0)
    assert r.load_of(rec, 5.0) == pytest.approx(100.0)  # a clock step back does not grow the load
    r.note_planned("a", 10, now=12.0)  # decayed 50 plus 10
    assert r.load_of(rec, 12.0) == pytest.approx(60.0)
    assert r.load_of(rec, 14.0) == pytest.approx(30.0)
    assert r.holders(F1, now=14.0)[0].load == pytest.approx(30.0)
    r.note_planned("ghost", 10, now=12.0)  # unknown: ignored
    assert "ghost" not in r.peers


def test_holders_report_each_peers_own_load() -> None:
    r = reg(load_half_life_s=1.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    r.register("b", b"rb", ep(2), [(F1, [(0, 10)])], now=0.0)
    r.note_planned("a", 64, now=0.0)
    loads = {h.name: h.load for h in r.holders(F1, now=1.0)}
    assert loads == {"a": pytest.approx(32.0), "b": 0.0}


def test_reregistering_does_not_grow_the_expiry_heap() -> None:
    r = reg()
    for i in range(100):
        r.register("a", b"ra", ep(1), [], now=i * 0.01)
    t = 1.0
    for _ in range(5):  # heartbeats keep the peer alive across several expiry passes
        t += EXPIRY * 0.9
        r.touch("a", t)
        assert r.expire(t) == []
    assert len(r._expiry_heap) <= 2  # one live entry per peer (a stale one may linger until due)


# --------------------------------------------------------------------------- active downloads


def active_names(
    r: Registry, file_id: bytes, now: float, segments: int = 100, idle_s: float = 2.0
) -> list[tuple[int, str]]:
    return [(pos, h.name) for pos, h in r.downloaders(file_id, segments, now, idle_s)]


def test_downloaders_keep_their_join_positions() -> None:
    r = reg()
    for i, name in enumerate("abc"):
        r.register(name, name.encode(), ep(i), [], now=0.0)
    assert active_names(r, F1, 0.0) == []
    r.note_active("b", F1, 0.0)
    r.note_active("a", F1, 0.1)
    r.note_active("b", F1, 0.2)  # again: same position
    r.note_active("c", F2, 0.2)  # another file
    assert active_names(r, F1, 0.3) == [(0, "b"), (1, "a")]
    assert active_names(r, F2, 0.3) == [(0, "c")]
    r.note_active("ghost", F1, 0.3)  # not registered: never a downloader
    assert active_names(r, F1, 0.3) == [(0, "b"), (1, "a")]


def test_progress_keeps_a_downloader_active_and_silence_ends_it() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("b", b"rb", ep(2), [], now=0.0)
    r.note_active("a", F1, 0.0)
    r.note_active("b", F1, 0.0)
    r.note_progress("a", F1, 1.5)  # a `have`
    r.note_progress("c", F1, 1.5)  # progress never starts a download
    assert active_names(r, F1, 2.0) == [(0, "a"), (1, "b")]  # exactly idle_s: still active
    assert active_names(r, F1, 3.0) == [(0, "a")]  # b went quiet
    r.note_active("b", F1, 3.1)  # back: the lowest free position
    assert active_names(r, F1, 3.1) == [(0, "a"), (1, "b")]


def test_a_complete_downloader_keeps_its_place_while_its_crowd_downloads() -> None:
    r = reg()
    for name in "abc":
        r.register(name, name.encode(), ep(ord(name)), [], now=0.0)
        r.note_active(name, F1, 0.0)
    r.add_runs("a", F1, [(0, 100)])
    r.add_runs("c", F1, [(0, 100)])
    # idle for 3 s (idle_s 2): the incomplete one is gone, the complete ones stay...
    assert active_names(r, F1, 3.0, segments=100) == [(0, "a"), (2, "c")]
    r.remove("c")
    assert active_names(r, F1, 3.6, segments=100) == [(0, "a")]  # ...until they leave...
    assert active_names(r, F1, 50.0, segments=100) == []  # ...or the grace is over


def test_a_freed_position_goes_to_the_next_downloader() -> None:
    r = reg()
    for i, name in enumerate("abcd"):
        r.register(name, name.encode(), ep(i), [], now=0.0)
    for name in "abc":
        r.note_active(name, F1, 0.0)
    r.remove("b")
    r.note_active("d", F1, 0.1)
    assert active_names(r, F1, 0.1) == [(0, "a"), (1, "d"), (2, "c")]


def test_forget_file_and_expiry_end_downloads() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.note_active("a", F1, 0.0)
    r.note_active("a", F2, 0.0)
    r.forget_file(F1)
    assert active_names(r, F1, 0.0) == []
    assert active_names(r, F2, 0.0) == [(0, "a")]
    assert r.expire(EXPIRY) == ["a"]
    assert active_names(r, F2, EXPIRY, idle_s=100.0) == []


def test_a_benched_downloader_is_left_out_of_the_trees() -> None:
    r = Registry(EXPIRY, strike_limit=1, bench_s=10.0)
    r.register("a", b"ra", ep(1), [], now=0.0)
    r.register("b", b"rb", ep(2), [], now=0.0)
    r.note_active("a", F1, 0.0)
    r.note_active("b", F1, 0.0)
    assert r.report_bad("a", F1, [(0, 1)], "checksum mismatch", now=0.5)
    assert active_names(r, F1, 0.5) == [(1, "b")]


# ---- identity (issue 9): strikes per reporter, planned runs, heartbeats, bulk changes


def test_one_reporter_alone_cannot_bench() -> None:
    r = reg(strike_limit=3, bench_s=30.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 100)])], now=0.0)
    for i in range(10):  # however many reports
        assert r.report_bad("a", F1, [(i, 1)], "checksum", now=1.0 + i, reporter="mallory") is False
    assert r.strikes_of(r.peers["a"]) == 2
    assert r.peers["a"].benched_until == 0.0
    assert r.report_bad("a", F1, [(20, 1)], "checksum", now=12.0, reporter="honest") is True


def test_strike_limit_one_benches_at_once() -> None:
    r = reg(strike_limit=1, bench_s=30.0)
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)])], now=0.0)
    assert r.report_bad("a", F1, [(0, 1)], "checksum", now=1.0, reporter="x") is True


def test_a_refusal_asks_the_accused_to_recheck() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [(F1, [(0, 10)]), (F2, [(0, 3)])], now=0.0)
    r.report_bad("a", F1, [(2, 3)], "refused", now=1.0, strike=False, reporter="x")
    r.report_bad("a", F2, [(0, 1)], "refused", now=1.0, strike=False, reporter="x")
    r.report_bad("a", F1, [(5, 1)], "refused", now=1.0, strike=False, reporter="y")
    assert r.take_recheck("a") == (F2, F1)
    assert r.take_recheck("a") == ()
    assert r.take_recheck("nobody") == ()


def test_planned_runs_are_remembered_per_reporter_and_bounded() -> None:
    r = reg()
    r.register("d", b"rd", ep(1), [], now=0.0)
    sources = ("a", "b", "broker")
    r.note_planned_runs("d", F1, sources, ((0, 64, 0), (64, 64, 1), (128, 64, 0), (192, 8, 2)), now=1.0)
    assert r.planned_runs("d", F1, "a", [(0, 200)], now=2.0) == [(0, 64), (128, 64)]
    assert r.planned_runs("d", F1, "b", [(60, 10)], now=2.0) == [(64, 6)]
    assert r.planned_runs("d", F1, "c", [(0, 10)], now=2.0) == []
    assert r.planned_runs("d", F1, "broker", [(0, 200)], now=2.0) == []  # the origin: never reported on
    assert r.planned_runs("d", F2, "a", [(0, 10)], now=2.0) == []
    assert r.planned_runs("x", F1, "a", [(0, 10)], now=2.0) == []
    # a replan adds to what was planned (its own source list)
    r.note_planned_runs("d", F1, ("broker", "a"), ((64, 64, 1), (300, 4, 0)), now=3.0)
    assert r.planned_runs("d", F1, "a", [(0, 200)], now=3.0) == [(0, 192)]
    assert r.planned_runs("d", F1, "b", [(0, 200)], now=3.0) == [(64, 64)]
    # too old: forgotten
    assert r.planned_runs("d", F1, "a", [(0, 10)], now=3.0 + 121.0) == []
    # at most MAX_PLANNED_FILES files per reporter, the oldest dropped
    for i in range(40):
        r.note_planned_runs("d", bytes([i]) * 32, ("a",), ((0, 1, 0),), now=4.0 + i)
    assert len(r.peers["d"].plans) == 16
    # at most MAX_PLANNED_RUNS entries per file: the oldest plans go first
    r.note_planned_runs("d", F2, ("a", "b"), ((0, 1, 1),), now=50.0)
    r.note_planned_runs("d", F2, ("a",), tuple((2 * i, 1, 0) for i in range(16_000)), now=50.0)
    assert r.planned_runs("d", F2, "b", [(0, 1)], now=50.0) == [(0, 1)]
    r.note_planned_runs("d", F2, ("a",), tuple((2 * i + 1, 1, 0) for i in range(40_000)), now=51.0)
    assert r.peers["d"].plans[F2].runs <= 16_384
    assert r.planned_runs("d", F2, "b", [(0, 1)], now=51.0) == []  # its plan went first
    assert r.planned_runs("d", F2, "a", [(1, 1)], now=51.0) == [(1, 1)]


def test_a_peer_keeps_the_highest_upload_rate_it_reported_since_registering() -> None:
    """up_bps is its recent peak (it falls back to 0 when it stops serving); up_peak is what
    its uplink has shown since it registered, which the next file's relay trees use."""
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0, token=b"t" * 16)
    assert r.peers["a"].up_peak == 0
    assert r.heartbeat("a", b"t" * 16, 1, now=1.0, up_bps=5_000) is None
    assert r.heartbeat("a", b"t" * 16, 2, now=2.0, up_bps=0) is None
    assert r.touch("a", now=3.0, up_bps=3_000)
    assert (r.peers["a"].up_bps, r.peers["a"].up_peak) == (3_000, 5_000)
    assert r.heartbeat("a", b"t" * 16, 3, now=4.0, up_bps=9_000) is None
    assert r.peers["a"].up_peak == 9_000
    assert r.heartbeat("a", b"x" * 16, 4, now=5.0, up_bps=10**12) == "token"  # refused: not counted
    assert r.peers["a"].up_peak == 9_000
    r.register("a", b"ra", ep(1), [], now=6.0, token=b"u" * 16)  # a new registration starts afresh
    assert r.peers["a"].up_peak == 0


def test_heartbeat_needs_the_token_a_growing_seq_and_the_key() -> None:
    r = reg()
    r.register("a", b"ra", ep(1), [], now=0.0, token=b"t" * 16)
    assert r.heartbeat("a", b"x" * 16, 1, now=1.0) == "token"
    assert r.heartbeat("nobody", b"t" * 16, 1, now=1.0) == "unknown"
    assert r.heartbeat("a", b"t" * 16, 1, now=1.0, up_bps=5) is None
    assert r.peers["a"].last_seen == 1.0 and r.peers["a"].up_bps == 5
    assert r.heartbeat("a", b"t" * 16, 1, now=2.0) == "replay"
    assert r.heartbeat("a", b"t" * 16, 0, now=2.0) == "replay"
    assert r.peers["a"].last_seen == 1.0
    assert r.heartbeat("a", b"t" * 16, 7, now=3.0) is None
    r.register("k", b"rk", ep(2), [], now=0.0, token=b"u" * 16, key=b"K" * 32)
    assert r.heartbeat("k", b"u" * 16, 1, now=1.0) == "key"
    assert r.heartbeat("k", b"u" * 16, 1, now=1.0, key=b"M" * 32) == "key"
    assert r.heartbeat("k", b"u" * 16, 1, now=1.0, key=b"K" * 32) is None


def test_bulk_changes_match_run_by_run_changes() -> None:
    import random

    rng = random.Random(3)
    for _ in range(20):
        r = reg()
        base = [(rng.randrange(0, 5000), rng.randrange(1, 40)) for _ in range(rng.randrange(0, 300))]
        adds = [(rng.randrange(0, 5000), rng.randrange(1, 40)) for _ in range(rng.randrange(65, 300))]
        removes = [(rng.randrange(0, 5000), rng.randrange(1, 40)) for _ in range(rng.randrange(65, 300))]
        r.register("a", b"ra", ep(1), [(F1, base)], now=0.0)
        r.add_runs("a", F1, adds)
        expected = SegmentSet(base)
        for first, count in adds:
            expected.add(first, count)
        assert r.holdings_of("a", F1) == expected
        assert r.holders(F1, now=0.0)[0].segments == expected  # the by-file view follows
        r.remove_runs("a", F1, removes)
        for first, count in removes:
            expected.remove(first, count)
        assert r.holdings_of("a", F1) == expected
        assert r.holders(F1, now=0.0)[0].segments == expected if expected else True


def test_a_register_of_65536_runs_in_reverse_order_is_cheap() -> None:
    import time

    r = reg()
    runs = [(3 * i, 2) for i in range(65_536)][::-1]
    start = time.perf_counter()
    r.register("a", b"ra", ep(1), [(F1, runs)], now=0.0)
    r.remove_runs("a", F1, runs[::2])
    assert time.perf_counter() - start < 1.0
    assert r.holdings_of("a", F1).run_count() == 32_768


def test_holders_outside_a_crowd_follow_joins_leaves_and_a_new_crowd() -> None:
    # The names outside a GET's crowd are kept between GETs: every change of who holds the file,
    # and a new crowd object, must show in the next answer.
    r = reg()
    for n, name in enumerate("abcd", 1):
        r.register(name, name.encode(), ep(n), [(F1, [(0, 4)])], now=0.0)
    crowd = frozenset({"a", "b"})
    assert names(r.holders(F1, now=1.0, skip=crowd)) == ["c", "d"]
    r.add_runs("a", F2, [(0, 1)])  # another file: nothing changes here
    assert names(r.holders(F1, now=1.0, skip=crowd)) == ["c", "d"]
    r.register("e", b"e", ep(5), [], now=1.0)
    r.add_runs("e", F1, [(0, 1)])  # a new holder
    assert names(r.holders(F1, now=1.0, skip=crowd)) == ["c", "d", "e"]
    r.remove("c")  # a holder leaves
    assert names(r.holders(F1, now=1.0, skip=crowd)) == ["d", "e"]
    r.register("d", b"d2", ep(4), [], now=2.0)  # re-registers holding nothing
    assert names(r.holders(F1, now=2.0, skip=crowd)) == ["e"]
    assert names(r.holders(F1, now=2.0, skip=frozenset({"a"}))) == ["b", "e"]  # a new crowd
    r.forget_file(F1)
    assert r.holders(F1, now=2.0, skip=crowd) == []
    r.add_runs("a", F1, [(0, 1)])
    r.add_runs("c", F1, [(0, 1)])  # "c" left: ignored
    assert names(r.holders(F1, now=2.0, skip=frozenset())) == ["a"]
