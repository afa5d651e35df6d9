"""Registry: which peers are alive and which segments each one holds. Pure: no sockets, no clock.

Theory of operation
-------------------
Every call takes `now` (monotonic seconds). A peer is alive while `now - last_seen` stays under
`expiry_s` (heartbeat interval x liveness); heartbeats and every valid request refresh it.
`expire(now)` removes the peers whose time ran out and returns their names; `next_expiry()` tells
the shell how long it may sleep. Expiry uses a lazy heap: touching a peer only updates its
`last_seen`; when a heap entry comes due it is checked against that and pushed back if the peer
was seen since, so a heartbeat costs O(1) and expiry O(log n).

Holdings are kept twice, by peer and by file, as `SegmentSet`s (runs), so that dropping a peer
and answering "who holds file X" are both cheap.

A peer that serves bytes failing verification, or refuses segments it claimed, is reported with
`report_bad`: its claim on those segments is dropped at once, and after `strike_limit` reports
within `strike_window_s` it is benched (never offered as a source) for `bench_s`; the reason is
kept for stats and logs.

Active downloads: a peer that asks for a file's plan, or reports progress on it, is one of the
file's active downloaders until it holds the whole file, leaves, or goes quiet on it for
`idle_s`. Each gets a join position the first time, kept while it stays active: the relay trees
(broker/planner.py, step 6) are built over the active downloaders in that order, so they change
little as downloaders come and go.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.ranges import Run, SegmentSet


@dataclass
class PeerRecord:
    name: str
    routing_id: bytes
    endpoint: str
    registered_at: float
    last_seen: float
    holdings: dict[bytes, SegmentSet] = field(default_factory=dict)
    strikes: list[float] = field(default_factory=list)
    benched_until: float = 0.0
    bench_reason: str = ""
    up_bps: int = 0  # its own report (heartbeats): highest upload rate over its last seconds
    planned: float = 0.0  # segments recently planned from this peer (decays): its load
    planned_at: float = 0.0
    heap_deadline: float = 0.0  # the deadline of this record's one live entry in the expiry heap


@dataclass(frozen=True, slots=True)
class Holder:
    name: str
    endpoint: str
    segments: SegmentSet
    load: float


class Registry:
    def __init__(
        self,
        expiry_s: float,
        strike_limit: int = 3,
        strike_window_s: float = 60.0,
        bench_s: float = 30.0,
        load_half_life_s: float = 2.0,
    ) -> None:
        self.expiry_s = expiry_s
        self.strike_limit = strike_limit
        self.strike_window_s = strike_window_s
        self.bench_s = bench_s
        self.load_half_life_s = load_half_life_s
        self.peers: dict[str, PeerRecord] = {}
        self._by_routing: dict[bytes, str] = {}
        self._by_file: dict[bytes, dict[str, SegmentSet]] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self.evicted_total = 0
        # file_id -> downloader -> (join position, last sign of activity)
        self._active: dict[bytes, dict[str, tuple[int, float]]] = {}

    # ---- membership

    def register(
        self,
        name: str,
        routing_id: bytes,
        endpoint: str,
        holdings: Iterable[tuple[bytes, Iterable[Run]]],
        now: float,
    ) -> bool:
        """Add or replace a peer with exactly these holdings; True when it replaced a record."""
        old = self.peers.get(name)
        replaced = old is not None
        if old is not None:
            self.remove(name)
        record = PeerRecord(name, routing_id, endpoint, now, now)
        if old is not None:  # a re-registering peer keeps its strikes: restarting must not clear them
            record.strikes, record.benched_until = old.strikes, old.benched_until
            record.bench_reason = old.bench_reason
        self.peers[name] = record
        stale = self._by_routing.get(routing_id)
        if stale is not None and stale != name:
            self.remove(stale)
        self._by_routing[routing_id] = name
        for file_id, runs in holdings:
            self.add_runs(name, file_id, runs)
        record.heap_deadline = now + self.expiry_s
        heapq.heappush(self._expiry_heap, (record.heap_deadline, name))
        return replaced

    def _forget_downloads(self, name: str) -> None:
        for file_id in [f for f, active in self._active.items() if name in active]:
            del self._active[file_id][name]
            if not self._active[file_id]:
                del self._active[file_id]

    def remove(self, name: str) -> bool:
        record = self.peers.pop(name, None)
        self._forget_downloads(name)
        if record is None:
            return False
        if self._by_routing.get(record.routing_id) == name:
            del self._by_routing[record.routing_id]
        for file_id in record.holdings:
            holders = self._by_file.get(file_id)
            if holders is not None:
                holders.pop(name, None)
                if not holders:
                    del self._by_file[file_id]
        return True

    def peer_by_routing(self, routing_id: bytes) -> PeerRecord | None:
        name = self._by_routing.get(routing_id)
        return self.peers.get(name) if name is not None else None

    def touch(self, name: str, now: float, up_bps: int = 0) -> bool:
        """A heartbeat; `up_bps`: the peer's own figure of its recent peak upload rate."""
        record = self.peers.get(name)
        if record is None:
            return False
        record.last_seen = now
        record.up_bps = up_bps
        return True

    def expire(self, now: float) -> list[str]:
        evicted: list[str] = []
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            entry_deadline, name = heapq.heappop(heap)
            record = self.peers.get(name)
            if record is None or entry_deadline != record.heap_deadline:
                continue  # an entry left by a record that was removed or re-registered
            deadline = record.last_seen + self.expiry_s
            if deadline <= now:
                self.remove(name)
                evicted.append(name)
            else:
                record.heap_deadline = deadline
                heapq.heappush(heap, (deadline, name))
        self.evicted_total += len(evicted)
        return evicted

    def next_expiry(self) -> float | None:
        return self._expiry_heap[0][0] if self._expiry_heap else None

    # ---- holdings

    def add_runs(self, name: str, file_id: bytes, runs: Iterable[Run]) -> None:
        record = self.peers.get(name)
        if record is None:
            return
        held = record.holdings.get(file_id)
        if held is None:
            held = record.holdings[file_id] = SegmentSet()
            self._by_file.setdefault(file_id, {})[name] = held
        for first, count in runs:
            held.add(first, count)

    def remove_runs(self, name: str, file_id: bytes, runs: Iterable[Run]) -> None:
        record = self.peers.get(name)
        held = record.holdings.get(file_id) if record is not None else None
        if held is None:
            return
        for first, count in runs:
            held.remove(first, count)

    def forget_file(self, file_id: bytes) -> None:
        """Drop every claim on a file version the broker no longer serves."""
        self._active.pop(file_id, None)
        for name in self._by_file.pop(file_id, {}):
            record = self.peers.get(name)
            if record is not None:
                record.holdings.pop(file_id, None)

    def holdings_of(self, name: str, file_id: bytes) -> SegmentSet:
        record = self.peers.get(name)
        held = record.holdings.get(file_id) if record is not None else None
        return held.copy() if held is not None else SegmentSet()

    def holders(self, file_id: bytes, now: float, exclude: str | None = None) -> list[Holder]:
        """Live, unbenched peers holding any segment of the file, with their current load."""
        out: list[Holder] = []
        for name, held in self._by_file.get(file_id, {}).items():
            record = self.peers[name]
            if name == exclude or not held or record.benched_until > now:
                continue
            out.append(Holder(name, record.endpoint, held, self.load_of(record, now)))
        return out

    # ---- active downloads (the relay trees of broker/planner.py, step 6)

    def note_active(self, name: str, file_id: bytes, now: float) -> None:
        """The peer is downloading this file (it asked for a plan, or reported progress)."""
        if name not in self.peers:
            return
        active = self._active.setdefault(file_id, {})
        entry = active.get(name)
        if entry is None:
            # The lowest free position: rows stay full, and a position freed by a downloader
            # that left is taken by the next to join.
            taken = {position for position, _ in active.values()}
            position = next(p for p in range(len(taken) + 1) if p not in taken)
            active[name] = (position, now)
        else:
            active[name] = (entry[0], now)

    def note_progress(self, name: str, file_id: bytes, now: float) -> None:
        """A `have`: progress on a download keeps its downloader active (never starts one)."""
        entry = self._active.get(file_id, {}).get(name)
        if entry is not None:
            self._active[file_id][name] = (entry[0], now)

    def downloaders(
        self, file_id: bytes, segment_count: int, now: float, idle_s: float
    ) -> list[tuple[int, Holder]]:
        """The file's active downloaders as (join position, holder), in join order: alive, not
        benched, and heard from within `idle_s`, or done (a complete copy stays in its place
        for as long as its peer lives: it serves everything it was to relay, at once). Those no
        longer active are forgotten."""
        active = self._active.get(file_id)
        if not active:
            return []
        out: list[tuple[int, Holder]] = []
        for name, (position, last) in list(active.items()):
            record = self.peers.get(name)
            held = record.holdings.get(file_id) if record is not None else None
            complete = held is not None and held.covers(0, segment_count)
            if record is None or (now - last > idle_s and not complete):
                del active[name]
                continue
            if record.benched_until > now:
                continue
            # The live set, not a copy: planning reads it in this thread and keeps nothing.
            holder = Holder(
                name,
                record.endpoint,
                held if held is not None else SegmentSet(),
                self.load_of(record, now),
            )
            out.append((position, holder))
        if not active:
            del self._active[file_id]
        return sorted(out, key=lambda item: item[0])

    # ---- load and misbehaviour

    def load_of(self, record: PeerRecord, now: float) -> float:
        age = max(now - record.planned_at, 0.0)
        decay: float = 0.5 ** (age / self.load_half_life_s)
        return record.planned * decay

    def note_planned(self, name: str, segments: int, now: float) -> None:
        record = self.peers.get(name)
        if record is not None:
            record.planned = self.load_of(record, now) + segments
            record.planned_at = now

    def report_bad(
        self,
        name: str,
        file_id: bytes,
        runs: Iterable[Run],
        reason: str,
        now: float,
        strike: bool = True,
    ) -> bool:
        """Drop the peer's claim on these segments; with `strike`, bench it after repeated reports.

        A refusal (the peer says it lacks segments it was listed for) only drops the claim; bytes
        that failed verification also strike. Returns True when this report benched the peer.
        """
        record = self.peers.get(name)
        if record is None:
            return False
        self.remove_runs(name, file_id, runs)
        if not strike:
            return False
        record.strikes = [t for t in record.strikes if now - t < self.strike_window_s] + [now]
        if len(record.strikes) >= self.strike_limit and record.benched_until <= now:
            record.benched_until = now + self.bench_s
            record.bench_reason = reason
            return True
        return False
