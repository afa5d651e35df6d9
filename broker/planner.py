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
6. Origin claims (super-seeding): a block only the broker has goes to at most one downloader at
   a time. A block claimed by another live downloader is deferred (left out of the plan: the
   downloader asks again when it runs out of work, and by then the claimant holds it and serves
   it as a peer); a downloader claims at most `origin_window` blocks at once (`origin_share`: the
   per-file budget split among the downloaders claiming, never more than an eighth of the file,
   never fewer than the lanes to the origin). So a crowd of new downloaders makes the origin
   upload each block about once, and they trade the rest.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from broker.registry import Holder
from common.ranges import Run, SegmentSet

BROKER_SOURCE = "broker"
MAX_PARTIAL_HOLDERS = 32


@dataclass(frozen=True, slots=True)
class PlannedSource:
    name: str
    endpoint: str
    runs: tuple[Run, ...] | None  # None: holds every segment


@dataclass(frozen=True, slots=True)
class Plan:
    sources: tuple[PlannedSource, ...]
    entries: tuple[tuple[int, int, int], ...]  # (first, count, source index), in fetch order
    claimed: tuple[int, ...] = ()  # broker-only blocks this plan claims for the requester
    deferred: int = 0  # segments left out because another downloader is fetching them from the origin

    def segments_by_source(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, count, index in self.entries:
            name = self.sources[index].name
            counts[name] = counts.get(name, 0) + count
        return counts


def plan_download(
    segment_count: int,
    need: SegmentSet,
    holders: list[Holder],
    origin_endpoint: str,
    block: int = 64,
    rotate: int = 0,
    claims: dict[int, str] | None = None,
    requester: str | None = None,
    origin_window: int = 0,
) -> Plan:
    """`claims`: broker-only block -> live downloader fetching it from the origin now.
    `origin_window`: the most blocks the requester may have claimed (0: no claims, no deferral)."""
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
    broker_index = len(holders)
    assigned = [0.0] * len(holders)
    heap = [(loads[i], i) for i in complete]
    heapq.heapify(heap)

    # (availability, rotated block number, first, count, source)
    blocks: list[tuple[int, int, int, int, int]] = []
    block_total = max((segment_count + block - 1) // block, 1)

    def add(first: int, count: int, source: int, availability: int) -> None:
        order = (first // block - rotate) % block_total
        blocks.append((availability, order, first, count, source))

    full, touched = _block_index(holders, partial, block, segment_count)
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
            if heap and (best < 0 or heap[0][0] <= loads[best] + assigned[best]):
                _, best = heapq.heappop(heap)
                assigned[best] += n
                heapq.heappush(heap, (loads[best] + assigned[best], best))
            elif best >= 0:
                assigned[best] += n
            if best >= 0:
                add(pos, n, best, availability)
            elif overlapping:
                _plan_segments(pos, n, holders, loads, overlapping, assigned, broker_index, add)
            else:
                add(pos, n, broker_index, 0)  # nobody has any of it: one run from the origin
            pos = stop

    blocks.sort()
    claimed: list[int] = []
    deferred = 0
    if origin_window > 0 and requester is not None:
        blocks, claimed, deferred = _apply_claims(
            blocks, broker_index, block, claims or {}, requester, origin_window
        )
    sources = (
        *tuple(
            PlannedSource(h.name, h.endpoint, None if i in complete_set else tuple(h.segments.runs()))
            for i, h in enumerate(holders)
        ),
        PlannedSource(BROKER_SOURCE, origin_endpoint, None),
    )
    entries = tuple((first, count, source) for _, _, first, count, source in blocks)
    return Plan(sources, entries, tuple(claimed), deferred)


def origin_share(budget: int, lanes: int, claims: dict[int, str], requester: str, block_total: int) -> int:
    """How many broker-only blocks the requester may have claimed at once.

    The eighth-of-a-file cap is for the first comer: it cannot know that others will ask a
    moment later, and must not claim a whole small file before they do.
    """
    if budget <= 0:
        return 0
    claimants = set(claims.values()) | {requester}
    return max(lanes, min(budget // len(claimants), -(-block_total // 8)))


def _apply_claims(
    blocks: list[tuple[int, int, int, int, int]],
    broker_index: int,
    block: int,
    claims: dict[int, str],
    requester: str,
    window: int,
) -> tuple[list[tuple[int, int, int, int, int]], list[int], int]:
    """Keep the broker entries of blocks the requester has or may claim; defer the others."""
    # Only claims on blocks the requester still needs from the broker fill its window: a block
    # it has finished no longer counts, even before the claim itself is cleaned up.
    still_needed = {entry[2] // block for entry in blocks if entry[4] == broker_index}
    mine = {b for b, who in claims.items() if who == requester and b in still_needed}
    kept: list[tuple[int, int, int, int, int]] = []
    claimed: list[int] = []
    deferred = 0
    for entry in blocks:
        if entry[4] != broker_index:
            kept.append(entry)
            continue
        number = entry[2] // block
        owner = claims.get(number)
        if owner == requester or number in claimed:
            kept.append(entry)
        elif owner is None and len(mine) < window:
            mine.add(number)
            claimed.append(number)
            kept.append(entry)
        else:
            deferred += entry[3]
    return kept, claimed, deferred


def _block_index(
    holders: list[Holder], partial: list[int], block: int, segment_count: int
) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """For each block: the partial holders holding all of it, and those holding some of it.

    Built from each holder's runs once, so a GET costs O(runs + blocks held) per holder instead
    of a bisect per (block, holder) pair.
    """
    full: dict[int, list[int]] = {}
    touched: dict[int, list[int]] = {}
    for i in partial:
        for first, count in holders[i].segments.runs():
            end = first + count
            for number in range(first // block, (end - 1) // block + 1):
                start, stop = number * block, min((number + 1) * block, segment_count)
                if first <= start and stop <= end:
                    full.setdefault(number, []).append(i)
                else:
                    holders_of_block = touched.setdefault(number, [])
                    if not holders_of_block or holders_of_block[-1] != i:
                        holders_of_block.append(i)
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
