"""Download: the state of one file being fetched. Pure: no sockets, no disk, no clock.

Theory of operation
-------------------
Every segment is MISSING, PENDING (asked of a source, reply not yet in) or DONE (verified and
written). The broker's plan gives each source a queue of runs in fetch order; `take(source)` pops
the next run of that queue, trimmed to segments still MISSING and cut to `batch` segments, and
marks it PENDING. The shell sends it and later reports the outcome:

- `on_done(source, first, count)`     the run's segments verified and were written
- `on_refused(source, runs)`          the source said it lacks these segments
- `on_failed(source, first, count)`   bad bytes, or no reply in time (the source is suspect)

Refused and failed segments go back to MISSING and are queued at the next source that holds them
and has not failed them: live peers first (the least busy one), the broker last. A source that
times out `dead_after` times in a row is dropped for this download, and everything queued on it
moves on. When a segment has no source left, `stuck` is set and the shell fails the download
(a retry asks the broker for a fresh plan).

`replan(sources, plan)` replaces the queues with a fresh plan from the broker (peers that gained
segments since), keeping PENDING and DONE segments as they are. Segments a plan leaves out are
*deferred* (another downloader is fetching them from the origin; see broker/planner.py): they
stay MISSING and unqueued, and `wants_plan()` tells the shell to ask again before work runs out.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from common.ranges import Run, SegmentSet

BROKER = "broker"
_MISSING_RUN = re.compile(b"\\x00+")  # SegmentState.MISSING
_NOT_DONE_RUN = re.compile(b"[\\x00\\x01]+")  # MISSING or PENDING


class SegmentState(enum.IntEnum):
    MISSING = 0
    PENDING = 1
    DONE = 2


def _runs(pattern: re.Pattern[bytes], state: bytearray, first: int, end: int) -> list[Run]:
    return [(m.start(), m.end() - m.start()) for m in pattern.finditer(state, first, end)]


@dataclass
class SourceState:
    name: str
    endpoint: str
    holds: SegmentSet | None  # None: every segment
    queue: deque[Run] = field(default_factory=deque)
    timeouts_in_a_row: int = 0
    dead: bool = False
    requests: list[Run] = field(default_factory=list)  # runs asked of this source, unanswered

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    def has(self, index: int) -> bool:
        return self.holds is None or index in self.holds

    def queued_segments(self) -> int:
        return sum(c for _, c in self.queue)


class Download:
    def __init__(
        self,
        segment_count: int,
        held: SegmentSet,
        batch: int,
        dead_after: int = 2,
    ) -> None:
        self.segment_count = segment_count
        self.batch = batch
        self.dead_after = dead_after
        self.state = bytearray(segment_count)
        self.segment_sources: list[str | None] = [None] * segment_count
        self.sources: dict[str, SourceState] = {}
        self.excluded: dict[int, set[str]] = {}  # segment -> sources that failed or refused it
        self.done = 0
        self.pending = 0
        self.outstanding = bytearray(segment_count)  # requests in flight covering each segment
        self.stuck: list[int] = []
        for first, count in held.runs():
            for i in range(first, first + count):
                self.state[i] = SegmentState.DONE
                self.segment_sources[i] = "local"
            self.done += count

    # ---- plans

    def replan(
        self, sources: list[tuple[str, str, SegmentSet | None]], plan: list[tuple[int, int, int]]
    ) -> None:
        """Adopt a plan: sources as (name, endpoint, holdings or None) and (first, count, source)."""
        known = self.sources
        fresh: dict[str, SourceState] = {}
        for name, endpoint, holds in sources:
            old = known.get(name)
            state = SourceState(name, endpoint, holds)
            if old is not None:
                # A fresh plan names live sources: a source dead to us gets another chance.
                state.requests = old.requests
            fresh[name] = state
        for name, old in known.items():  # sources with requests in flight stay until they answer
            if name not in fresh and old.in_flight:
                old.queue.clear()
                fresh[name] = old
        self.sources = fresh
        self.stuck.clear()
        for first, count, index in plan:
            if not 0 <= index < len(sources) or first + count > self.segment_count:
                continue
            target = self.sources[sources[index][0]]
            for run in self._missing_runs(first, count):
                target.queue.append(run)

    def _missing_runs(self, first: int, count: int) -> list[Run]:
        # A regex over the state bytes finds the runs at C speed: this runs for every plan entry
        # of every replan and every take, so a Python loop per segment would dominate.
        return _runs(_MISSING_RUN, self.state, first, first + count)

    # ---- taking work

    def take(self, source_name: str) -> Run | None:
        """The next run to ask of this source (marked PENDING), or None."""
        source = self.sources.get(source_name)
        if source is None or source.dead:
            return None
        queue = source.queue
        while queue:
            first, count = queue.popleft()
            runs = self._missing_runs(first, count)
            if not runs:
                continue
            head_first, head_count = runs[0]
            take = min(head_count, self.batch)
            rest = [(head_first + take, head_count - take)] if head_count > take else []
            for run in reversed(rest + runs[1:]):
                queue.appendleft(run)
            self.state[head_first : head_first + take] = bytes([SegmentState.PENDING]) * take
            self.pending += take
            self._ask(source, (head_first, take))
            return head_first, take
        return None

    def _ask(self, source: SourceState, run: Run) -> None:
        first, count = run
        source.requests.append(run)
        out = self.outstanding
        for i in range(first, first + count):
            out[i] += 1

    def take_endgame(self, source_name: str, stragglers: list[tuple[str, Run]]) -> Run | None:
        """Endgame: nothing is left to ask for the first time, so ask this idle source for one of
        the `stragglers` (runs in flight elsewhere for too long, as the shell judges); the first
        verified copy wins. One duplicate per run at most."""
        source = self.sources.get(source_name)
        if source is None or source.dead or source.requests or source_name == BROKER:
            return None  # never the origin: sparing it matters more than a faster tail
        for other_name, (first, count) in stragglers:
            if other_name != source_name:
                end = first + count
                if any(self.outstanding[i] != 1 for i in range(first, end)):
                    continue
                if source.holds is not None and not source.holds.covers(first, count):
                    continue
                if any(source_name in self.excluded.get(i, ()) for i in range(first, end)):
                    continue
                if all(self.state[i] == SegmentState.PENDING for i in range(first, end)):
                    self._ask(source, (first, count))
                    return first, count
        return None

    def in_endgame(self) -> bool:
        return self.pending > 0 and self.queued() == 0 and self.deferred() == 0

    def not_done_runs(self, first: int, count: int) -> list[Run]:
        """The parts of a run not yet DONE (a duplicate reply must not write twice)."""
        return _runs(_NOT_DONE_RUN, self.state, first, first + count)

    def sources_with_work(self) -> list[str]:
        return [s.name for s in self.sources.values() if s.queue and not s.dead]

    # ---- outcomes

    def on_done(self, source_name: str, first: int, count: int) -> None:
        """Segments of a run verified and written (may be a part of the run asked for)."""
        self.on_reply(source_name, first, count)
        for i in range(first, first + count):
            if self.state[i] != SegmentState.DONE:
                if self.state[i] == SegmentState.PENDING:
                    self.pending -= 1
                self.state[i] = SegmentState.DONE
                self.segment_sources[i] = source_name
                self.done += 1
        source = self.sources.get(source_name)
        if source is not None:
            source.timeouts_in_a_row = 0

    def on_reply(self, source_name: str, first: int, count: int) -> None:
        """A request to this source ended, whatever its outcome. The outcome calls below do this
        too, for the request they answer; calling it first is harmless."""
        source = self.sources.get(source_name)
        if source is None:
            return
        end = first + count
        for req in [r for r in source.requests if r[0] < end and first < r[0] + r[1]]:
            source.requests.remove(req)
            out = self.outstanding
            for i in range(req[0], req[0] + req[1]):
                if out[i]:
                    out[i] -= 1

    def on_refused(self, source_name: str, runs: list[Run]) -> None:
        for first, count in runs:
            self.on_reply(source_name, first, count)
        for first, count in runs:
            hint = None
            for i in range(first, first + count):
                hint = self._retry_elsewhere(i, source_name, hint)
        source = self.sources.get(source_name)
        if source is not None and source.holds is not None:
            for first, count in runs:
                source.holds.remove(first, count)

    def on_failed(self, source_name: str, first: int, count: int, timed_out: bool) -> None:
        """Bad bytes exclude the source for these segments; a timeout only steers them elsewhere
        (the source may just be slow) until `dead_after` timeouts in a row drop it."""
        self.on_reply(source_name, first, count)
        source = self.sources.get(source_name)
        if source is not None and timed_out:
            source.timeouts_in_a_row += 1
            # The broker is the last resort: a slow origin is waited for, never given up on.
            if source.timeouts_in_a_row >= self.dead_after and source_name != BROKER:
                self.mark_dead(source_name)
        hint = None
        for i in range(first, first + count):
            if timed_out:
                if self.state[i] != SegmentState.DONE and not self.outstanding[i]:
                    self._mark_missing(i)
                    hint = self._requeue(i, avoid=source_name, hint=hint)
            else:
                hint = self._retry_elsewhere(i, source_name, hint)

    def mark_dead(self, source_name: str) -> None:
        source = self.sources.get(source_name)
        if source is None or source.dead:
            return
        source.dead = True
        queued, source.queue = list(source.queue), deque()
        hint = None
        for first, count in queued:
            for i in range(first, first + count):
                if self.state[i] == SegmentState.MISSING:
                    hint = self._requeue(i, hint=hint)

    def _retry_elsewhere(
        self, index: int, failed_source: str, hint: SourceState | None = None
    ) -> SourceState | None:
        if self.state[index] == SegmentState.DONE:
            return hint
        self.excluded.setdefault(index, set()).add(failed_source)
        if self.outstanding[index]:
            return hint  # another request for it is still in flight (endgame): it decides
        self._mark_missing(index)
        return self._requeue(index, hint=hint)

    def _requeue(
        self, index: int, avoid: str | None = None, hint: SourceState | None = None
    ) -> SourceState | None:
        """Queue a MISSING segment at the best source left: a peer, then the broker; returns it.

        `avoid` is a source to use only when nothing else holds the segment. `hint` is where the
        previous segment of the same run went: kept while it still qualifies, so that a run stays
        one run and a run of n segments does not cost n scans of every queue.
        """
        excluded = self.excluded.get(index, set())
        peers = [
            s
            for s in self.sources.values()
            if s.name != BROKER and not s.dead and s.name not in excluded and s.has(index)
        ]
        if avoid is not None:
            others = [s for s in peers if s.name != avoid]
            if others or self._broker_usable(index):
                peers = others
        if peers:
            # Identity, not ==: SourceState is a dataclass, and equality would compare queues.
            if hint is None or not any(p is hint for p in peers):
                hint = min(peers, key=lambda s: s.queued_segments() + s.in_flight * self.batch)
            target = hint
        elif self._broker_usable(index):
            target = self.sources[BROKER]
        elif avoid is not None and avoid in self.sources and not self.sources[avoid].dead:
            target = self.sources[avoid]  # slow, but the only one left
        else:
            self.stuck.append(index)
            return None
        queue = target.queue
        if queue and queue[-1][0] + queue[-1][1] == index:
            last_first, last_count = queue.pop()
            queue.append((last_first, last_count + 1))
        else:
            queue.append((index, 1))
        return target

    def _mark_missing(self, index: int) -> None:
        if self.state[index] == SegmentState.PENDING:
            self.pending -= 1
        self.state[index] = SegmentState.MISSING

    def _broker_usable(self, index: int) -> bool:
        broker = self.sources.get(BROKER)
        return broker is not None and not broker.dead and BROKER not in self.excluded.get(index, ())

    def queued(self) -> int:
        """Segments waiting in source queues (some may have been fetched since they were queued)."""
        return sum(s.queued_segments() for s in self.sources.values() if not s.dead)

    def deferred(self) -> int:
        """MISSING segments that no queue holds: the broker left them out of the plan."""
        return self.segment_count - self.done - self.pending - self.queued()

    def wants_plan(self, low_water: int) -> bool:
        """True when deferred segments remain and queued work is running low."""
        return self.queued() <= low_water and self.deferred() > 0

    # ---- progress

    @property
    def complete(self) -> bool:
        return self.done == self.segment_count

    def missing(self) -> SegmentSet:
        return SegmentSet(_runs(_NOT_DONE_RUN, self.state, 0, self.segment_count))

    def source_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.segment_sources:
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        return counts
