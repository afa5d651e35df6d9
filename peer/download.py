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

Every request in flight is one `Request` object in its source's `requests` list: the only record
of it (the transfer core indexes the same objects by id and stamps their times). Per-segment
state lives in bytearrays updated by slice, and who delivered what as one `SegmentSet` per
source, so that a 1 GiB download costs a few hundred KiB and its hot paths run at C speed (the
in-memory swarm runs a thousand of these at once).
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from common.ranges import Run, SegmentSet

BROKER = "broker"
LOCAL = "local"  # segments held before the download started
_MISSING_RUN = re.compile(b"\\x00+")  # SegmentState.MISSING
_NOT_DONE_RUN = re.compile(b"[\\x00\\x01]+")  # MISSING or PENDING
_PENDING_RUN = re.compile(b"\\x01+")
_PENDING_BYTE = b"\x01"
_DONE_BYTE = b"\x02"
# Byte maps that add or take one from every count of a slice at C speed (saturating).
_PLUS_ONE = bytes(range(1, 256)) + b"\xff"
_MINUS_ONE = b"\x00" + bytes(range(255))


class SegmentState(enum.IntEnum):
    MISSING = 0
    PENDING = 1
    DONE = 2


def _runs(pattern: re.Pattern[bytes], state: bytearray, first: int, end: int) -> list[Run]:
    return [(m.start(), m.end() - m.start()) for m in pattern.finditer(state, first, end)]


@dataclass(eq=False, slots=True)
class Request:
    """One request in flight: a run asked of a source. Identity matters, not equality."""

    source: str
    first: int
    count: int
    id: int = 0
    sent_at: float = 0.0
    deadline: float = 0.0
    nbytes: int = 0
    duplicate: bool = False  # an endgame copy of a run already asked elsewhere
    plan: int = 0  # the plan it was asked under (Download.plans when it was made)

    @property
    def run(self) -> Run:
        return self.first, self.count


@dataclass(eq=False)
class SourceState:
    name: str
    endpoint: str
    holds: SegmentSet | None  # None: every segment
    queue: deque[Run] = field(default_factory=deque)
    queued_count: int = 0  # segments in `queue` (some may have been fetched since they were queued)
    timeouts_in_a_row: int = 0
    dead: bool = False
    requests: list[Request] = field(default_factory=list)  # in flight, oldest first

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    def has(self, index: int) -> bool:
        return self.holds is None or index in self.holds

    def holds_run(self, first: int, count: int) -> bool:
        return self.holds is None or self.holds.covers(first, count)

    def queued_segments(self) -> int:
        return self.queued_count

    def push(self, run: Run) -> None:
        self.queue.append(run)
        self.queued_count += run[1]

    def push_front(self, run: Run) -> None:
        self.queue.appendleft(run)
        self.queued_count += run[1]

    def pop(self) -> Run:
        run = self.queue.popleft()
        self.queued_count -= run[1]
        return run

    def pop_back(self) -> Run:
        run = self.queue.pop()
        self.queued_count -= run[1]
        return run

    def clear(self) -> list[Run]:
        runs, self.queue, self.queued_count = list(self.queue), deque(), 0
        return runs


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
        self.received: dict[str, SegmentSet] = {}  # source -> segments it delivered
        self.sources: dict[str, SourceState] = {}
        self.excluded: dict[int, set[str]] = {}  # segment -> sources that failed or refused it
        self.done = 0
        self.pending = 0
        self.outstanding = bytearray(segment_count)  # requests in flight covering each segment
        self.stuck: list[int] = []
        self.last_request: Request | None = None  # the one `take` made last
        self.later_since: dict[tuple[str, int], float] = {}  # (source, first segment) -> first `later`
        self.plans = 0  # plans adopted so far
        for first, count in held.runs():
            self.state[first : first + count] = _DONE_BYTE * count
            self.done += count
        if held:
            self.received[LOCAL] = held.copy()

    # ---- plans

    def replan(
        self, sources: list[tuple[str, str, SegmentSet | None]], plan: list[tuple[int, int, int]]
    ) -> None:
        """Adopt a plan: sources as (name, endpoint, holdings or None) and (first, count, source)."""
        self.plans += 1
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
                old.clear()
                fresh[name] = old
        self.sources = fresh
        self.stuck.clear()
        for first, count, index in plan:
            if not 0 <= index < len(sources) or first + count > self.segment_count:
                continue
            target = self.sources[sources[index][0]]
            for run in self._missing_runs(first, count):
                target.push(run)

    def add_source(self, name: str, endpoint: str, holds: SegmentSet | None, runs: list[Run]) -> None:
        """Merge a pushed update: a source (new, or known with more segments) and runs to ask of it.

        Unlike `replan`, the other queues stay as they are: an update adds, it never takes away.
        """
        source = self.sources.get(name)
        if source is None or source.endpoint != endpoint:
            fresh = SourceState(name, endpoint, holds)
            if source is not None:
                fresh.requests = source.requests
            self.sources[name] = source = fresh
        elif holds is None:
            source.holds = None
        elif source.holds is not None:
            source.holds.update(holds)
        source.dead = False
        for first, count in runs:
            for run in self._missing_runs(first, min(count, self.segment_count - first)):
                if self._queued_elsewhere(run):
                    continue
                source.push(run)

    def _queued_elsewhere(self, run: Run) -> bool:
        """True when a live queue already holds the first segment of `run` (a deferred segment is
        queued nowhere; an update must not queue a segment twice)."""
        first = run[0]
        for source in self.sources.values():
            if source.dead:
                continue
            for q_first, q_count in source.queue:
                if q_first <= first < q_first + q_count:
                    return True
        return False

    def _missing_runs(self, first: int, count: int) -> list[Run]:
        # A regex over the state bytes finds the runs at C speed: this runs for every plan entry
        # of every replan and every take, so a Python loop per segment would dominate.
        return _runs(_MISSING_RUN, self.state, first, first + count)

    # ---- taking work

    def take(self, source_name: str, limit: int | None = None) -> Run | None:
        """The next run to ask of this source (marked PENDING), or None. `limit` caps its length
        below `batch` (a slow source gets shorter requests)."""
        source = self.sources.get(source_name)
        if source is None or source.dead:
            return None
        batch = self.batch if limit is None else max(1, min(limit, self.batch))
        while source.queue:
            first, count = source.pop()
            runs = self._missing_runs(first, count)
            if not runs:
                continue
            head_first, head_count = runs[0]
            take = min(head_count, batch)
            rest = [(head_first + take, head_count - take)] if head_count > take else []
            for run in reversed(rest + runs[1:]):
                source.push_front(run)
            self.state[head_first : head_first + take] = _PENDING_BYTE * take
            self.pending += take
            self._ask(source, head_first, take)
            return head_first, take
        return None

    def _ask(self, source: SourceState, first: int, count: int, duplicate: bool = False) -> Request:
        request = Request(source.name, first, count, duplicate=duplicate, plan=self.plans)
        source.requests.append(request)
        out = self.outstanding
        out[first : first + count] = out[first : first + count].translate(_PLUS_ONE)
        self.last_request = request
        return request

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
                if self.outstanding.count(1, first, end) != count:
                    continue
                if not source.holds_run(first, count):
                    continue
                if self.excluded and any(source_name in self.excluded.get(i, ()) for i in range(first, end)):
                    continue
                if self.state.count(_PENDING_BYTE, first, end) == count:
                    self._ask(source, first, count, duplicate=True)
                    return first, count
        return None

    def steal(self, source_name: str, victims: list[str], limit: int) -> int:
        """Work stealing: move up to `limit` queued segments that `source_name` holds from the
        back of the victims' queues (in the order given: the slowest first) to this source.
        Returns the segments moved. The back of a queue is what its source would reach last."""
        thief = self.sources.get(source_name)
        if thief is None or thief.dead or limit <= 0:
            return 0
        moved = 0
        for victim_name in victims:
            victim = self.sources.get(victim_name)
            if victim is None or victim is thief or victim.dead:
                continue
            kept: list[Run] = []
            while victim.queue and moved < limit:
                first, count = victim.pop_back()
                for run_first, run_count in reversed(self._missing_runs(first, count)):
                    if moved >= limit:
                        kept.append((run_first, run_count))
                        continue
                    # Take from the end of the run what the thief holds; the rest stays.
                    cursor = run_first + run_count
                    for part_first, part_count in reversed(self._held_parts(thief, run_first, run_count)):
                        part_end = part_first + part_count
                        if part_end < cursor:
                            kept.append((part_end, cursor - part_end))
                        take = min(part_count, limit - moved)
                        cursor = part_end - take
                        thief.push((cursor, take))
                        moved += take
                        if moved >= limit:
                            break
                    if cursor > run_first:
                        kept.append((run_first, cursor - run_first))
            for run in sorted(kept):  # what was not taken goes back, in index order
                victim.push(run)
            if moved >= limit:
                break
        return moved

    @staticmethod
    def _held_parts(source: SourceState, first: int, count: int) -> list[Run]:
        if source.holds is None:
            return [(first, count)]
        return source.holds.intersect_run(first, count)

    def in_endgame(self) -> bool:
        """Every segment not done is in flight: nothing queued, nothing deferred. (Tested in
        this order: the sum over the queues runs only when the counts say it may be true.)"""
        return self.pending > 0 and self.done + self.pending == self.segment_count and self.queued() == 0

    def not_done_runs(self, first: int, count: int) -> list[Run]:
        """The parts of a run not yet DONE (a duplicate reply must not write twice)."""
        return _runs(_NOT_DONE_RUN, self.state, first, first + count)

    def sources_with_work(self) -> list[str]:
        return [s.name for s in self.sources.values() if s.queue and not s.dead]

    def has_work(self) -> bool:
        """Some live source has something queued."""
        return any(s.queue and not s.dead for s in self.sources.values())

    # ---- outcomes

    def end_request(self, request: Request) -> None:
        """A request ended, whatever its outcome: drop it from its source's list (by identity)."""
        source = self.sources.get(request.source)
        if source is None:
            return
        for k, req in enumerate(source.requests):
            if req is request:
                del source.requests[k]
                self._release(req.first, req.count)
                return

    def _release(self, first: int, count: int) -> None:
        out = self.outstanding
        out[first : first + count] = out[first : first + count].translate(_MINUS_ONE)

    def on_done(self, source_name: str, first: int, count: int) -> None:
        """Segments of a run verified and written (may be a part of the run asked for)."""
        self.on_reply(source_name, first, count)
        end = first + count
        state = self.state
        already = state.count(_DONE_BYTE, first, end)
        if already != count:
            self.pending -= state.count(_PENDING_BYTE, first, end)
            received = self.received.get(source_name)
            if received is None:
                received = self.received[source_name] = SegmentSet()
            if already:
                for run_first, run_count in self.not_done_runs(first, count):
                    received.add(run_first, run_count)
            else:
                received.add(first, count)
            state[first:end] = _DONE_BYTE * count
            self.done += count - already
        source = self.sources.get(source_name)
        if source is not None:
            source.timeouts_in_a_row = 0

    def on_reply(self, source_name: str, first: int, count: int) -> None:
        """A request to this source ended, whatever its outcome. The outcome calls below do this
        too, for the request they answer; calling it first is harmless."""
        source = self.sources.get(source_name)
        if source is None or not source.requests:
            return
        end = first + count
        ended = [r for r in source.requests if r.first < end and first < r.first + r.count]
        for req in ended:
            source.requests.remove(req)
            self._release(req.first, req.count)

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

    def on_later(
        self, source_name: str, runs: list[Run], now: float, limit_s: float, asked_under: int | None = None
    ) -> None:
        """The source is fetching these segments itself (a relay parent): they go back to the
        front of its queue, as they were planned; no blame. Unless they were asked under an
        older plan (`asked_under`): then they wait for the next plan, which places them on the
        tree of now. Relays waiting on each other in a cycle hold requests made under plans of
        different trees, and a request parked at a relay is in flight during every replan, so
        without this it would be asked of the same relay again and again. A segment still
        `later` at the same source after `limit_s` (counted once the source has delivered some
        of the download) is taken elsewhere all the same."""
        for first, count in runs:
            self.on_reply(source_name, first, count)
        source = self.sources.get(source_name)
        stale = asked_under is not None and asked_under != self.plans
        for first, count in reversed(runs):
            for run_first, run_count in reversed(self._pending_runs(first, count)):
                self.state[run_first : run_first + run_count] = bytes(run_count)  # MISSING
                self.pending -= run_count
                if stale:
                    continue  # deferred: the next plan decides
                # The limit runs once the source has delivered some of this download: a relay
                # that has not yet is still being fed (five levels deep, 1,000 downloaders take
                # seconds to fill), and giving up on it there made every downloader of a stripe
                # ask the origin at once, which starved the stripe's root and stopped the swarm.
                since = (
                    self.later_since.setdefault((source_name, run_first), now)
                    if self.received.get(source_name)
                    else now
                )
                if source is not None and not source.dead and now - since < limit_s:
                    source.push_front((run_first, run_count))
                    continue
                hint = None
                for i in range(run_first, run_first + run_count):
                    self.excluded.setdefault(i, set()).add(source_name)
                    hint = self._requeue(i, hint=hint)

    def _pending_runs(self, first: int, count: int) -> list[Run]:
        """PENDING parts of a run no other request covers (an endgame copy may still bring them)."""
        out: list[Run] = []
        for run_first, run_count in _runs(_PENDING_RUN, self.state, first, first + count):
            start = None
            for i in range(run_first, run_first + run_count):
                if self.outstanding[i] == 0:
                    if start is None:
                        start = i
                elif start is not None:
                    out.append((start, i - start))
                    start = None
            if start is not None:
                out.append((start, run_first + run_count - start))
        return out

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

    def on_abandoned(self, request: Request) -> None:
        """A duplicate nobody needs any more, or a request cut short by the shell: its segments go
        back to MISSING and are queued again where they were asked (no blame)."""
        self.end_request(request)
        hint: SourceState | None = self.sources.get(request.source)
        for i in range(request.first, request.first + request.count):
            if self.state[i] == SegmentState.PENDING and not self.outstanding[i]:
                self._mark_missing(i)
                hint = self._requeue(i, hint=hint)

    def mark_dead(self, source_name: str) -> None:
        source = self.sources.get(source_name)
        if source is None or source.dead:
            return
        source.dead = True
        hint = None
        for first, count in source.clear():
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
        excluded = self.excluded.get(index, ())
        if (
            hint is not None
            and hint.name != BROKER
            and hint.name != avoid
            and not hint.dead
            and hint.name not in excluded
            and hint.has(index)
            and self.sources.get(hint.name) is hint
        ):
            target: SourceState | None = hint
        else:
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
                target = min(peers, key=lambda s: s.queued_count + s.in_flight * self.batch)
            elif self._broker_usable(index):
                target = self.sources[BROKER]
            elif avoid is not None and avoid in self.sources and not self.sources[avoid].dead:
                target = self.sources[avoid]  # slow, but the only one left
            else:
                self.stuck.append(index)
                return None
        assert target is not None
        queue = target.queue
        if queue and queue[-1][0] + queue[-1][1] == index:
            last_first, last_count = target.pop_back()
            target.push((last_first, last_count + 1))
        else:
            target.push((index, 1))
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
        return sum(s.queued_count for s in self.sources.values() if not s.dead)

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
        return {name: len(held) for name, held in self.received.items() if held}

    def source_runs(self) -> dict[str, list[Run]]:
        return {name: held.runs() for name, held in self.received.items() if held}

    @property
    def segment_sources(self) -> list[str | None]:
        """For each segment: who delivered it (None while not done). Built on demand."""
        out: list[str | None] = [None] * self.segment_count
        for name, held in self.received.items():
            for first, count in held.runs():
                out[first : first + count] = [name] * count
        return out
