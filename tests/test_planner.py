"""Unit tests for broker/planner.py: plan_download is a pure function of holdings and loads."""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import pytest

from broker.planner import (
    BROKER_SOURCE,
    Plan,
    RelayTrees,
    _block_index,
    lend_origin,
    plan_download,
    plan_window,
    relay_for,
    stripe_share,
)
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


@pytest.mark.parametrize("seed", range(40))
def test_block_index_matches_its_definition(seed: int) -> None:
    """The GET's index of partial holders by block (whole blocks walked as ranges, only the run
    ends looked at) against the definition: a holder holds all of a block (the last one may be
    short), or some of it."""
    rng = random.Random(seed)
    n = rng.randrange(1, 900)
    block = rng.choice([1, 2, 3, 16, 64])
    holders = []
    for k in range(rng.randrange(1, 6)):
        runs = [(rng.randrange(n), rng.randrange(1, 200)) for _ in range(rng.randrange(1, 8))]
        holders.append(holder(f"p{k}", [(f, min(c, n - f)) for f, c in runs]))
    within = None
    if seed % 2:  # indexed for the blocks a window touches only
        within = SegmentSet((rng.randrange(n), rng.randrange(1, 100)) for _ in range(rng.randrange(1, 4)))
        within = SegmentSet(within.intersect_run(0, n))
    full_index, touched_index = _block_index(holders, list(range(len(holders))), block, n, within)
    for number in range((n + block - 1) // block):
        if within is not None and not within.overlaps(number * block, block):
            assert number not in full_index and number not in touched_index
            continue
        start, stop = number * block, min((number + 1) * block, n)
        whole = [i for i, h in enumerate(holders) if h.segments.covers(start, stop - start)]
        some = [
            i for i, h in enumerate(holders) if i not in whole and h.segments.overlaps(start, stop - start)
        ]
        assert full_index.get(number, []) == whole, number
        assert touched_index.get(number, []) == some, number


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


# --------------------------------------------------------------------------- relay trees


def broker_blocks(plan: Plan, block: int) -> list[int]:
    return [first // block for first, _, index in plan.entries if plan.sources[index].name == BROKER_SOURCE]


def downloaders(n: int, held: dict[int, list[Run]] | None = None) -> list[tuple[int, Holder]]:
    return [(k, holder(f"d{k}", (held or {}).get(k, []))) for k in range(n)]


def tree_of(n: int, fanout: int) -> dict[str, list[str | None]]:
    """downloader -> its parent in each stripe."""
    ds = downloaders(n)
    out: dict[str, list[str | None]] = {}
    for _, h in ds:
        relay = relay_for(ds, h.name, fanout)
        assert relay is not None
        out[h.name] = [p.name if p is not None else None for p in relay.parents]
    return out


def test_a_lone_downloader_is_the_root_of_its_only_stripe() -> None:
    relay = relay_for(downloaders(1), "d0", 4)
    assert relay is not None and relay.stripes == 1 and relay.parents == (None,)
    assert relay_for(downloaders(3), "stranger", 4) is None


@pytest.mark.parametrize(("n", "fanout"), [(2, 4), (4, 4), (5, 4), (16, 4), (33, 4), (64, 8), (100, 4)])
def test_every_downloader_relays_one_stripe_to_at_most_fanout_others(n: int, fanout: int) -> None:
    tree = tree_of(n, fanout)
    stripes = min(fanout, n)
    children: Counter[tuple[int, str]] = Counter()
    roots: dict[int, list[str]] = {s: [] for s in range(stripes)}
    for name, parents in tree.items():
        assert len(parents) == stripes
        for stripe, parent in enumerate(parents):
            if parent is None:
                roots[stripe].append(name)
            else:
                children[(stripe, parent)] += 1
    for stripe in range(stripes):  # one root per stripe: the first downloader of its class
        assert roots[stripe] == [f"d{stripe}"]
    assert all(c <= fanout for c in children.values())
    relaying = Counter(parent for (_, parent) in children)
    # each downloader is an inner node in at most one stripe (its class)...
    assert all(sum(1 for (_, p) in children if p == name) <= 1 for name in tree)
    # ...and the uploads add up: every downloader receives each stripe once
    assert sum(children.values()) == stripes * (n - 1)
    if n >= fanout * fanout:
        assert len(relaying) <= -(-n // fanout) * stripes  # about one in fanout relays
    # depth: log(fanout, N) levels
    depth = 0
    for name in tree:
        for stripe in range(stripes):
            hops, node = 0, name
            while tree[node][stripe] is not None:
                node = tree[node][stripe]  # type: ignore[assignment]
                hops += 1
            depth = max(depth, hops)
    assert depth <= max(1, math.ceil(math.log(n, fanout))) + 1


def test_a_newcomer_moves_parents_in_its_own_class_stripe_only() -> None:
    fanout = 4
    before, after = tree_of(20, fanout), tree_of(21, fanout)
    newcomer_class = 20 % fanout
    for name, parents in before.items():
        for stripe in range(fanout):
            if stripe != newcomer_class:
                assert after[name][stripe] == parents[stripe], (name, stripe)


@pytest.mark.parametrize(("n", "slow_every"), [(16, 2), (16, 4), (21, 3), (100, 2), (7, 2)])
def test_slow_members_are_leaves_and_the_fast_relay_evenly(n: int, slow_every: int) -> None:
    fanout = 4
    members = [(pos, f"d{pos}") for pos in range(n)]
    slow = frozenset(f"d{pos}" for pos in range(n) if pos % slow_every == 1)
    trees = RelayTrees(members, fanout, slow)
    fast = [name for _, name in members if name not in slow]
    relays: Counter[str] = Counter()
    for stripe, relay, children in trees.families():
        relays[relay] += 1
        assert len(children) <= fanout
        if len(fast) > trees.stripes:  # enough fast members to fill the inner places
            assert relay not in slow, (stripe, relay)
    for name in slow:
        parents = trees.parents(name)
        assert parents is not None and None not in parents  # never a root
    # every member gets every stripe once: one parent per stripe but the root's
    for _, name in members:
        parents = trees.parents(name)
        assert parents is not None and len(parents) == trees.stripes
    # the fast share the relaying: no one relays more than one stripe beyond its even share
    even = -(-sum(relays.values()) // len(fast))
    assert max(relays.values()) <= even + 1, relays


def test_a_few_slow_relays_of_many_move_only_their_neighbours() -> None:
    """Marking six relays of 1,000 slow swaps each out of its inner place with a fast leaf:
    only their children, their parents' child lists and the swapped leaves see a change (dealing
    every place anew re-parented nearly the whole crowd at each mark: at N = 1,000 in the
    simulator, twice in the first seconds)."""
    members = [(pos, f"d{pos}") for pos in range(1000)]
    before = RelayTrees(members, 4)
    slow = frozenset({"d0", "d5", "d10", "d123", "d400", "d999"})  # d0 roots stripe 0
    after = RelayTrees(members, 4, slow)
    moved = [name for _, name in members if before.parents(name) != after.parents(name)]
    assert 0 < len(moved) <= len(slow) * (4 + 2), len(moved)
    for stripe, relay, _children in after.families():
        assert relay not in slow, (stripe, relay)
    for name in slow:
        parents = after.parents(name)
        assert parents is not None and None not in parents  # never a root
    # unmarked again: the trees of before, exactly
    assert RelayTrees(members, 4, frozenset()).orders == before.orders


def test_without_slow_members_the_trees_are_as_before() -> None:
    members = [(pos, f"d{pos}") for pos in range(20)]
    assert RelayTrees(members, 4).orders == RelayTrees(members, 4, frozenset()).orders
    # class s (join position mod 4) first in stripe s, the others in join order
    order = RelayTrees(members, 4).orders[1]
    assert order[:5] == ["d1", "d5", "d9", "d13", "d17"]
    assert order[5:8] == ["d0", "d2", "d3"]


@pytest.mark.parametrize("seed", range(20))
def test_stripe_share_counts_the_segments_of_a_stripe(seed: int) -> None:
    rng = random.Random(seed)
    n, block, stripes = rng.randrange(1, 3000), rng.choice([1, 4, 64]), rng.randrange(1, 6)
    held = SegmentSet()
    for _ in range(rng.randrange(0, 12)):
        first = rng.randrange(n)
        held.add(first, rng.randrange(1, n - first + 1))
    for stripe in range(stripes):
        expected = sum(1 for i in range(n) if i in held and (i // block) % stripes == stripe)
        assert stripe_share(held, stripe, stripes, block) == expected


def test_relay_plans_what_no_holder_has_from_the_parents_in_ascending_order() -> None:
    n, block, fanout = 64 * 8, 64, 4
    ds = downloaders(6)
    relay = relay_for(ds, "d5", fanout)
    assert relay is not None
    need = SegmentSet.full(n)
    plan = plan_download(n, need, [], ORIGIN, block=block, rotate=3, relay=relay)
    got = assignment(plan)
    assert set(got) == set(need)
    for b in range(n // block):
        parent = relay.parents[b % relay.stripes]
        assert {got[i] for i in range(b * block, (b + 1) * block)} == {
            parent.name if parent else BROKER_SOURCE
        }
    # tree blocks come in ascending order, whatever the rotation
    firsts = [first for first, _, _ in plan.entries]
    assert firsts == sorted(firsts)
    assert plan.relayed == sum(1 for i in got.values() if i != BROKER_SOURCE)
    # plans explain themselves: parents are relays, the broker the origin
    assert {str(src.why) for src in plan.sources[:-1]} == {"relay"}
    assert plan.sources[-1].why == "origin"
    assert set(plan.segments_by_reason()) <= {"relay", "origin"}
    assert sum(plan.segments_by_reason().values()) == len(need)
    # a parent is listed with what it will hold for this download, not as a complete copy
    for source in plan.sources[:-1]:
        assert source.runs is not None
        planned = SegmentSet([(f, c) for f, c, i in plan.entries if plan.sources[i].name == source.name])
        assert SegmentSet(source.runs) == planned


def test_a_root_takes_what_another_downloader_already_holds_before_the_origin() -> None:
    n, block = 64 * 4, 64
    ds = downloaders(2, held={1: [(0, 64)]})  # d1 holds block 0 already
    relay = relay_for(ds, "d0", 4)  # d0 roots stripe 0 (blocks 0 and 2)
    assert relay is not None and relay.parents[0] is None
    plan = plan_download(n, SegmentSet.full(n), [], ORIGIN, block=block, relay=relay)
    got = assignment(plan)
    assert {str(src.why) for src in plan.sources} == {"holder", "origin"} or {
        str(src.why) for src in plan.sources
    } == {"relay", "origin"}  # d1 is listed once, with the reason of its first use
    assert {got[i] for i in range(0, 64)} == {"d1"}
    assert {got[i] for i in range(128, 192)} == {BROKER_SOURCE}
    assert {got[i] for i in range(64, 128)} == {"d1"}  # stripe 1: its parent d1 relays


def test_holders_come_before_the_relay_trees() -> None:
    n, block = 64 * 4, 64
    relay = relay_for(downloaders(3), "d2", 4)
    seed = full("seed", n)
    plan = plan_download(n, SegmentSet.full(n), [seed], ORIGIN, block=block, relay=relay)
    assert set(assignment(plan).values()) == {"seed"}
    assert plan.relayed == 0
    assert plan.sources[0].why == "complete" and plan.segments_by_reason() == {"complete": n}


def test_a_finished_relay_place_shares_with_the_seeds_by_load() -> None:
    # A downloader that finished keeps its relay places for a while. A newcomer's plan takes
    # the blocks that place holds from it when it is less loaded than the best seed: a busy or
    # slow seed must not carry the whole download while the finished copy idles (before, the
    # seed got everything: a newcomer waited on a 0.1 MiB/s seed for 10 s).
    n, block = 64 * 4, 64
    ds = downloaders(2, held={0: [(0, n)]})  # d0 finished; d1 is the newcomer
    relay = relay_for(ds, "d1", 4)
    assert relay is not None and relay.parents == (ds[0][1], None)  # d0's child in stripe 0
    busy = plan_download(
        n, SegmentSet.full(n), [full("seed", n, load=500.0)], ORIGIN, block=block, relay=relay
    )
    assert set(assignment(busy).values()) == {"d0"}
    assert busy.relayed == n
    assert {str(src.why) for src in busy.sources if src.name == "d0"} == {"relay"}
    idle = plan_download(n, SegmentSet.full(n), [full("seed", n)], ORIGIN, block=block, relay=relay)
    assert sorted(Counter(assignment(idle).values()).items()) == [("d0", 128), ("seed", 128)]
    # A place that does not hold the run yet leaves it to the seed, as before.
    fresh = relay_for(downloaders(2), "d1", 4)
    plan = plan_download(
        n, SegmentSet.full(n), [full("seed", n, load=500.0)], ORIGIN, block=block, relay=fresh
    )
    assert set(assignment(plan).values()) == {"seed"}


def test_lend_origin_keeps_the_first_planned_segments_and_moves_the_rest() -> None:
    n, block = 64 * 4, 64
    plan = plan_download(n, SegmentSet.full(n), [full("slow", n), full("fast", n)], ORIGIN, block=block)
    before = assignment(plan)
    lent, moved = lend_origin(plan, {"slow": 10, "nobody": 5}, most=1000)
    after = assignment(lent)
    assert set(after) == set(before)  # every segment still planned once
    slow_order = [i for f, c, s in plan.entries if plan.sources[s].name == "slow" for i in range(f, f + c)]
    assert [i for i in slow_order if after[i] == "slow"] == slow_order[:10]  # the first ten, in fetch order
    assert moved == len(slow_order) - 10 and all(after[i] == BROKER_SOURCE for i in slow_order[10:])
    assert all(after[i] == "fast" for i, s in before.items() if s == "fast")
    capped, moved = lend_origin(plan, {"slow": 10}, most=20)  # the origin's spare: 20 segments
    assert moved == 20 and Counter(assignment(capped).values())[BROKER_SOURCE] == 20
    assert lend_origin(plan, {"nobody": 1}, most=100) == (plan, 0)


@pytest.mark.parametrize("seed", range(20))
def test_random_relay_plans_every_needed_segment_once(seed: int) -> None:
    rng = random.Random(2000 + seed)
    n = rng.randrange(1, 600)
    block = rng.choice([4, 16, 64])
    holders = [
        holder(f"p{k}", [(rng.randrange(n), rng.randrange(1, 100))]) for k in range(rng.randrange(0, 3))
    ]
    ds = [
        (k, holder(f"d{k}", [(rng.randrange(n), rng.randrange(1, 50))] if rng.random() < 0.5 else []))
        for k in range(rng.randrange(1, 12))
    ]
    me = rng.choice(ds)[1].name
    relay = relay_for(ds, me, rng.choice([2, 4, 8]))
    need = SegmentSet.full(n)
    need.remove(rng.randrange(n), rng.randrange(0, 40))
    plan = plan_download(n, need, holders, ORIGIN, block=block, rotate=rng.randrange(50), relay=relay)
    got = assignment(plan)
    assert set(got) == set(need)
    by_name = {h.name: h for h in holders}
    for i, source in got.items():
        if source in by_name:
            assert i in by_name[source].segments
        elif source == BROKER_SOURCE:  # the origin only for what no holder or downloader has
            assert not any(i in h.segments for h in holders)
            assert not any(i in h.segments for _, h in ds if h.name != me)


def test_a_plan_window_is_the_first_segments_needed_rounded_to_a_block() -> None:
    need = SegmentSet([(10, 100_000)])  # segments 10 .. 100_009 of a 1 GiB file (65_536 blocks of 16 KiB)
    window = plan_window(need, [], 200_000, 64, 4096)
    assert window == SegmentSet([(10, 4096 - 10 + 64)])  # 4096 needed end at 4106: up to block 65's end
    assert plan_window(need, [], 200_000, 64, 200_000) is need  # small enough: all of it
    assert plan_window(SegmentSet(), [], 200_000, 64, 4096) == SegmentSet()


def test_a_plan_window_gives_each_partial_holder_a_share_past_it() -> None:
    """A partial holder whose segments lie past the window gets a share of another window, so
    that it serves beside the others from the first plan on; a hundred of them add one window
    in all, not the file."""
    need = SegmentSet.full(65_536)
    partial = Holder("half", "tcp://h:1", SegmentSet([(32_768, 32_768)]), 0.0)
    complete = Holder("seed", "tcp://s:1", SegmentSet.full(65_536), 0.0)
    window = plan_window(need, [complete, partial], 65_536, 64, 4096)
    assert window == SegmentSet([(0, 4096), (32_768, 4096)])
    rng = random.Random(7)
    many = [
        Holder(f"p{k}", "tcp://p:1", SegmentSet((rng.randrange(60_000), 2048) for _ in range(20)), 0.0)
        for k in range(100)
    ]
    window = plan_window(need, many, 65_536, 64, 4096)
    assert window.covers(0, 4096) and len(window) <= 4096 + 100 * 64
    for h in many:  # each holder has its share of the window past segment 4096 (or all it has)
        past = [r for first, count in h.segments.runs() for r in window.intersect_run(first, count)]
        held_past = sum(c for f, c in h.segments.runs() if f >= 4096)
        assert sum(c for f, c in past if f >= 4096) >= min(64, held_past)
    plan = plan_download(65_536, window, [complete, partial], "tcp://o:1", block=64)
    planned = SegmentSet([(first, count) for first, count, _ in plan.entries])
    assert planned == window  # the rest is deferred: asked for at a later plan
