"""Unit tests for broker/planner.py: plan_download is a pure function of holdings and loads."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from broker.planner import BROKER_SOURCE, Plan, plan_download
from broker.registry import Holder
from common.ranges import Run, SegmentSet

pytestmark = pytest.mark.timeout(30)

ORIGIN = "tcp://origin:9000"


def holder(name: str, runs: list[Run], load: float = 0.0) -> Holder:
    return Holder(name, f"tcp://{name}:7000", SegmentSet(runs), load)


def full(name: str, n: int, load: float = 0.0) -> Holder:
    return holder(name, [(0, n)], load)


def assignment(plan: Plan) -> dict[int, str]:
    """segment -> source name; fails on a segment planned twice."""
    out: dict[int, str] = {}
    for first, count, index in plan.entries:
        assert count >= 1
        assert 0 <= index < len(plan.sources)
        for i in range(first, first + count):
            assert i not in out, f"segment {i} planned twice"
            out[i] = plan.sources[index].name
    return out


def check_plan(
    plan: Plan, segment_count: int, need: SegmentSet, holders: list[Holder], block: int
) -> dict[int, str]:
    """Invariants every plan must satisfy; returns the segment -> source assignment."""
    got = assignment(plan)
    assert set(got) == set(need), "every needed segment exactly once, nothing else"
    # sources: holders in order, then the broker, last
    assert [s.name for s in plan.sources] == [h.name for h in holders] + [BROKER_SOURCE]
    assert plan.sources[-1].endpoint == ORIGIN
    assert plan.sources[-1].runs is None
    by_name = {h.name: h for h in holders}
    for first, count, index in plan.entries:
        # an entry never crosses a block boundary
        assert first // block == (first + count - 1) // block
        src = plan.sources[index]
        if src.name == BROKER_SOURCE:
            # the broker only serves segments no holder has: peers first
            for i in range(first, first + count):
                assert not any(i in h.segments for h in holders), (
                    f"segment {i} held by a peer went to the broker"
                )
        else:
            assert by_name[src.name].segments.covers(first, count), f"{src.name} lacks [{first}, +{count})"
    for src, h in zip(plan.sources, holders, strict=False):
        complete = h.segments.covers(0, segment_count)
        assert src.runs == (None if complete else tuple(h.segments.runs()))
    assert sum(plan.segments_by_source().values()) == len(need)
    return got


def test_no_holders_everything_from_the_broker() -> None:
    n = 300
    need = SegmentSet.full(n)
    plan = plan_download(n, need, [], ORIGIN, block=64)
    got = check_plan(plan, n, need, [], 64)
    assert set(got.values()) == {BROKER_SOURCE}
    assert len(plan.sources) == 1
    assert plan.segments_by_source() == {BROKER_SOURCE: n}
    # cut into aligned blocks: 64, 64, 64, 64, 44
    assert sorted(c for _, c, _ in plan.entries) == [44, 64, 64, 64, 64]


def test_one_complete_holder_takes_everything_and_the_broker_nothing() -> None:
    n = 200
    need = SegmentSet.full(n)
    holders = [full("a", n)]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    check_plan(plan, n, need, holders, 64)
    assert plan.segments_by_source() == {"a": n}
    assert plan.sources[0].runs is None


def test_two_complete_holders_share_the_download() -> None:
    n = 64 * 20
    need = SegmentSet.full(n)
    holders = [full("a", n), full("b", n)]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    check_plan(plan, n, need, holders, 64)
    counts = plan.segments_by_source()
    assert BROKER_SOURCE not in counts
    assert 0 < counts["a"] < n
    assert 0 < counts["b"] < n
    assert counts["a"] == counts["b"] == n // 2


def test_partial_holders_get_only_what_they_hold_and_the_rest_goes_to_the_broker() -> None:
    n = 256
    need = SegmentSet.full(n)
    holders = [holder("a", [(0, 100)]), holder("b", [(150, 50)])]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    got = check_plan(plan, n, need, holders, 64)
    assert {i for i, s in got.items() if s == "a"} == set(range(100))
    assert {i for i, s in got.items() if s == "b"} == set(range(150, 200))
    assert {i for i, s in got.items() if s == BROKER_SOURCE} == set(range(100, 150)) | set(range(200, 256))
    assert plan.sources[0].runs == ((0, 100),)
    assert plan.sources[1].runs == ((150, 50),)


def test_overlapping_partial_holders_split_a_block_between_them() -> None:
    n = 64
    need = SegmentSet.full(n)
    # neither covers the block: planned segment by segment, in as few runs as holdings allow
    holders = [holder("a", [(0, 40)]), holder("b", [(30, 34)])]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    got = check_plan(plan, n, need, holders, 64)
    assert BROKER_SOURCE not in got.values()
    assert {got[i] for i in range(30)} == {"a"}
    assert {got[i] for i in range(40, 64)} == {"b"}
    assert len(plan.entries) == 2


def test_need_excludes_segments_the_requester_holds() -> None:
    n = 512
    need = SegmentSet.full(n)
    need.difference_update(SegmentSet([(0, 64), (100, 3), (500, 12)]))
    holders = [full("a", n), holder("b", [(0, 256)])]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    got = check_plan(plan, n, need, holders, 64)
    for i in [*range(64), 100, 101, 102, *range(500, 512)]:
        assert i not in got
    assert len(got) == n - 64 - 3 - 12


def test_empty_need_and_empty_file() -> None:
    plan = plan_download(100, SegmentSet(), [full("a", 100)], ORIGIN)
    assert plan.entries == ()
    assert plan.segments_by_source() == {}
    plan = plan_download(0, SegmentSet(), [], ORIGIN)
    assert plan.entries == ()
    assert plan.sources[-1].name == BROKER_SOURCE


def test_rarest_blocks_come_first() -> None:
    n, block = 256, 64
    need = SegmentSet.full(n)
    # block 0: a only (1); block 1: a and b (2); block 2: a only (1); block 3: nobody (0)
    holders = [holder("a", [(0, 192)]), holder("b", [(64, 64)])]
    plan = plan_download(n, need, holders, ORIGIN, block=block)
    check_plan(plan, n, need, holders, block)
    firsts = [first for first, _, _ in plan.entries]
    assert firsts[0] == 192  # broker-only: rarest of all
    assert firsts[-1] == 64  # held twice: last
    assert set(firsts[1:3]) == {0, 128}


def test_rarity_order_with_complete_holders() -> None:
    n, block = 64 * 6, 64
    need = SegmentSet.full(n)
    holders = [full("a", n), holder("b", [(64, 128)]), holder("c", [(128, 64)])]
    plan = plan_download(n, need, holders, ORIGIN, block=block)
    check_plan(plan, n, need, holders, block)
    availability = [sum(h.segments.covers(first, count) for h in holders) for first, count, _ in plan.entries]
    assert availability == sorted(availability)
    assert availability[0] == 1
    assert availability[-1] == 3
    assert plan.entries[-1][0] == 128


@pytest.mark.parametrize("rotate", [0, 1, 5, 7, 8, 13])
def test_rotate_changes_the_start_for_broker_only_files(rotate: int) -> None:
    blocks, block = 8, 64
    n = blocks * block
    plan = plan_download(n, SegmentSet.full(n), [], ORIGIN, block=block, rotate=rotate)
    firsts = [first for first, _, _ in plan.entries]
    assert firsts == [((rotate + k) % blocks) * block for k in range(blocks)]


def test_different_rotations_give_different_orders() -> None:
    n = 64 * 10 + 3
    orders = {
        tuple(plan_download(n, SegmentSet.full(n), [], ORIGIN, block=64, rotate=r).entries) for r in range(11)
    }
    assert len(orders) == 11  # rotate 10 wraps round to 0 only at 11 blocks
    same = [plan_download(n, SegmentSet.full(n), [], ORIGIN, block=64, rotate=r).entries for r in (0, 11)]
    assert same[0] == same[1]


def test_a_busy_holder_gets_less_but_not_nothing() -> None:
    n = 64 * 40
    need = SegmentSet.full(n)
    holders = [full("busy", n, load=1e9), full("idle", n, load=0.0)]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    check_plan(plan, n, need, holders, 64)
    counts = plan.segments_by_source()
    assert counts["idle"] > counts["busy"] > 0


def test_load_steers_blocks_to_the_idle_holder() -> None:
    n = 64 * 4
    need = SegmentSet.full(n)
    holders = [full("a", n, load=100.0), full("b", n, load=0.0)]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    # b: 0 -> 64 -> 128, then a (100 < 128), then b again (128 < 164)
    assert plan.segments_by_source() == {"a": 64, "b": 192}
    assert plan.sources[plan.entries[0][2]].name == "b"
    unloaded = plan_download(n, need, [full("a", n), full("b", n)], ORIGIN, block=64)
    assert unloaded.segments_by_source() == {"a": 128, "b": 128}


def test_partial_holder_competes_with_complete_holders() -> None:
    n = 64 * 8
    need = SegmentSet.full(n)
    holders = [full("a", n), holder("p", [(0, n // 2)])]
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    got = check_plan(plan, n, need, holders, 64)
    counts = Counter(got.values())
    assert counts["p"] > 0
    assert counts["a"] > counts["p"]
    assert all(i < n // 2 for i, s in got.items() if s == "p")


@pytest.mark.parametrize("seed", range(30))
def test_random_holdings_every_needed_segment_planned_exactly_once(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 700)
    block = rng.choice([1, 3, 16, 64])
    holders: list[Holder] = []
    for k in range(rng.randrange(0, 6)):
        if rng.random() < 0.2:
            holders.append(full(f"p{k}", n, load=rng.choice([0.0, 10.0, 1000.0])))
        else:
            runs = [(rng.randrange(n), rng.randrange(1, 80)) for _ in range(rng.randrange(1, 6))]
            runs = [(f, min(c, n - f)) for f, c in runs]
            holders.append(holder(f"p{k}", runs, load=rng.choice([0.0, 5.0, 100.0])))
    need = SegmentSet.full(n)
    for _ in range(rng.randrange(0, 4)):
        need.remove(rng.randrange(n), rng.randrange(1, 50))
    plan = plan_download(n, need, holders, ORIGIN, block=block, rotate=rng.randrange(1000))
    got = check_plan(plan, n, need, holders, block)
    held_anywhere = SegmentSet()
    for h in holders:
        held_anywhere.update(h.segments)
    for i, s in got.items():
        assert (s == BROKER_SOURCE) == (i not in held_anywhere)


def test_holder_with_out_of_range_claims_is_not_taken_as_complete() -> None:
    n = 10
    need = SegmentSet.full(n)
    holders = [holder("a", [(5, 10)])]  # 10 segments claimed, but only 5..9 are in the file
    plan = plan_download(n, need, holders, ORIGIN, block=64)
    got = check_plan(plan, n, need, holders, 64)
    assert plan.sources[0].runs == ((5, 10),)  # listed as partial
    assert {i for i, s in got.items() if s == "a"} == set(range(5, 10))
    assert {i for i, s in got.items() if s == BROKER_SOURCE} == set(range(5))


def test_one_gib_plan_with_100_complete_holders(capsys: pytest.CaptureFixture[str]) -> None:
    n = 65536  # 1 GiB in 16 KiB segments
    holders = [full(f"peer-{k:03d}", n, load=0.0) for k in range(100)]
    need = SegmentSet.full(n)
    start = time.perf_counter()
    plan = plan_download(n, need, holders, ORIGIN, block=64, rotate=17)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\nplan for 65536 segments, 100 complete holders: "
            f"{elapsed * 1000:.1f} ms, {len(plan.entries)} entries"
        )
    counts = plan.segments_by_source()
    assert BROKER_SOURCE not in counts
    assert len(counts) == 100
    assert max(counts.values()) - min(counts.values()) <= 64  # 1024 blocks over 100 holders: 10 or 11 each
    assert len(plan.entries) == n // 64
    assert sum(counts.values()) == n


# --------------------------------------------------------------------------- origin claims (super-seeding)


def broker_blocks(plan: Plan, block: int) -> list[int]:
    return [first // block for first, _, index in plan.entries if plan.sources[index].name == BROKER_SOURCE]


def test_without_a_window_or_requester_nothing_is_claimed_or_deferred() -> None:
    n = 64 * 6
    need = SegmentSet.full(n)
    for kwargs in (
        {"claims": {0: "other"}, "requester": "me", "origin_window": 0},
        {"claims": {0: "other"}, "requester": None, "origin_window": 4},
        {},
    ):
        plan = plan_download(n, need, [], ORIGIN, block=64, **kwargs)  # type: ignore[arg-type]
        check_plan(plan, n, need, [], 64)
        assert plan.claimed == ()
        assert plan.deferred == 0


def test_a_downloader_claims_at_most_its_window_of_broker_only_blocks() -> None:
    n, block = 64 * 10 + 5, 64
    need = SegmentSet.full(n)
    plan = plan_download(
        n, need, [], ORIGIN, block=block, rotate=4, claims={}, requester="me", origin_window=3
    )
    assert plan.claimed == (4, 5, 6)  # the first three in fetch order
    assert broker_blocks(plan, block) == [4, 5, 6]
    assert plan.deferred == n - 3 * block
    assert sum(c for _, c, _ in plan.entries) + plan.deferred == len(need)


def test_blocks_claimed_by_another_downloader_are_deferred() -> None:
    n, block = 64 * 6, 64
    need = SegmentSet.full(n)
    claims = {0: "other", 2: "other", 3: "me"}
    plan = plan_download(n, need, [], ORIGIN, block=block, claims=claims, requester="me", origin_window=2)
    # block 3 is already mine (kept, not re-claimed) and fills one slot of the window
    assert 3 in broker_blocks(plan, block)
    assert 0 not in broker_blocks(plan, block)
    assert 2 not in broker_blocks(plan, block)
    assert plan.claimed == (1,)
    assert sorted(broker_blocks(plan, block)) == [1, 3]
    assert plan.deferred == 4 * block


def test_finished_claims_do_not_fill_the_window() -> None:
    n, block = 64 * 8, 64
    need = SegmentSet.full(n)
    need.difference_update(SegmentSet([(0, 2 * block)]))  # blocks 0 and 1: claimed earlier, now held
    plan = plan_download(
        n, need, [], ORIGIN, block=block, claims={0: "me", 1: "me"}, requester="me", origin_window=2
    )
    assert plan.claimed == (2, 3)
    assert sorted(broker_blocks(plan, block)) == [2, 3]


def test_claims_never_defer_segments_a_peer_can_serve() -> None:
    n, block = 64 * 4, 64
    need = SegmentSet.full(n)
    holders = [holder("p", [(0, 2 * block)])]  # blocks 0, 1 from a peer; 2, 3 broker-only
    plan = plan_download(
        n,
        need,
        holders,
        ORIGIN,
        block=block,
        claims={0: "x", 1: "x", 2: "x"},
        requester="me",
        origin_window=8,
    )
    got = assignment(plan)
    assert {got[i] for i in range(2 * block)} == {"p"}
    assert plan.claimed == (3,)
    assert plan.deferred == block  # block 2 only


def test_a_block_split_between_peer_and_broker_is_claimed_once() -> None:
    n, block = 64, 64
    need = SegmentSet.full(n)
    holders = [holder("p", [(10, 10), (40, 5)])]
    plan = plan_download(n, need, holders, ORIGIN, block=block, claims={}, requester="me", origin_window=1)
    got = check_plan(plan, n, need, holders, block)
    assert plan.claimed == (0,)
    assert plan.deferred == 0
    assert sum(1 for s in got.values() if s == BROKER_SOURCE) == 64 - 15
    deferred_plan = plan_download(
        n, need, holders, ORIGIN, block=block, claims={0: "other"}, requester="me", origin_window=1
    )
    assert deferred_plan.deferred == 64 - 15
    assert set(assignment(deferred_plan).values()) == {"p"}


def test_claim_cycle_with_the_registry() -> None:
    """Two downloaders of a new file share the origin: the second is deferred on what the first
    claimed, and once the first holds a block the second gets it from that peer."""
    from broker.registry import Registry

    file_id, n, block = b"\x07" * 32, 64 * 4, 64
    r = Registry(expiry_s=10.0)
    r.register("a", b"ra", "tcp://a:1", [], now=0.0)
    r.register("b", b"rb", "tcp://b:1", [], now=0.0)

    def get(name: str, now: float) -> Plan:
        need = SegmentSet.full(n)
        need.difference_update(r.holdings_of(name, file_id))
        plan = plan_download(
            n,
            need,
            r.holders(file_id, now, exclude=name),
            ORIGIN,
            block=block,
            claims=r.origin_claims(file_id, now, idle_s=2.0),
            requester=name,
            origin_window=2,
        )
        r.claim_origin_blocks(file_id, name, plan.claimed, now)
        return plan

    pa = get("a", 0.0)
    assert pa.claimed == (0, 1)
    pb = get("b", 0.1)
    assert pb.claimed == (2, 3)  # not a's blocks
    assert pb.deferred == 2 * block
    # a fetched block 0 and says so; b asks again and gets block 0 from a, block 1 still deferred
    r.add_runs("a", file_id, [(0, block)])
    r.note_progress("a", file_id, 0.5)
    pb2 = get("b", 0.6)
    got = assignment(pb2)
    assert {got[i] for i in range(block)} == {"a"}
    assert pb2.deferred == block
    # a stalls: its claim on block 1 lapses (b's own lapse too: b reported nothing) and b takes it
    pb3 = get("b", 3.0)
    assert 1 in pb3.claimed
    assert 0 not in broker_blocks(pb3, block)  # a serves block 0
    assert 1 in broker_blocks(pb3, block)


@pytest.mark.parametrize("seed", range(20))
def test_random_claims_plan_or_defer_every_needed_segment_once(seed: int) -> None:
    rng = random.Random(1000 + seed)
    n = rng.randrange(1, 600)
    block = rng.choice([4, 16, 64])
    blocks = (n + block - 1) // block
    holders = [
        holder(f"p{k}", [(rng.randrange(n), rng.randrange(1, 100))]) for k in range(rng.randrange(0, 3))
    ]
    claims = {b: rng.choice(["me", "x", "y"]) for b in range(blocks) if rng.random() < 0.4}
    window = rng.randrange(0, 5)
    need = SegmentSet.full(n)
    need.remove(rng.randrange(n), rng.randrange(0, 40))
    plan = plan_download(
        n,
        need,
        holders,
        ORIGIN,
        block=block,
        rotate=rng.randrange(50),
        claims=claims,
        requester="me",
        origin_window=window,
    )
    got = assignment(plan)
    assert set(got) <= set(need)
    deferred = set(need) - set(got)
    assert len(deferred) == plan.deferred
    if window == 0:
        assert deferred == set()
        assert plan.claimed == ()
        return
    assert set(plan.claimed).isdisjoint(claims)  # only unclaimed blocks are claimed
    broker_only = {i // block for i in deferred} | set(broker_blocks(plan, block))
    mine = {b for b, who in claims.items() if who == "me" and b in broker_only}
    assert len(mine | set(plan.claimed)) <= max(window, len(mine))
    for b in broker_blocks(plan, block):  # the broker serves only blocks that are ours
        assert claims.get(b) == "me" or b in plan.claimed
    for i in deferred:  # deferred: no peer holds it, and it is someone else's or the window is full
        assert not any(i in h.segments for h in holders)
        owner = claims.get(i // block)
        assert owner not in (None, "me") or len(mine | set(plan.claimed)) >= window


# --------------------------------------------------------------------------- origin share


def test_origin_share() -> None:
    from broker.planner import origin_share

    assert origin_share(0, 2, {}, "a", 1000) == 0  # claims off
    assert origin_share(32, 2, {}, "a", 1000) == 32  # alone: the whole budget
    assert origin_share(32, 2, {1: "b", 2: "c", 3: "d"}, "a", 1000) == 8  # four claimants
    assert origin_share(32, 2, {1: "a"}, "a", 1000) == 32  # its own claims do not count twice
    assert origin_share(32, 2, {}, "a", 16) == 2  # a small file: at most an eighth, at least the lanes
    assert origin_share(32, 3, {i: f"p{i}" for i in range(100)}, "a", 1000) == 3
