"""Unit tests for common/ranges.py: SegmentSet, including a model test."""

from __future__ import annotations

import random

import pytest

from common.ranges import SegmentSet

pytestmark = pytest.mark.timeout(30)


def as_set(s: SegmentSet) -> set[int]:
    return set(s)


def runs_of(indices: set[int]) -> list[tuple[int, int]]:
    """The canonical runs of a set of ints: sorted, disjoint, non-adjacent."""
    out: list[tuple[int, int]] = []
    for i in sorted(indices):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def test_empty() -> None:
    s = SegmentSet()
    assert len(s) == 0
    assert not s
    assert s.runs() == []
    assert s.run_count() == 0
    assert list(s) == []
    assert 0 not in s
    assert s.covers(0, 0)
    assert not s.covers(0, 1)
    assert s.intersect_run(0, 10) == []
    assert s.missing_in_run(0, 10) == [(0, 10)]
    s.remove(0, 5)  # removing from an empty set is harmless
    assert s == SegmentSet()


def test_full() -> None:
    assert SegmentSet.full(5).runs() == [(0, 5)]
    assert len(SegmentSet.full(5)) == 5
    assert SegmentSet.full(0).runs() == []
    assert SegmentSet.full(-3).runs() == []


def test_add_merges_overlapping_and_adjacent_runs() -> None:
    s = SegmentSet()
    s.add(10, 5)  # 10..14
    s.add(20, 5)  # 20..24
    assert s.runs() == [(10, 5), (20, 5)]
    s.add(15, 2)  # adjacent on the left run: 10..16
    assert s.runs() == [(10, 7), (20, 5)]
    s.add(18, 2)  # adjacent on the right run: 18..24
    assert s.runs() == [(10, 7), (18, 7)]
    s.add(17, 1)  # fills the gap: one run
    assert s.runs() == [(10, 15)]
    assert len(s) == 15
    s.add(0, 100)  # swallows everything
    assert s.runs() == [(0, 100)]
    assert len(s) == 100
    s.add(50, 10)  # inside: no change
    assert s.runs() == [(0, 100)]
    assert len(s) == 100


def test_add_spanning_several_runs() -> None:
    s = SegmentSet([(0, 2), (5, 2), (10, 2), (20, 2)])
    s.add(1, 10)  # 1..10 overlaps the first three runs
    assert s.runs() == [(0, 12), (20, 2)]
    assert len(s) == 14


def test_add_ignores_empty_and_negative_counts() -> None:
    s = SegmentSet([(3, 2)])
    s.add(0, 0)
    s.add(10, -5)
    assert s.runs() == [(3, 2)]
    assert len(s) == 2


def test_constructor_normalises_unsorted_overlapping_runs() -> None:
    s = SegmentSet([(20, 5), (0, 3), (2, 4), (6, 1), (30, 0)])
    assert s.runs() == [(0, 7), (20, 5)]
    assert len(s) == 12


def test_remove_splits_trims_and_drops() -> None:
    s = SegmentSet([(0, 100)])
    s.remove(10, 5)  # split
    assert s.runs() == [(0, 10), (15, 85)]
    s.remove(0, 3)  # trim left
    assert s.runs() == [(3, 7), (15, 85)]
    s.remove(95, 50)  # trim right, past the end
    assert s.runs() == [(3, 7), (15, 80)]
    s.remove(5, 20)  # spans the gap, trims both
    assert s.runs() == [(3, 2), (25, 70)]
    s.remove(0, 1000)  # everything
    assert s.runs() == []
    assert len(s) == 0


def test_remove_outside_or_in_gap_changes_nothing() -> None:
    s = SegmentSet([(10, 5), (20, 5)])
    before = s.copy()
    s.remove(15, 5)  # exactly the gap
    s.remove(0, 10)  # touching on the left
    s.remove(25, 10)  # touching on the right
    s.remove(12, 0)
    assert s == before
    assert len(s) == 10


def test_len_tracks_adds_and_removes() -> None:
    s = SegmentSet()
    s.add(0, 10)
    s.add(5, 10)
    assert len(s) == 15
    s.remove(3, 4)
    assert len(s) == 11
    s.remove(3, 4)
    assert len(s) == 11


def test_contains() -> None:
    s = SegmentSet([(5, 3), (10, 1)])
    assert [i for i in range(-2, 15) if i in s] == [5, 6, 7, 10]
    assert "5" not in s
    assert 5.0 not in s
    assert None not in s


def test_iter_yields_sorted_indices() -> None:
    s = SegmentSet([(10, 2), (0, 3)])
    assert list(s) == [0, 1, 2, 10, 11]


def test_covers() -> None:
    s = SegmentSet([(10, 10), (30, 5)])
    assert s.covers(10, 10)
    assert s.covers(12, 3)
    assert s.covers(19, 1)
    assert not s.covers(9, 2)
    assert not s.covers(19, 2)
    assert not s.covers(15, 20)  # spans a gap
    assert not s.covers(0, 1)
    assert s.covers(100, 0)  # the empty run is covered
    assert not s.covers(35, 1)


def test_intersect_run() -> None:
    s = SegmentSet([(10, 10), (30, 5), (40, 1)])
    assert s.intersect_run(0, 100) == [(10, 10), (30, 5), (40, 1)]
    assert s.intersect_run(15, 20) == [(15, 5), (30, 5)]
    assert s.intersect_run(32, 9) == [(32, 3), (40, 1)]
    assert s.intersect_run(20, 10) == []
    assert s.intersect_run(12, 3) == [(12, 3)]
    assert s.intersect_run(0, 10) == []
    assert s.intersect_run(19, 0) == []


def test_missing_in_run() -> None:
    s = SegmentSet([(10, 10), (30, 5)])
    assert s.missing_in_run(0, 50) == [(0, 10), (20, 10), (35, 15)]
    assert s.missing_in_run(10, 10) == []
    assert s.missing_in_run(15, 20) == [(20, 10)]
    assert s.missing_in_run(5, 7) == [(5, 5)]
    assert s.missing_in_run(18, 2) == []
    assert s.missing_in_run(40, 3) == [(40, 3)]


def test_update_and_difference_update() -> None:
    a = SegmentSet([(0, 5), (20, 5)])
    b = SegmentSet([(3, 5), (30, 1)])
    a.update(b)
    assert a.runs() == [(0, 8), (20, 5), (30, 1)]
    assert b.runs() == [(3, 5), (30, 1)]  # the argument is untouched
    a.difference_update(SegmentSet([(2, 2), (20, 100)]))
    assert a.runs() == [(0, 2), (4, 4)]
    assert len(a) == 6


def test_copy_is_independent() -> None:
    a = SegmentSet([(0, 5)])
    b = a.copy()
    b.add(10, 1)
    b.remove(0, 1)
    assert a.runs() == [(0, 5)]
    assert len(a) == 5
    assert b.runs() == [(1, 4), (10, 1)]
    assert len(b) == 5


def test_equality_and_repr() -> None:
    assert SegmentSet([(0, 2), (2, 2)]) == SegmentSet([(0, 4)])
    assert SegmentSet([(0, 2)]) != SegmentSet([(0, 3)])
    assert SegmentSet() != [(0, 1)]
    assert repr(SegmentSet([(1, 2)])) == "SegmentSet([(1, 2)])"


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_agree_with_a_set_model(seed: int) -> None:
    rng = random.Random(seed)
    universe = rng.choice([20, 64, 300])
    s = SegmentSet()
    model: set[int] = set()
    for _ in range(400):
        op = rng.randrange(10)
        first = rng.randrange(-3, universe)
        count = rng.randrange(-1, universe // 3 + 2)
        rng_span = set(range(first, first + max(count, 0)))
        if op < 3:
            s.add(first, count)
            model |= rng_span
        elif op < 5:
            s.remove(first, count)
            model -= rng_span
        elif op == 5:
            other_runs = [(rng.randrange(universe), rng.randrange(1, 8)) for _ in range(rng.randrange(4))]
            other = SegmentSet(other_runs)
            if rng.random() < 0.5:
                s.update(other)
                model |= set(other)
            else:
                s.difference_update(other)
                model -= set(other)
        elif op == 6:
            assert s.covers(first, count) == (rng_span <= model)
        elif op == 7:
            inter = s.intersect_run(first, count)
            assert inter == runs_of(rng_span & model)
            assert s.missing_in_run(first, count) == runs_of(rng_span - model)
        elif op == 8:
            probe = rng.randrange(-3, universe + 3)
            assert (probe in s) == (probe in model)
        else:
            clone = s.copy()
            assert clone == s
            clone.add(10 * universe, 1)  # far beyond anything the loop adds
            assert clone != s
        # invariants after every step
        assert len(s) == len(model)
        assert bool(s) == bool(model)
        assert s.runs() == runs_of(model)
        assert s.run_count() == len(runs_of(model))
        assert list(s) == sorted(model)
    assert SegmentSet(s.runs()) == s


def test_overlaps_matches_a_model() -> None:
    rng = random.Random(7)
    for _ in range(200):
        model: set[int] = set()
        s = SegmentSet()
        for _ in range(rng.randrange(6)):
            first, count = rng.randrange(60), rng.randrange(1, 10)
            s.add(first, count)
            model.update(range(first, first + count))
        for first in range(0, 70):
            for count in (0, 1, 3, 9):
                expected = any(i in model for i in range(first, first + count))
                assert s.overlaps(first, count) == expected, (sorted(model), first, count)
