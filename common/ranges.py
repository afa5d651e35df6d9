"""SegmentSet: a set of segment indices kept as sorted, disjoint, non-adjacent runs.

Holdings travel and live as runs because real holdings are a handful of long runs (a complete
file is one run), so a 1 GiB file held by 100 peers costs 100 runs, not 6.5 million bits.
Runs are half-open in memory (`start`, `end`) and (`first`, `count`) on the wire.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator

Run = tuple[int, int]  # (first, count)


class SegmentSet:
    __slots__ = ("_count", "_ends", "_starts")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._count = 0
        for first, count in runs:
            self.add(first, count)

    @classmethod
    def full(cls, n: int) -> SegmentSet:
        return cls([(0, n)] if n > 0 else [])

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SegmentSet) and self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        return f"SegmentSet({self.runs()!r})"

    def __contains__(self, index: object) -> bool:
        if not isinstance(index, int):
            return False
        i = bisect.bisect_right(self._starts, index) - 1
        return i >= 0 and index < self._ends[i]

    def copy(self) -> SegmentSet:
        clone = SegmentSet()
        clone._starts = self._starts.copy()
        clone._ends = self._ends.copy()
        clone._count = self._count
        return clone

    def runs(self) -> list[Run]:
        return [(s, e - s) for s, e in zip(self._starts, self._ends, strict=True)]

    def run_count(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[int]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield from range(s, e)

    def covers(self, first: int, count: int) -> bool:
        """True when every index in [first, first + count) is in the set."""
        if count <= 0:
            return True
        i = bisect.bisect_right(self._starts, first) - 1
        return i >= 0 and first + count <= self._ends[i]

    def overlaps(self, first: int, count: int) -> bool:
        """True when some index in [first, first + count) is in the set."""
        if count <= 0:
            return False
        i = bisect.bisect_right(self._starts, first + count - 1) - 1
        return i >= 0 and self._ends[i] > first

    def add(self, first: int, count: int) -> None:
        if count <= 0:
            return
        start, end = first, first + count
        ends = self._ends
        if not ends or start > ends[-1]:  # past the last run: the common case (in-order arrival)
            self._starts.append(start)
            ends.append(end)
            self._count += count
            return
        if start == ends[-1]:  # touching the last run: extend it
            ends[-1] = end
            self._count += count
            return
        # Every stored run that overlaps or touches [start, end) is merged into one.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
            removed = sum(e - s for s, e in zip(self._starts[lo:hi], self._ends[lo:hi], strict=True))
        else:
            removed = 0
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._count += (end - start) - removed

    def remove(self, first: int, count: int) -> None:
        if count <= 0 or not self._starts:
            return
        start, end = first, first + count
        lo = bisect.bisect_right(self._ends, start)
        hi = bisect.bisect_left(self._starts, end)
        if lo >= hi:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        removed = 0
        for s, e in zip(self._starts[lo:hi], self._ends[lo:hi], strict=True):
            removed += min(e, end) - max(s, start)
            if s < start:
                new_starts.append(s)
                new_ends.append(start)
            if e > end:
                new_starts.append(end)
                new_ends.append(e)
        self._starts[lo:hi] = new_starts
        self._ends[lo:hi] = new_ends
        self._count -= removed

    def update(self, other: SegmentSet) -> None:
        for first, count in other.runs():
            self.add(first, count)

    def difference_update(self, other: SegmentSet) -> None:
        for first, count in other.runs():
            self.remove(first, count)

    def intersect_run(self, first: int, count: int) -> list[Run]:
        """The parts of [first, first + count) that are in the set, as runs."""
        end = first + count
        out: list[Run] = []
        i = max(bisect.bisect_right(self._starts, first) - 1, 0)
        while i < len(self._starts) and self._starts[i] < end:
            s, e = max(self._starts[i], first), min(self._ends[i], end)
            if s < e:
                out.append((s, e - s))
            i += 1
        return out

    def missing_in_run(self, first: int, count: int) -> list[Run]:
        """The parts of [first, first + count) that are not in the set, as runs."""
        out: list[Run] = []
        cursor = first
        for s, c in self.intersect_run(first, count):
            if s > cursor:
                out.append((cursor, s - cursor))
            cursor = s + c
        if cursor < first + count:
            out.append((cursor, first + count - cursor))
        return out
