"""Planner: which source serves which segments of one download. A pure function.

Steps
-----
1. The segments to plan are those the requester lacks (the broker knows what it holds).
2. They are cut into blocks aligned on multiples of `block` segments (aligned, so that blocks of
   different downloaders coincide and whole blocks can be traded).
3. Each block goes to the least-loaded live holder that has all of it; load is the holder's
   recent planned segments (from the registry) plus what this plan already gave it, so one
   download is spread over its holders and concurrent downloads over the swarm. Complete
   holders sit in a heap, so a block costs O(log holders) for them; partial holders are checked
   one by one.
4. A block that no single holder covers is planned segment by segment; segments that no live peer
   holds go to the broker, and only those: peers first, the broker as the fallback.
5. Blocks are ordered rarest first; among equally rare blocks the order is rotated by `rotate`
   (different for each downloader of a file), so early downloaders of a new file fetch different
   blocks from the broker and can trade them at once.
6. Relay trees for what no holder has yet. A file's new content is cut into `stripes` (block
   number mod stripes). For each stripe, the file's active downloaders form a tree of fan-out
   `fanout` (SplitStream): the root fetches the stripe's blocks from the origin, every other
   downloader from its parent, which may not hold them yet: its segment server holds such a
   request until the segments arrive (cut-through). Each downloader is an inner node of one
   stripe's tree only, so every uplink carries about one copy of the file and the origin sends
   each block once, whatever the number of downloaders; the depth grows as log(fanout, N).
   Tree blocks are fetched in ascending order, so parents fetch what their children ask next.
   A root asks a downloader that already holds a block before asking the origin.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from broker.registry import Holder
from common.protocol import SourceReason
from common.ranges import Run, SegmentSet

BROKER_SOURCE = "broker"
_BROKER_SENTINEL = 1 << 30
MAX_PARTIAL_HOLDERS = 32
FEW_SLOW = 10  # at most one slow downloader in this many: swapped out, not dealt anew


@dataclass(frozen=True, slots=True)
class PlannedSource:
    name: str
    endpoint: str
    runs: tuple[Run, ...] | None  # None: holds every segment
    why: SourceReason = SourceReason.ORIGIN


@dataclass(frozen=True, slots=True)
class Plan:
    sources: tuple[PlannedSource, ...]
    entries: tuple[tuple[int, int, int], ...]  # (first, count, source index), in fetch order
    relayed: int = 0  # segments planned from a relay-tree parent that may not hold them yet

    def segments_per_source(self) -> list[int]:
        """Segments planned from each source, by its index in `sources` (one pass over entries)."""
        counts = [0] * len(self.sources)
        for _, count, index in self.entries:
            counts[index] += count
        return counts

    def segments_by_source(self, per_source: list[int] | None = None) -> dict[str, int]:
        """`per_source`: `segments_per_source()` if already computed (a GET's hot path)."""
        return self._fold(lambda source: source.name, per_source)

    def segments_by_reason(self, per_source: list[int] | None = None) -> dict[str, int]:
        return self._fold(lambda source: str(source.why), per_source)

    def _fold(self, key: Callable[[PlannedSource], str], per_source: list[int] | None) -> dict[str, int]:
        counts: dict[str, int] = {}
        per = self.segments_per_source() if per_source is None else per_source
        for source, count in zip(self.sources, per, strict=True):
            if count:
                counts[key(source)] = counts.get(key(source), 0) + count
        return counts


@dataclass(frozen=True, slots=True)
class Relay:
    """The requester's place in the relay trees of a file (step 6).

    `parents[s]`: the downloader it fetches stripe s from, or None where it is the root (it asks
    a downloader that holds the block, else the origin). `downloaders`: the other active
    downloaders, whose holdings a root may use."""

    stripes: int
    parents: tuple[Holder | None, ...]
    downloaders: tuple[Holder, ...]


class RelayTrees:
    """The relay trees of one file for one set of downloaders (see `relay_for`), built once per
    change of that set, so that finding a downloader's parents costs O(stripes), not O(N): the
    tracker answers a thousand downloaders' plans without a pass over all of them each time."""

    def __init__(
        self,
        members: list[tuple[int, str]],
        fanout: int,
        slow: frozenset[str] = frozenset(),
    ) -> None:
        """`members`: (join position, name) of the file's downloaders, in join order. `slow`:
        members whose uplink relays far slower than the others'; they take leaf places in every
        stripe, so the others relay for them (SplitStream's forwarding capacity, with two
        classes)."""
        self.fanout = max(1, fanout)
        # Fewer downloaders than stripes: as many stripes as downloaders, so that no stripe is
        # without an inner node of its own.
        self.stripes = max(1, min(self.fanout, len(members)))
        self.orders: list[list[str]] = []
        self.places: list[dict[str, int]] = []
        stripes = self.stripes
        orders: list[list[str]] = []
        if len(slow) * FEW_SLOW > len(members):
            # Many are slow (mixed links): they go last. The others are dealt into classes by
            # rank, and stripe s takes class s first, then classes s + 1, s + 2, ... in turn:
            # where class s has fewer members than the stripe has inner places, the next classes
            # fill them, so every fast member relays about as much (the join positions of the
            # fast may fall into few classes). Swapping them all out instead measured worse in
            # a simulated mixed swarm (N = 100: 3.02x the bound against 2.48x).
            fast = [name for _, name in members if name not in slow]
            last = [name for _, name in members if name in slow]
            for stripe in range(stripes):
                dealt = sorted(range(len(fast)), key=lambda rank: ((rank - stripe) % stripes, rank))
                orders.append([fast[rank] for rank in dealt] + last)
        else:
            # A member's class is its join position mod the stripe count. Stripe s's order is
            # class s (its inner nodes), then the others in join order: a newcomer is last in
            # every stripe but its class's, so its arrival moves no one else there. A few slow
            # members are swapped out of their inner places.
            for stripe in range(stripes):
                order = [name for pos, name in members if pos % stripes == stripe]
                order += [name for pos, name in members if pos % stripes != stripe]
                orders.append(order)
            if slow:
                self._swap_out(orders, slow)
        for order in orders:
            self._add(order)

    def _swap_out(self, orders: list[list[str]], slow: frozenset[str]) -> None:
        """Each slow member in an inner place trades places with a fast leaf of that stripe:
        the fast member relaying fewest stripes so far, the latest in the order among those.
        Only the two places change, so marking (or unmarking) a few relays of a thousand
        re-parents a few dozen downloaders, not all of them (dealing every place anew made each
        mark a new tree for the whole crowd: at N = 1,000, six relays marked while the trees
        filled and unmarked a second later re-parented nearly every downloader twice). A fast
        member may relay two stripes; the least loaded go first, so the extra relaying is
        shared evenly."""
        fanout = self.fanout
        inner = -(-(len(orders[0]) - 1) // fanout)  # ceil((len - 1) / fanout)
        roles: dict[str, int] = {}
        for order in orders:
            for name in order[:inner]:
                if name not in slow:
                    roles[name] = roles.get(name, 0) + 1
        for order in orders:
            candidates = [
                (roles.get(name, 0), -place, name)
                for place, name in enumerate(order)
                if place >= inner and name not in slow
            ]
            heapq.heapify(candidates)
            for place in range(inner):
                if order[place] not in slow or not candidates:
                    continue
                _, neg_place, name = heapq.heappop(candidates)
                order[place], order[-neg_place] = name, order[place]
                roles[name] = roles.get(name, 0) + 1

    def _add(self, order: list[str]) -> None:
        self.orders.append(order)
        self.places.append({name: i for i, name in enumerate(order)})

    def families(self) -> list[tuple[int, str, list[str]]]:
        """(stripe, relay, its children) for every member with children in some stripe (in a
        heap, node k's children are the places fanout * k + 1 .. fanout * k + fanout)."""
        out: list[tuple[int, str, list[str]]] = []
        fanout = self.fanout
        for stripe, order in enumerate(self.orders):
            for k in range(-(-(len(order) - 1) // fanout)):  # ceil((len - 1) / fanout) inner nodes
                out.append((stripe, order[k], order[fanout * k + 1 : fanout * k + fanout + 1]))
        return out

    def parents(self, name: str) -> list[str | None] | None:
        """The parent in each stripe (None where `name` is the root), or None if not a member."""
        if not self.places or name not in self.places[0]:
            return None
        out: list[str | None] = []
        for order, places in zip(self.orders, self.places, strict=True):
            place = places[name]
            out.append(order[(place - 1) // self.fanout] if place else None)
        return out


def stripe_share(segments: SegmentSet, stripe: int, stripes: int, block: int) -> int:
    """How many of `segments` belong to `stripe` (block number mod `stripes`): O(runs)."""
    cycle = stripes * block
    low = stripe * block

    def before(x: int) -> int:  # the stripe's segments in [0, x)
        whole, rest = divmod(x, cycle)
        return whole * block + min(max(rest - low, 0), block)

    return sum(before(first + count) - before(first) for first, count in segments.runs())


def relay_for(downloaders: list[tuple[int, Holder]], requester: str, fanout: int) -> Relay | None:
    """The requester's parent in each stripe's tree. `downloaders`: (join position, holder) of
    the file's active downloaders, requester included.

    A downloader's class is its join position modulo the stripe count. Stripe s's tree is a
    heap of fan-out `fanout` (node k's parent is node (k - 1) // fanout) over the downloaders
    ordered class s first, then the others, each group in join order. About one in `fanout`
    nodes of a heap has children, so the inner nodes of stripe s are the downloaders of class
    s: each downloader relays one stripe to about `fanout` others, one copy of the file in all,
    and the depth is log(fanout, N). A newcomer appends a leaf in every stripe but its class's,
    where it moves the leaves by one place: the plans it changes are refreshed at the next
    replan."""
    trees = RelayTrees([(pos, h.name) for pos, h in downloaders], fanout)
    names = trees.parents(requester)
    if names is None:
        return None
    by_name = {h.name: h for _, h in downloaders}
    parents = tuple(by_name[n] if n is not None else None for n in names)
    others = tuple(h for _, h in downloaders if h.name != requester)
    return Relay(trees.stripes, parents, others)


def plan_window(
    need: SegmentSet, holders: list[Holder], segment_count: int, block: int, most: int
) -> SegmentSet:
    """What of `need` one plan covers: the first `most` segments, rounded up to a whole block,
    and past them up to a share of `most` from each partial holder. The rest is deferred: the
    downloader asks again."""
    if len(need) <= most:
        return need
    taken, end = 0, segment_count
    for first, count in need.runs():
        if taken + count >= most:
            end = first + most - taken
            break
        taken += count
    end = min(segment_count, -(-end // block) * block)
    # What partial holders have past the window is sorted before it is added: added holder by
    # holder, runs land in the middle of the set's lists (a GET with 100 partial holders of a
    # 1 GiB file took twice as long as planning it whole).
    partial = [h for h in holders if not h.segments.covers(0, segment_count)]
    # Each partial holder adds at most its share of another window (its first segments the
    # requester lacks past this one): enough for every holder to serve from the first plan on
    # (two holders of a half each serve side by side), and a GET with a hundred partial holders
    # of a 1 GiB file stays O(window) (it planned all 1,024 blocks: 43 ms of the tracker).
    share = max(block, most // max(len(partial), 1))
    beyond: list[Run] = []
    for holder in partial:
        left = share
        for first, count in holder.segments.runs():
            if first + count <= end:
                continue
            start = max(first, end)
            for run_first, run_count in need.intersect_run(start, first + count - start):
                take = min(run_count, left)
                beyond.append((run_first, take))
                left -= take
                if not left:
                    break
            if not left:
                break
    window = SegmentSet(need.intersect_run(0, end))
    for first, count in sorted(beyond):  # past the window, in order: appended or merged at the end
        window.add(first, count)
    return window


def plan_download(
    segment_count: int,
    need: SegmentSet,
    holders: list[Holder],
    origin_endpoint: str,
    block: int = 64,
    rotate: int = 0,
    relay: Relay | None = None,
) -> Plan:
    """`holders`: peers to plan from by what they hold (complete copies, idle partial copies).
    `relay`: the requester's relay trees for what none of them holds (None: the origin)."""
    # A holder's load from other downloads counts up to its fair share of this one: enough to
    # steer blocks to idle holders, never enough to leave one holder with the whole download.
    fair = len(need) / max(len(holders), 1)
    loads = [min(h.load, fair) for h in holders]
    complete = [i for i, h in enumerate(holders) if h.segments.covers(0, segment_count)]
    complete_set = set(complete)
    # Partial holders cost a walk over their runs each: plan over the least loaded few (the
    # others stay listed as sources, for fallbacks).
    partial = sorted((i for i in range(len(holders)) if i not in complete_set), key=lambda i: loads[i])
    partial = partial[:MAX_PARTIAL_HOLDERS]
    broker_index = _BROKER_SENTINEL  # its place in `sources` is known only at the end
    assigned = [0.0] * len(holders)
    heap = [(loads[i], i) for i in complete]
    heapq.heapify(heap)

    # (availability, rotated block number, first, count, source)
    blocks: list[tuple[int, int, int, int, int]] = []
    block_total = max((segment_count + block - 1) // block, 1)

    def add(first: int, count: int, source: int, availability: int) -> None:
        order = (first // block - rotate) % block_total
        blocks.append((availability, order, first, count, source))

    # Relay sources follow the holders in the source list; the broker comes last.
    relay_sources: list[Holder] = []
    relay_index: dict[str, int] = {}
    promised: dict[str, SegmentSet] = {}
    relay_why: dict[str, SourceReason] = {}
    relay_load: dict[str, int] = {}  # segments given in this plan to relay places that hold them
    relayed = 0

    def relay_source(h: Holder, why: SourceReason) -> int:
        relay_why.setdefault(h.name, why)
        if h.name not in relay_index:
            relay_index[h.name] = len(holders) + len(relay_sources)
            relay_sources.append(h)
            promised[h.name] = h.segments.copy()
        return relay_index[h.name]

    def relay_block(first: int, count: int, number: int) -> int:
        """Plan a run no holder has from the relay tree; returns the segments given to a parent."""
        assert relay is not None
        parent = relay.parents[number % relay.stripes]
        if parent is not None:
            index = relay_index.get(parent.name)
            if index is None:
                index = relay_source(parent, SourceReason.RELAY)
            promised[parent.name].add(first, count)
            blocks.append((0, number, first, count, index))  # tree(), inlined: once per block
            return count
        # The root: what another downloader holds already comes from it, the rest from the origin.
        relayed_here = 0
        pos, end = first, first + count
        while pos < end:
            best: Holder | None = None
            best_len, next_held = 0, end
            for h in relay.downloaders:
                runs = h.segments.intersect_run(pos, end - pos)
                if not runs:
                    continue
                run_first, run_count = runs[0]
                if run_first == pos and (
                    run_count > best_len
                    or (run_count == best_len and best is not None and h.load < best.load)
                ):
                    best, best_len = h, run_count
                next_held = min(next_held, run_first)
            if best is None:
                tree(pos, next_held - pos, broker_index)
                pos = next_held
                continue
            tree(pos, best_len, relay_source(best, SourceReason.HOLDER))
            relayed_here += best_len
            pos += best_len
        return relayed_here

    def add_or_relay(first: int, count: int, source: int, availability: int) -> None:
        nonlocal relayed
        if source == broker_index and relay is not None:
            relayed += relay_block(first, count, first // block)
        else:
            add(first, count, source, availability)

    def tree(first: int, count: int, source: int) -> None:
        # Ascending block order (no rotation): parents fetch first what children ask first.
        blocks.append((0, first // block, first, count, source))

    full, touched = _block_index(holders, partial, block, segment_count, within=need)
    if not holders and relay is not None:
        # No one to plan by what they hold (the usual GET of a crowd's member): every block goes
        # to the relay trees, which the general loop below finds block by block the long way
        # (at 1,000 downloaders that was most of a GET's planning).
        parents, stripes = relay.parents, relay.stripes
        # Per stripe: the parent's place in the sources and its promised set's `add`, looked
        # up once per plan instead of once per block.
        stripe_source: list[tuple[int, Callable[[int, int], None]] | None] = [None] * stripes
        for run_first, run_count in need.runs():
            pos, end = run_first, run_first + run_count
            while pos < end:
                number = pos // block
                stop = min(end, (number + 1) * block)
                stripe = number % stripes
                parent = parents[stripe]
                if parent is None:
                    relayed += relay_block(pos, stop - pos, number)
                else:
                    known = stripe_source[stripe]
                    if known is None:
                        index = relay_source(parent, SourceReason.RELAY)
                        known = stripe_source[stripe] = (index, promised[parent.name].add)
                    known[1](pos, stop - pos)
                    blocks.append((0, number, pos, stop - pos, known[0]))
                    relayed += stop - pos
                pos = stop
    else:
        for run_first, run_count in need.runs():
            pos, end = run_first, run_first + run_count
            while pos < end:
                number = pos // block
                stop = min(end, (number + 1) * block)
                n = stop - pos
                covering = full.get(number, [])
                overlapping = touched.get(number, [])
                if n < min(block, segment_count - number * block) and overlapping:
                    # Only part of the block is needed: some holders of part of it may cover that.
                    partly = overlapping
                    covering = covering + [i for i in partly if holders[i].segments.covers(pos, n)]
                    overlapping = [
                        i for i in partly if i not in covering and holders[i].segments.overlaps(pos, n)
                    ]
                availability = len(complete) + len(covering)
                best = -1
                if covering:
                    best = min(covering, key=lambda i: loads[i] + assigned[i])
                from_heap = bool(heap) and (best < 0 or heap[0][0] <= loads[best] + assigned[best])
                if from_heap:
                    best = heap[0][1]
                # A relay place that already holds the run (a downloader that finished, keeping its
                # place for a while) is a holder too: it serves the run when it is less loaded than
                # the best holder (a slow or busy seed must not get the whole download from it).
                sharer = _relay_holder(relay, number, pos, n) if best >= 0 and relay is not None else None
                if sharer is not None and min(sharer.load, fair) + relay_load.get(sharer.name, 0) < (
                    loads[best] + assigned[best]
                ):
                    relay_load[sharer.name] = relay_load.get(sharer.name, 0) + n
                    add(pos, n, relay_source(sharer, SourceReason.RELAY), availability)
                    relayed += n
                elif from_heap:
                    heapq.heappop(heap)
                    assigned[best] += n
                    heapq.heappush(heap, (loads[best] + assigned[best], best))
                    add(pos, n, best, availability)
                elif best >= 0:
                    assigned[best] += n
                    add(pos, n, best, availability)
                elif overlapping:
                    _plan_segments(pos, n, holders, loads, overlapping, assigned, broker_index, add_or_relay)
                elif relay is not None:
                    relayed += relay_block(pos, n, number)
                else:
                    add(pos, n, broker_index, 0)  # nobody has any of it: one run from the origin
                pos = stop

    blocks.sort()
    sources = (
        *tuple(
            PlannedSource(
                h.name,
                h.endpoint,
                None if i in complete_set else tuple(h.segments.runs()),
                SourceReason.COMPLETE if i in complete_set else SourceReason.PARTIAL,
            )
            for i, h in enumerate(holders)
        ),
        *tuple(
            # A relay parent is listed with what it holds plus what it relays to this
            # requester: never as a complete copy unless it holds the whole file.
            PlannedSource(
                h.name,
                h.endpoint,
                None if h.segments.covers(0, segment_count) else tuple(promised[h.name].runs()),
                relay_why[h.name],
            )
            for h in relay_sources
        ),
        PlannedSource(BROKER_SOURCE, origin_endpoint, None),
    )
    broker_final = len(sources) - 1
    entries = tuple(
        (first, count, broker_final if source == broker_index else source)
        for _, _, first, count, source in blocks
    )
    return Plan(sources, entries, relayed)


def lend_origin(plan: Plan, keep: dict[str, int], most: int) -> tuple[Plan, int]:
    """The origin takes over work from slow sources: each source named in `keep` keeps its first
    `keep[name]` planned segments (in fetch order) and the rest goes to the origin, `most`
    segments at most in all (what the origin's spare upload delivers soon). Entries stay where
    they are in the fetch order; a split entry becomes two. Returns (plan, segments moved)."""
    broker = len(plan.sources) - 1
    index = {src.name: i for i, src in enumerate(plan.sources[:-1])}
    left = {index[name]: count for name, count in keep.items() if name in index}
    if not left or most <= 0:
        return plan, 0
    entries: list[tuple[int, int, int]] = []
    moved = relay_moved = 0
    relaying = {
        i for i, src in enumerate(plan.sources) if src.why in (SourceReason.RELAY, SourceReason.HOLDER)
    }
    for first, count, source in plan.entries:
        kept = left.get(source)
        if kept is None or count <= kept or moved >= most:
            if kept is not None:
                left[source] = max(kept - count, 0)
            entries.append((first, count, source))
            continue
        if kept:
            entries.append((first, kept, source))
            left[source] = 0
        lend = min(count - kept, most - moved)
        entries.append((first + kept, lend, broker))
        if kept + lend < count:
            entries.append((first + kept + lend, count - kept - lend, source))
        moved += lend
        if source in relaying:
            relay_moved += lend
    if not moved:
        return plan, 0
    return Plan(plan.sources, tuple(entries), max(plan.relayed - relay_moved, 0)), moved


def _relay_holder(relay: Relay, number: int, first: int, count: int) -> Holder | None:
    """The requester's relay source for block `number` if it holds `first .. first + count`
    already: its parent in the block's stripe, or, where it is the root, the least loaded other
    downloader holding it."""
    parent = relay.parents[number % relay.stripes]
    if parent is not None:
        return parent if parent.segments.covers(first, count) else None
    holding = [h for h in relay.downloaders if h.segments.covers(first, count)]
    return min(holding, key=lambda h: h.load) if holding else None


def _block_index(
    holders: list[Holder],
    partial: list[int],
    block: int,
    segment_count: int,
    within: SegmentSet | None = None,
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """For each block: the partial holders holding all of it, and those holding some of it;
    with `within`, for the blocks it touches only (the others are left out).

    Built from each holder's runs once, so a GET costs O(runs + blocks held) per holder instead
    of a bisect per (block, holder) pair; with `within` (a plan's window), O(the window's runs)
    per holder, not O(the file).
    """
    spans: list[Run] | None = None
    if within is not None:
        spans = []  # `within`'s runs widened to whole blocks, merged
        for first, count in within.runs():
            lo = first // block * block
            hi = min(segment_count, -(-(first + count) // block) * block)
            if spans and lo <= spans[-1][0] + spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], hi - spans[-1][0]))
            elif hi > lo:
                spans.append((lo, hi - lo))
    full: dict[int, list[int]] = {}
    touched: dict[int, list[int]] = {}
    last = (segment_count - 1) // block  # the last block may be short: whole at segment_count

    def touch(number: int, i: int) -> None:
        holders_of_block = touched.setdefault(number, [])
        if not holders_of_block or holders_of_block[-1] != i:
            holders_of_block.append(i)

    for i in partial:
        segments = holders[i].segments
        if spans is None:
            runs = segments.runs()
        else:
            # Cut at block boundaries (or the file's end): whole blocks stay whole.
            runs = [run for lo, n in spans for run in segments.intersect_run(lo, n)]
        for first, count in runs:
            end = first + count
            lo, hi = first // block, (end - 1) // block
            # The blocks strictly inside the run are whole; the first and the last may be parts.
            whole_lo = lo if first == lo * block else lo + 1
            whole_hi = hi if end == (hi + 1) * block or (hi == last and end >= segment_count) else hi - 1
            if lo < whole_lo:
                touch(lo, i)
            for number in range(whole_lo, whole_hi + 1):
                full.setdefault(number, []).append(i)
            if hi > whole_hi and hi >= whole_lo:
                touch(hi, i)
    return full, touched


def _plan_segments(
    first: int,
    count: int,
    holders: list[Holder],
    loads: list[float],
    partial: list[int],
    assigned: list[float],
    broker_index: int,
    add: Callable[[int, int, int, int], None],
) -> None:
    """Plan a block that no single holder covers, one segment at a time, merged into runs.

    A run stays with its source while that source has the next segment, so the block is cut into
    as few requests as the holdings allow.
    """
    # One byte per segment of the block and holder: indexing it is far cheaper than a bisect.
    held = {p: bytearray(count) for p in partial}
    for p, mask in held.items():
        for run_first, run_count in holders[p].segments.intersect_run(first, count):
            offset = run_first - first
            mask[offset : offset + run_count] = b"\x01" * run_count
    run_start, run_source, availability = first, -1, 0
    for k in range(count):
        if run_source not in (-1, broker_index) and held[run_source][k]:
            assigned[run_source] += 1
            continue
        having = [p for p in partial if held[p][k]]
        source = min(having, key=lambda p: loads[p] + assigned[p]) if having else broker_index
        if source != run_source:
            if run_source != -1:
                add(run_start, first + k - run_start, run_source, availability)
            run_start, run_source, availability = first + k, source, len(having)
        if source != broker_index:
            assigned[source] += 1
    add(run_start, first + count - run_start, run_source, availability)
