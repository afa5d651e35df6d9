"""Unit tests for peer/download.py: the pure state of one download."""

from __future__ import annotations

import random

import pytest

from common.ranges import Run, SegmentSet
from peer.download import BROKER, Download, SegmentState
from peer.transfer import SourceTiming

pytestmark = pytest.mark.timeout(30)

BEP = "tcp://origin:9000"


def ep(name: str) -> str:
    return f"tcp://{name}:7000"


Src = tuple[str, str, SegmentSet | None]


def peer(name: str, runs: list[Run] | None = None) -> Src:
    return (name, ep(name), None if runs is None else SegmentSet(runs))


def broker() -> Src:
    return (BROKER, BEP, None)


def states(d: Download, first: int, count: int) -> set[SegmentState]:
    return {SegmentState(s) for s in d.state[first : first + count]}


def queued(d: Download, name: str) -> set[int]:
    return {i for f, c in d.sources[name].queue for i in range(f, f + c)}


def drain(d: Download, name: str) -> list[Run]:
    """Take every run this source has queued (marking them PENDING)."""
    out = []
    while (run := d.take(name)) is not None:
        out.append(run)
    return out


def finish(d: Download, name: str, run: Run) -> None:
    d.on_reply(name, *run)
    d.on_done(name, *run)


def drive_to_completion(d: Download, limit: int = 10_000) -> None:
    """Every live source serves everything it is asked, until no source has work."""
    for _ in range(limit):
        progressed = False
        for name in list(d.sources):
            run = d.take(name)
            if run is not None:
                finish(d, name, run)
                progressed = True
        if not progressed:
            return
    raise AssertionError("no end")


def live_queued(d: Download) -> list[int]:
    out: list[int] = []
    for s in d.sources.values():
        if not s.dead:
            for f, c in s.queue:
                out.extend(range(f, f + c))
    return out


def accounted(d: Download) -> None:
    """Invariants: the counters match the states; queues hold MISSING segments, each once; and
    `deferred()` is exactly the MISSING segments that no live queue holds (left out of the plan,
    or stuck)."""
    count = [0, 0, 0]
    for st in d.state:
        count[st] += 1
    assert d.done == count[SegmentState.DONE]
    assert d.pending == count[SegmentState.PENDING]
    queued = live_queued(d)
    assert len(queued) == len(set(queued)), "a segment is queued twice"
    assert all(d.state[i] == SegmentState.MISSING for i in queued), "a queue holds a segment not MISSING"
    assert d.queued() == len(queued)
    assert d.deferred() == count[SegmentState.MISSING] - len(queued)
    assert all(d.state[i] == SegmentState.MISSING for i in d.stuck)


def covered(d: Download) -> None:
    """Invariant when every plan covered every segment: a MISSING segment is queued at a live
    source or reported stuck (nothing is silently dropped)."""
    accounted(d)
    live = set(live_queued(d))
    stuck = set(d.stuck)
    for i, st in enumerate(d.state):
        if st == SegmentState.MISSING:
            assert i in live or i in stuck, f"segment {i} is MISSING but nowhere to be fetched"


# --------------------------------------------------------------------------- take


def test_take_respects_batch_and_marks_pending() -> None:
    d = Download(100, SegmentSet(), batch=16)
    d.replan([broker()], [(0, 100, 0)])
    assert d.take(BROKER) == (0, 16)
    assert states(d, 0, 16) == {SegmentState.PENDING}
    assert states(d, 16, 84) == {SegmentState.MISSING}
    assert d.sources[BROKER].in_flight == 1
    rest = drain(d, BROKER)
    assert rest == [(16, 16), (32, 16), (48, 16), (64, 16), (80, 16), (96, 4)]
    assert d.take(BROKER) is None
    assert states(d, 0, 100) == {SegmentState.PENDING}
    assert d.sources[BROKER].in_flight == 7
    assert len(d.missing()) == 100  # PENDING is not DONE
    assert not d.complete
    assert d.sources_with_work() == []


def test_take_skips_segments_that_are_no_longer_missing() -> None:
    d = Download(20, SegmentSet(), batch=16)
    d.replan([peer("a"), broker()], [(0, 20, 0)])
    d.on_done("b-late", 3, 3)  # e.g. an earlier request answered
    assert d.take("a") == (0, 3)
    assert d.take("a") == (6, 14)
    assert d.take("a") is None


def test_take_unknown_source() -> None:
    d = Download(10, SegmentSet(), batch=4)
    d.replan([broker()], [(0, 10, 0)])
    assert d.take("nobody") is None


def test_take_follows_plan_order_per_source() -> None:
    d = Download(192, SegmentSet(), batch=64)
    d.replan([peer("a"), peer("b"), broker()], [(128, 64, 0), (0, 64, 1), (64, 64, 0)])
    assert drain(d, "a") == [(128, 64), (64, 64)]
    assert drain(d, "b") == [(0, 64)]
    assert drain(d, BROKER) == []


# --------------------------------------------------------------------------- outcomes


def test_on_done_counts_each_segment_once() -> None:
    d = Download(10, SegmentSet(), batch=10)
    d.replan([peer("a"), broker()], [(0, 10, 0)])
    run = d.take("a")
    assert run == (0, 10)
    d.on_reply("a", *run)
    d.on_done("a", 0, 4)  # a part of the run
    assert d.done == 4
    assert states(d, 0, 4) == {SegmentState.DONE}
    assert states(d, 4, 6) == {SegmentState.PENDING}
    d.on_done("a", 2, 4)  # overlaps: only 4, 5 are new
    assert d.done == 6
    d.on_done(BROKER, 6, 4)
    assert d.complete
    assert d.missing() == SegmentSet()
    assert d.source_counts() == {"a": 6, BROKER: 4}
    assert d.sources["a"].in_flight == 0


def test_on_reply_never_goes_negative() -> None:
    d = Download(4, SegmentSet(), batch=4)
    d.replan([broker()], [(0, 4, 0)])
    d.on_reply(BROKER, 0, 4)
    d.on_reply("ghost", 0, 4)
    assert d.sources[BROKER].in_flight == 0


def test_on_refused_moves_segments_to_another_holder_then_the_broker() -> None:
    d = Download(10, SegmentSet(), batch=10)
    d.replan([peer("a"), peer("b"), broker()], [(0, 10, 0)])
    assert d.take("a") == (0, 10)
    d.on_reply("a", 0, 10)
    d.on_refused("a", [(0, 10)])
    assert states(d, 0, 10) == {SegmentState.MISSING}
    assert queued(d, "b") == set(range(10))  # a peer first
    assert queued(d, BROKER) == set()
    assert all("a" in d.excluded[i] for i in range(10))
    assert d.take("b") == (0, 10)
    d.on_reply("b", 0, 10)
    d.on_refused("b", [(0, 10)])
    assert queued(d, BROKER) == set(range(10))  # the broker last
    assert d.take(BROKER) == (0, 10)
    d.on_reply(BROKER, 0, 10)
    d.on_refused(BROKER, [(0, 10)])
    assert sorted(d.stuck) == list(range(10))
    covered(d)


def test_on_refused_removes_from_holdings_of_a_partial_source() -> None:
    d = Download(10, SegmentSet(), batch=10)
    d.replan([peer("a", [(0, 10)]), broker()], [(0, 10, 0)])
    d.take("a")
    d.on_refused("a", [(2, 3)])
    holds = d.sources["a"].holds
    assert holds is not None
    assert holds.runs() == [(0, 2), (5, 5)]
    assert queued(d, BROKER) == {2, 3, 4}
    assert states(d, 2, 3) == {SegmentState.MISSING}
    assert states(d, 0, 2) == {SegmentState.PENDING}


def test_requeue_only_to_peers_that_hold_the_segment() -> None:
    d = Download(10, SegmentSet(), batch=10)
    d.replan([peer("a"), peer("b", [(0, 3)]), broker()], [(0, 10, 0)])
    d.take("a")
    d.on_refused("a", [(0, 10)])
    assert queued(d, "b") == {0, 1, 2}
    assert queued(d, BROKER) == set(range(3, 10))


def test_requeue_picks_the_least_busy_peer() -> None:
    d = Download(100, SegmentSet(), batch=10)
    d.replan([peer("a"), peer("busy"), peer("idle"), broker()], [(0, 10, 0), (10, 50, 1), (60, 40, 3)])
    d.take("a")
    d.on_failed("a", 0, 10, timed_out=False)
    assert queued(d, "idle") == set(range(10))
    assert queued(d, "busy") == set(range(10, 60))
    assert queued(d, BROKER) == set(range(60, 100))


def test_in_flight_counts_as_busy() -> None:
    d = Download(40, SegmentSet(), batch=10)
    d.replan([peer("a"), peer("b"), peer("c"), broker()], [(0, 10, 0), (10, 20, 1), (30, 10, 2)])
    d.take("b")
    d.take("b")  # b: nothing queued, two requests in flight (= 20 segments)
    d.take("a")
    d.on_failed("a", 0, 10, timed_out=False)
    assert queued(d, "c") == set(range(0, 10)) | set(range(30, 40))
    assert queued(d, "b") == set()


def test_bad_bytes_never_kill_a_source_but_exclude_it() -> None:
    d = Download(10, SegmentSet(), batch=1, dead_after=2)
    d.replan([peer("a"), broker()], [(0, 10, 0)])
    for i in range(5):
        assert d.take("a") == (i, 1)
        d.on_reply("a", i, 1)
        d.on_failed("a", i, 1, timed_out=False)
    assert not d.sources["a"].dead
    assert d.sources["a"].timeouts_in_a_row == 0
    assert queued(d, BROKER) == set(range(5))
    assert all("a" in d.excluded[i] for i in range(5))


def test_two_timeouts_in_a_row_kill_a_source_and_requeue_its_queue() -> None:
    d = Download(10, SegmentSet(), batch=2, dead_after=2)
    d.replan([peer("a"), peer("b"), broker()], [(0, 10, 0)])
    assert d.take("a") == (0, 2)
    d.on_reply("a", 0, 2)
    d.on_failed("a", 0, 2, timed_out=True)
    assert not d.sources["a"].dead
    assert queued(d, "b") == {0, 1}
    assert d.take("a") == (2, 2)
    d.on_reply("a", 2, 2)
    d.on_failed("a", 2, 2, timed_out=True)
    assert d.sources["a"].dead
    assert list(d.sources["a"].queue) == []
    assert d.take("a") is None
    assert "a" not in d.sources_with_work()
    assert queued(d, "b") == set(range(10))  # its queue and its failed runs, all at b
    assert queued(d, BROKER) == set()
    covered(d)
    drive_to_completion(d)
    assert d.complete
    assert d.source_counts() == {"b": 10}


def test_a_success_resets_the_timeout_count() -> None:
    d = Download(10, SegmentSet(), batch=1, dead_after=2)
    d.replan([peer("a"), broker()], [(0, 10, 0)])
    d.take("a")
    d.on_failed("a", 0, 1, timed_out=True)
    run = d.take("a")
    assert run == (1, 1)
    finish(d, "a", run)
    d.take("a")
    d.on_failed("a", 2, 1, timed_out=True)
    assert not d.sources["a"].dead
    d.take("a")
    d.on_failed("a", 3, 1, timed_out=True)
    assert d.sources["a"].dead


def test_one_timeout_steers_elsewhere_but_does_not_exclude() -> None:
    d = Download(4, SegmentSet(), batch=4, dead_after=3)
    d.replan([peer("a"), peer("b"), broker()], [(0, 4, 0)])
    d.take("a")
    d.on_failed("a", 0, 4, timed_out=True)
    assert queued(d, "b") == set(range(4))  # another peer first
    assert d.excluded == {}  # a slow source is not excluded
    d.take("b")
    d.on_failed("b", 0, 4, timed_out=True)
    assert queued(d, "a") == set(range(4))  # so it may be tried again
    covered(d)


def test_a_slow_broker_is_never_given_up_on() -> None:
    d = Download(4, SegmentSet(), batch=4, dead_after=2)
    d.replan([broker()], [(0, 4, 0)])
    for _ in range(5):  # timeouts in a row: the last resort is asked again each time
        assert d.take(BROKER) == (0, 4)
        d.on_reply(BROKER, 0, 4)
        d.on_failed(BROKER, 0, 4, timed_out=True)
        assert not d.sources[BROKER].dead
        assert d.stuck == []
        assert queued(d, BROKER) == set(range(4))
    covered(d)


def test_a_slow_only_peer_is_dropped_after_timeouts_in_a_row() -> None:
    d = Download(4, SegmentSet(), batch=4, dead_after=2)
    d.replan([peer("a")], [(0, 4, 0)])
    assert d.take("a") == (0, 4)
    d.on_failed("a", 0, 4, timed_out=True)
    assert d.stuck == []
    assert queued(d, "a") == set(range(4))  # the only source: asked again
    assert d.take("a") == (0, 4)
    d.on_failed("a", 0, 4, timed_out=True)  # second in a row: dead
    assert d.sources["a"].dead
    assert sorted(d.stuck) == [0, 1, 2, 3]


def test_a_slow_peer_is_avoided_when_the_broker_can_serve() -> None:
    d = Download(4, SegmentSet(), batch=4, dead_after=5)
    d.replan([peer("a"), broker()], [(0, 4, 0)])
    d.take("a")
    d.on_failed("a", 0, 4, timed_out=True)
    assert queued(d, BROKER) == set(range(4))
    assert queued(d, "a") == set()


def test_a_slow_peer_is_retried_when_the_broker_is_excluded() -> None:
    d = Download(4, SegmentSet(), batch=4, dead_after=5)
    d.replan([peer("a"), broker()], [(0, 4, 1)])
    d.take(BROKER)
    d.on_failed(BROKER, 0, 4, timed_out=False)  # bad bytes: broker excluded for 0..3
    assert queued(d, "a") == set(range(4))
    d.take("a")
    d.on_failed("a", 0, 4, timed_out=True)
    assert queued(d, "a") == set(range(4))
    assert d.stuck == []


def test_stuck_without_any_source_left() -> None:
    d = Download(6, SegmentSet(), batch=6)
    d.replan([peer("a")], [(0, 6, 0)])  # no broker in the plan
    d.take("a")
    d.on_failed("a", 0, 6, timed_out=False)
    assert sorted(d.stuck) == list(range(6))
    assert d.sources_with_work() == []
    covered(d)


def test_stuck_only_for_segments_without_a_source() -> None:
    d = Download(6, SegmentSet(), batch=6)
    d.replan([peer("a"), peer("b", [(0, 2)])], [(0, 6, 0)])
    d.take("a")
    d.on_failed("a", 0, 6, timed_out=False)
    assert sorted(d.stuck) == [2, 3, 4, 5]
    assert queued(d, "b") == {0, 1}


def test_failed_segments_already_done_are_left_alone() -> None:
    d = Download(4, SegmentSet(), batch=4)
    d.replan([peer("a"), broker()], [(0, 4, 0)])
    d.take("a")
    d.on_done("a", 0, 2)
    d.on_failed("a", 0, 4, timed_out=False)
    assert states(d, 0, 2) == {SegmentState.DONE}
    assert queued(d, BROKER) == {2, 3}
    assert 0 not in d.excluded


# --------------------------------------------------------------------------- plans


def test_segments_left_out_of_the_plan_are_deferred() -> None:
    d = Download(30, SegmentSet(), batch=30)
    d.replan([peer("a", [(0, 10)]), broker()], [(0, 5, 0), (20, 5, 1)])
    assert queued(d, "a") == set(range(5))
    assert queued(d, BROKER) == set(range(20, 25))
    assert d.queued() == 10
    assert d.deferred() == 20  # left out: another downloader is fetching them from the origin
    assert states(d, 5, 15) == {SegmentState.MISSING}
    assert d.stuck == []
    accounted(d)
    # plenty of work queued: no plan wanted yet; running low: ask again
    assert not d.wants_plan(low_water=5)
    assert d.wants_plan(low_water=10)
    # a plan replaces the queues: the next one names everything still missing
    d.replan([peer("a", [(0, 10)]), broker()], [(0, 10, 0), (10, 20, 1)])
    assert d.deferred() == 0
    assert not d.wants_plan(low_water=1000)
    covered(d)
    drive_to_completion(d)
    assert d.complete


def test_wants_plan_once_queued_work_drains() -> None:
    d = Download(100, SegmentSet(), batch=10)
    d.replan([broker()], [(0, 50, 0)])
    assert d.deferred() == 50
    assert not d.wants_plan(low_water=20)
    runs = drain(d, BROKER)
    assert len(runs) == 5
    assert d.pending == 50
    assert d.queued() == 0
    assert d.deferred() == 50
    assert d.wants_plan(low_water=0)
    for run in runs:
        finish(d, BROKER, run)
    assert d.pending == 0
    assert d.done == 50
    assert d.wants_plan(low_water=0)
    accounted(d)


def test_no_plan_wanted_when_nothing_is_deferred() -> None:
    d = Download(10, SegmentSet(), batch=4)
    d.replan([broker()], [(0, 10, 0)])
    assert not d.wants_plan(low_water=100)
    drive_to_completion(d)
    assert d.complete
    assert d.deferred() == 0
    assert not d.wants_plan(low_water=100)


def test_invalid_plan_entries_are_ignored() -> None:
    d = Download(10, SegmentSet(), batch=10)
    d.replan([peer("a"), broker()], [(0, 10, 5), (5, 10, 0), (0, 10, -1), (0, 2, 2)])
    assert queued(d, "a") == set()
    assert queued(d, BROKER) == set()
    assert d.deferred() == 10
    accounted(d)


def test_replan_keeps_done_and_pending_segments() -> None:
    d = Download(100, SegmentSet(), batch=10)
    d.replan([broker()], [(0, 100, 0)])
    first = d.take(BROKER)
    second = d.take(BROKER)
    assert (first, second) == ((0, 10), (10, 10))
    finish(d, BROKER, first)  # 0..9 DONE, 10..19 PENDING at the broker
    d.replan([peer("a"), peer("b"), broker()], [(0, 50, 0), (50, 50, 1)])
    assert states(d, 0, 10) == {SegmentState.DONE}
    assert states(d, 10, 10) == {SegmentState.PENDING}
    assert d.sources[BROKER].in_flight == 1
    from_a, from_b = drain(d, "a"), drain(d, "b")
    got = {i for f, c in from_a + from_b for i in range(f, f + c)}
    assert got == set(range(20, 100))
    assert from_a == [(20, 10), (30, 10), (40, 10)]
    finish(d, BROKER, second)
    for run in from_a:
        finish(d, "a", run)
    for run in from_b:
        finish(d, "b", run)
    assert d.complete
    assert d.source_counts() == {BROKER: 20, "a": 30, "b": 50}


def test_replan_keeps_a_dropped_source_while_it_has_requests_in_flight() -> None:
    d = Download(20, SegmentSet(), batch=5)
    d.replan([peer("old"), broker()], [(0, 20, 0)])
    run = d.take("old")
    assert run == (0, 5)
    d.replan([peer("new"), broker()], [(0, 20, 0)])
    assert "old" in d.sources
    assert list(d.sources["old"].queue) == []  # its queue moved on
    assert queued(d, "new") == set(range(5, 20))
    finish(d, "old", run)  # the late answer still counts
    assert d.done == 5
    assert d.source_counts() == {"old": 5}
    # once it has answered, a further replan drops it
    d.replan([peer("new"), broker()], [(0, 20, 0)])
    assert "old" not in d.sources


def test_replan_drops_an_idle_source_and_its_queue() -> None:
    d = Download(20, SegmentSet(), batch=5)
    d.replan([peer("gone"), broker()], [(0, 20, 0)])
    d.replan([broker()], [(0, 10, 0)])
    assert "gone" not in d.sources
    assert queued(d, BROKER) == set(range(10))
    assert d.deferred() == 10  # what only "gone" had queued waits for the next plan
    accounted(d)


def test_replan_clears_stuck() -> None:
    d = Download(4, SegmentSet(), batch=4)
    d.replan([peer("a")], [(0, 4, 0)])
    d.take("a")
    d.on_failed("a", 0, 4, timed_out=False)
    assert sorted(d.stuck) == [0, 1, 2, 3]
    d.replan([peer("b"), broker()], [(0, 4, 0)])
    assert d.stuck == []
    assert queued(d, "b") == set(range(4))
    covered(d)


def test_replan_gives_a_dead_source_another_chance() -> None:
    d = Download(20, SegmentSet(), batch=5, dead_after=2)
    d.replan([peer("a"), broker()], [(0, 20, 0)])
    for _ in range(2):
        run = d.take("a")
        assert run is not None
        d.on_reply("a", *run)
        d.on_failed("a", *run, timed_out=True)
    assert d.sources["a"].dead
    assert d.take("a") is None
    d.replan([peer("a"), broker()], [(0, 20, 0)])  # the broker still lists a: it is alive
    assert not d.sources["a"].dead
    assert d.sources["a"].timeouts_in_a_row == 0
    assert d.take("a") == (0, 5)


def test_replan_naming_a_dead_source_does_not_strand_segments() -> None:
    d = Download(20, SegmentSet(), batch=5, dead_after=1)
    d.replan([peer("a"), broker()], [(0, 20, 0)])
    d.take("a")
    d.on_failed("a", 0, 5, timed_out=True)  # a is dead; everything moved to the broker
    assert d.sources["a"].dead
    # the broker still lists a (it is registered and heartbeating) and plans from it
    d.replan([peer("a"), broker()], [(0, 20, 0)])
    covered(d)
    drive_to_completion(d)
    assert d.complete or d.stuck


# --------------------------------------------------------------------------- resumed downloads


def test_resumed_download_never_requests_held_segments() -> None:
    held = SegmentSet([(0, 50), (70, 5)])
    d = Download(100, held, batch=8)
    assert d.done == 55
    assert d.missing().runs() == [(50, 20), (75, 25)]
    assert not d.complete
    d.replan([peer("a"), broker()], [(0, 64, 0), (64, 36, 1)])
    taken = drain(d, "a") + drain(d, BROKER)
    got = [i for f, c in taken for i in range(f, f + c)]
    assert sorted(got) == [*range(50, 70), *range(75, 100)]
    assert all(c <= 8 for _, c in taken)
    for run in taken:
        d.on_done("x", *run)
    assert d.complete
    assert d.source_counts() == {"local": 55, "x": 45}


def test_fully_held_download_is_complete_at_once() -> None:
    d = Download(7, SegmentSet.full(7), batch=4)
    assert d.complete
    d.replan([broker()], [(0, 7, 0)])
    assert d.take(BROKER) is None
    assert d.missing() == SegmentSet()
    assert d.source_counts() == {"local": 7}


def test_empty_file() -> None:
    d = Download(0, SegmentSet(), batch=4)
    assert d.complete
    d.replan([broker()], [])
    assert d.take(BROKER) is None
    assert d.source_counts() == {}


# --------------------------------------------------------------------------- randomized


@pytest.mark.parametrize("seed", range(20))
def test_random_outcomes_never_lose_a_segment(seed: int) -> None:
    """Random replies, refusals, bad bytes and timeouts: every segment stays fetchable or stuck,
    and once the sources behave, the download either completes or reports stuck segments."""
    rng = random.Random(seed)
    n = rng.randrange(1, 200)
    batch = rng.choice([1, 4, 16, 64])
    held = SegmentSet((rng.randrange(n), rng.randrange(1, 20)) for _ in range(rng.randrange(3)))
    held = SegmentSet(held.intersect_run(0, n))
    d = Download(n, held, batch=batch, dead_after=rng.choice([1, 2, 3]))
    names = [f"p{k}" for k in range(rng.randrange(0, 4))]
    sources: list[Src] = [
        peer(name, None if rng.random() < 0.5 else [(rng.randrange(n), rng.randrange(1, n + 1))])
        for name in names
    ]
    if rng.random() < 0.9:
        sources.append(broker())
    plan = [(f, min(c, n - f), rng.randrange(len(sources) or 1)) for f, c in split(n, rng)]
    d.replan(sources, plan)
    deferring = not sources  # until a plan leaves segments out, none may go missing
    if not deferring:
        covered(d)
    in_flight: list[tuple[str, Run]] = []
    for _ in range(300):
        if rng.random() < 0.03:  # a fresh plan: any subset of the sources, some segments deferred
            subset = [s for s in sources if rng.random() < 0.7]
            fresh = [(f, c, rng.randrange(len(subset) or 1)) for f, c in split(n, rng) if rng.random() < 0.8]
            d.replan(subset, fresh)
            deferring = True
        elif in_flight and (rng.random() < 0.5 or not d.sources_with_work()):
            name, run = in_flight.pop(rng.randrange(len(in_flight)))
            d.on_reply(name, *run)
            roll = rng.random()
            if roll < 0.5:
                d.on_done(name, *run)
            elif roll < 0.65:
                d.on_refused(name, [run])
            elif roll < 0.8:
                d.on_failed(name, *run, timed_out=False)
            else:
                d.on_failed(name, *run, timed_out=True)
        else:
            work = d.sources_with_work()
            if not work:
                break
            name = rng.choice(work)
            run = d.take(name)
            if run is not None:
                assert 1 <= run[1] <= batch
                assert states(d, *run) == {SegmentState.PENDING}
                assert all(i not in held for i in range(*_span(run)))
                in_flight.append((name, run))
        accounted(d)
        if not deferring:
            covered(d)
    for name, run in in_flight:
        d.on_reply(name, *run)
        d.on_done(name, *run)
    accounted(d)
    drive_to_completion(d)
    accounted(d)
    # never silently stalled: done, or stuck (the shell replans), or asking for a plan
    assert d.complete or d.stuck or d.wants_plan(low_water=0)
    # a full plan with a working broker always finishes it
    d.replan([broker()], [(0, n, 0)])
    covered(d)
    drive_to_completion(d)
    assert d.complete
    assert sum(d.source_counts().values()) == n


def split(n: int, rng: random.Random) -> list[Run]:
    out, pos = [], 0
    while pos < n:
        c = rng.randrange(1, 40)
        out.append((pos, min(c, n - pos)))
        pos += c
    rng.shuffle(out)
    return out


def _span(run: Run) -> tuple[int, int]:
    return run[0], run[0] + run[1]


# --------------------------------------------------------------------------- endgame


def endgame_download() -> Download:
    """Two peers; "a" has run (0, 4) in flight, "b" finished its share and is idle."""
    d = Download(8, SegmentSet(), batch=4)
    d.replan([peer("a"), peer("b"), broker()], [(0, 4, 0), (4, 4, 1)])
    assert d.take("a") == (0, 4)
    assert d.take("b") == (4, 4)
    d.on_done("b", 4, 4)
    return d


def test_endgame_duplicates_a_straggler_to_an_idle_peer_once() -> None:
    d = endgame_download()
    assert d.in_endgame()
    stragglers = [("a", (0, 4))]
    assert d.take_endgame(BROKER, stragglers) is None  # never the origin
    assert d.take_endgame("a", stragglers) is None  # not to the source that has it in flight
    assert d.take_endgame("b", stragglers) == (0, 4)
    assert d.take_endgame("b", stragglers) is None  # b is busy now, and the run has its duplicate
    assert list(d.outstanding[0:4]) == [2, 2, 2, 2]


def test_endgame_first_verified_copy_wins() -> None:
    d = endgame_download()
    assert d.take_endgame("b", [("a", (0, 4))]) == (0, 4)
    d.on_done("b", 0, 4)
    assert d.complete and d.segment_sources[:4] == ["b"] * 4
    assert d.not_done_runs(0, 4) == []  # the late original must write nothing
    d.on_done("a", 0, 4)  # ... and changes nothing
    assert d.segment_sources[:4] == ["b"] * 4 and d.done == 8


def test_endgame_duplicate_failing_leaves_the_original_in_charge() -> None:
    d = endgame_download()
    assert d.take_endgame("b", [("a", (0, 4))]) == (0, 4)
    d.on_failed("b", 0, 4, timed_out=False)
    assert states(d, 0, 4) == {SegmentState.PENDING}  # "a" still has it in flight
    assert queued(d, BROKER) == set()
    d.on_failed("a", 0, 4, timed_out=True)  # now nobody has it: requeued, b excluded (bad bytes)
    assert states(d, 0, 4) == {SegmentState.MISSING}
    assert queued(d, BROKER) == set(range(4))


def test_endgame_respects_holdings_and_exclusions() -> None:
    d = Download(8, SegmentSet(), batch=4)
    d.replan([peer("a"), peer("c", [(4, 4)]), broker()], [(0, 4, 0), (4, 4, 1)])
    d.take("a")
    d.take("c")
    d.on_done("c", 4, 4)
    assert d.take_endgame("c", [("a", (0, 4))]) is None  # c does not hold segments 0-3


def test_not_in_endgame_while_work_is_queued_or_deferred() -> None:
    d = Download(8, SegmentSet(), batch=4)
    d.replan([peer("a"), broker()], [(0, 8, 0)])
    d.take("a")
    assert not d.in_endgame()  # (4, 4) still queued
    d2 = Download(8, SegmentSet(), batch=4)
    d2.replan([peer("a"), broker()], [(0, 4, 0)])  # 4-7 deferred
    d2.take("a")
    assert not d2.in_endgame() and d2.deferred() == 4


def test_reply_times_adapt_the_timeout_with_the_floor_kept() -> None:
    times = SourceTiming()
    assert times.timeout(2.0) == 2.0 and times.patience(2.0) == 0.5  # nothing measured yet
    for _ in range(20):
        times.sample(0.01)  # a fast source
    assert times.timeout(2.0) == 2.0  # never below the floor
    assert times.patience(2.0) == 0.5
    slow = SourceTiming()
    for _ in range(20):
        slow.sample(3.0)  # a loaded one: waited for, not given up on
    assert 3.0 < slow.timeout(2.0) <= 60.0
    assert slow.patience(2.0) == pytest.approx(6.0, rel=0.01)


def test_parallel_lanes_arriving_together_do_not_inflate_the_rate() -> None:
    """Two lanes served side by side by a 0.6 MB/s source both finish at the end of each 0.11 s
    round: the second reply's interval is a microsecond. The rate stays the source's, not 50
    times it (which sized requests to whole blocks a relay parent was still fetching)."""
    timing = SourceTiming()
    now = 0.0
    for _ in range(20):
        sent = now
        now += 0.11
        timing.delivered(2 * 16384, sent, now)
        timing.delivered(2 * 16384, sent, now + 1e-6)
        now += 1e-6
    assert timing.rate_bps == pytest.approx(4 * 16384 / 0.11, rel=0.05)


# --------------------------------------------------------------------------- later


def test_later_under_the_current_plan_asks_the_same_relay_again() -> None:
    d = Download(128, SegmentSet(), batch=64)
    d.replan([peer("relay", [(0, 128)]), broker()], [(0, 64, 0), (64, 1, 0), (65, 63, 1)])
    first = d.take("relay")
    assert first == (0, 64)
    request = d.last_request
    assert request is not None and request.plan == d.plans
    d.on_later("relay", [(0, 64)], now=1.0, limit_s=5.0, asked_under=request.plan)
    assert queued(d, "relay") == set(range(65))  # back at the front of the same relay
    assert states(d, 0, 64) == {SegmentState.MISSING}
    accounted(d)
    # A relay that has delivered nothing of this download yet is still being fed (deep trees
    # take seconds to fill): the limit does not run, the run stays with it.
    assert d.take("relay") == (0, 64)
    d.on_later("relay", [(0, 64)], now=6.5, limit_s=5.0, asked_under=d.plans)
    assert queued(d, "relay") == set(range(65))
    accounted(d)
    # Once it has delivered, a run `later` there for limit_s goes elsewhere (here the origin).
    assert d.take("relay") == (0, 64)
    assert d.take("relay") == (64, 1)
    d.on_done("relay", 64, 1)
    d.on_later("relay", [(0, 64)], now=7.0, limit_s=5.0, asked_under=d.plans)
    assert queued(d, "relay") == set(range(64))
    assert d.take("relay") == (0, 64)
    d.on_later("relay", [(0, 64)], now=12.5, limit_s=5.0, asked_under=d.plans)
    assert queued(d, "relay") == set() and set(range(64)) <= queued(d, BROKER)
    accounted(d)


def test_later_under_an_older_plan_waits_for_the_next_plan() -> None:
    d = Download(128, SegmentSet(), batch=64)
    d.replan([peer("relay", [(0, 128)]), broker()], [(0, 128, 0)])
    assert d.take("relay") == (0, 64)
    request = d.last_request
    assert request is not None
    # a replan while the request is parked at the relay: the run is PENDING, so no plan has it
    d.replan([peer("relay", [(0, 128)]), broker()], [(64, 64, 0)])
    d.on_later("relay", [(0, 64)], now=1.0, limit_s=5.0, asked_under=request.plan)
    assert not queued(d, "relay") & set(range(64)) and not queued(d, BROKER)
    assert states(d, 0, 64) == {SegmentState.MISSING}
    assert d.deferred() == 64  # the next plan places them on the tree of now
    accounted(d)
    d.replan([peer("other", [(0, 64)]), broker()], [(0, 64, 0)])
    assert queued(d, "other") == set(range(64))
    accounted(d)
