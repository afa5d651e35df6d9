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
`report_bad`: its claim on those segments is dropped at once, and after `strike_limit` strikes
within `strike_window_s` it is benched (never offered as a source) for `bench_s`; the reason is
kept for stats and logs. One reporter's strikes count for at most `strike_limit - 1` (at least
1), however many reports it sends: unless the limit is 1, a single hostile peer cannot bench
anyone, while two downloaders who both got bad bytes can. A report is believed only for the runs
the broker planned from that source to that reporter recently (`note_planned_runs`, a bounded
record per reporter), so a peer cannot strip claims it was never sent to fetch. A refusal also
(or any report) puts the file on the accused peer's `recheck` list (handed out with its next `pong`): it
re-verifies what it holds and announces it again, so a false report costs a claim for seconds,
never for good.

Identity: each registration gets a fresh secret `token` and a heartbeat sequence; `heartbeat`
accepts a beat only with that token, a sequence number above the last one accepted and, in
authenticated mode, from the peer's own CURVE key.

Active downloads: a peer that asks for a file's plan, or reports progress on it, is one of the
file's active downloaders until it holds the whole file, leaves, or goes quiet on it for
`idle_s`. Each gets a join position the first time, kept while it stays active: the relay trees
(broker/planner.py, step 6) are built over the active downloaders in that order, so they change
little as downloaders come and go.
"""

from __future__ import annotations

import heapq
import hmac
from collections import deque
from collections.abc import Container, Iterable
from dataclasses import dataclass, field

from common.protocol import RESERVED_SOURCE_NAMES
from common.ranges import Run, SegmentSet

PLANNED_TTL_S = 120.0  # a plan's runs may be reported this long after it was made
MAX_PLANNED_FILES = 16  # files whose plans are remembered per reporter (the oldest go first)
MAX_PLANNED_RUNS = 16_384  # plan entries remembered per reporter and file (the oldest plans go first)
MAX_RECHECK_FILES = 64  # files a peer may be asked to re-verify at once
BULK_RUNS = 64  # more runs than this in one change: merge in one pass, not run by run


@dataclass
class _Planned:
    """The plans sent to one reporter for one file, kept as they were sent: (source names,
    entries (first, count, source index)). Indexed by source only when a report needs it (a
    GET at N = 1,000 spent a quarter of its time merging each plan's runs into sets that
    reports, rare, were the only readers of)."""

    at: float
    plans: deque[tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]] = field(default_factory=deque)
    runs: int = 0  # entries kept, over all plans
    index: dict[str, SegmentSet] | None = None  # by source, built at the first report after a plan

    def by_source(self, source: str) -> SegmentSet | None:
        if self.index is None:
            runs: dict[str, list[Run]] = {}
            for names, entries in self.plans:
                for first, count, i in entries:
                    if names[i] not in RESERVED_SOURCE_NAMES:  # the origin is not reported on
                        runs.setdefault(names[i], []).append((first, count))
            self.index = {name: SegmentSet(_union([], sorted(r))) for name, r in runs.items()}
        return self.index.get(source)


def _union(a: list[Run], b: list[Run]) -> list[Run]:
    """Union of two lists of runs, each sorted by first (merged, one pass)."""
    out: list[Run] = []
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        if ib >= len(b) or (ia < len(a) and a[ia][0] <= b[ib][0]):
            first, count = a[ia]
            ia += 1
        else:
            first, count = b[ib]
            ib += 1
        if out and first <= out[-1][0] + out[-1][1]:
            last_first, last_count = out[-1]
            out[-1] = (last_first, max(last_first + last_count, first + count) - last_first)
        else:
            out.append((first, count))
    return out


def _difference(held: list[Run], removed: list[Run]) -> list[Run]:
    """`held` (sorted, disjoint) without `removed` (sorted by first), in one pass."""
    out: list[Run] = []
    j = 0
    for first, count in held:
        start, end = first, first + count
        while j < len(removed) and removed[j][0] + removed[j][1] <= start:
            j += 1
        k = j
        while start < end and k < len(removed) and removed[k][0] < end:
            r_start, r_end = removed[k][0], removed[k][0] + removed[k][1]
            if r_start > start:
                out.append((start, r_start - start))
            start = max(start, r_end)
            k += 1
        if start < end:
            out.append((start, end - start))
    return out


PRUNE_S = 0.5  # the downloaders of a file are checked for liveness at most this often
COMPLETE_GRACE = 5  # idle periods a complete downloader keeps its relay places


@dataclass
class PeerRecord:
    name: str
    routing_id: bytes
    endpoint: str
    registered_at: float
    last_seen: float
    holdings: dict[bytes, SegmentSet] = field(default_factory=dict)
    strikes: list[tuple[float, str]] = field(default_factory=list)  # (when, reporter)
    benched_until: float = 0.0
    bench_reason: str = ""
    up_bps: int = 0  # its own report (heartbeats): highest upload rate over its last seconds
    # The highest up_bps it reported since registering: what its uplink showed while serving
    # earlier downloads, so that the trees of the next file know it before it relays anything.
    up_peak: int = 0
    planned: float = 0.0  # segments recently planned from this peer (decays): its load
    planned_at: float = 0.0
    heap_deadline: float = 0.0  # the deadline of this record's one live entry in the expiry heap
    token: bytes = b""  # the secret of this registration; heartbeats must carry it
    heartbeat_seq: int = -1  # the last heartbeat sequence number accepted
    key: bytes | None = None  # its CURVE public key (raw), in authenticated mode
    plans: dict[bytes, _Planned] = field(default_factory=dict)  # as a reporter: plans it got
    recheck: dict[bytes, None] = field(default_factory=dict)  # files to re-verify (ordered set)

    def note_upload(self, up_bps: int) -> None:
        self.up_bps = up_bps
        self.up_peak = max(self.up_peak, up_bps)


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
        # Names of each file's holders outside the `skip` set a GET passes (its relay crowd):
        # the crowd changes when the trees do, the names when a peer starts or stops holding
        # the file (`_holder_names` counts those changes). At 1,000 downloaders the crowd is
        # nearly everyone, and a pass over all of them was 31 us of every GET.
        self._holder_names = 0
        self._outside: dict[bytes, tuple[object, int, list[str]]] = {}
        self._expiry_heap: list[tuple[float, str]] = []
        self.evicted_total = 0
        # file_id -> downloader -> (join position, last sign of activity)
        self._active: dict[bytes, dict[str, tuple[int, float]]] = {}
        self._versions: dict[bytes, int] = {}  # file_id -> version of its set of downloaders
        self._members: dict[bytes, tuple[float, int, list[tuple[int, str]]]] = {}  # pruned at, version, list

    # ---- membership

    def register(
        self,
        name: str,
        routing_id: bytes,
        endpoint: str,
        holdings: Iterable[tuple[bytes, Iterable[Run]]],
        now: float,
        token: bytes = b"",
        key: bytes | None = None,
    ) -> bool:
        """Add or replace a peer with exactly these holdings; True when it replaced a record.
        `token`: the secret its heartbeats must carry; `key`: its CURVE public key, if any."""
        old = self.peers.get(name)
        replaced = old is not None
        if old is not None:
            self.remove(name)
        record = PeerRecord(name, routing_id, endpoint, now, now, token=token, key=key)
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
            self._bump(file_id)
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
                self._holder_names += 1
                if not holders:
                    del self._by_file[file_id]
        return True

    def peer_by_routing(self, routing_id: bytes) -> PeerRecord | None:
        name = self._by_routing.get(routing_id)
        return self.peers.get(name) if name is not None else None

    def touch(self, name: str, now: float, up_bps: int = 0) -> bool:
        """Life from a peer (no checks: `heartbeat` checks); `up_bps`: its own figure of its
        recent peak upload rate."""
        record = self.peers.get(name)
        if record is None:
            return False
        record.last_seen = now
        record.note_upload(up_bps)
        return True

    def heartbeat(
        self, name: str, token: bytes, seq: int, now: float, up_bps: int = 0, key: bytes | None = None
    ) -> str | None:
        """A heartbeat: None when accepted (the peer lives on), else why it was refused: `unknown`
        (no such peer), `key` (sent with another CURVE key), `token` (not this registration's
        secret), `replay` (a sequence number not above the last one accepted)."""
        record = self.peers.get(name)
        if record is None:
            return "unknown"
        if record.key is not None and key != record.key:
            return "key"
        if not hmac.compare_digest(token, record.token):
            return "token"
        if seq <= record.heartbeat_seq:
            return "replay"
        record.heartbeat_seq = seq
        record.last_seen = now
        record.note_upload(up_bps)
        return None

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
            self._holder_names += 1
        runs = list(runs)
        if len(runs) > BULK_RUNS:
            # Run by run, each insertion in the middle moves the lists' tails: quadratic for a
            # request of 65,536 runs in reverse order. Sorted and merged, it is one pass.
            self._replace(record, file_id, _union(held.runs(), sorted(runs)))
            return
        for first, count in runs:
            held.add(first, count)

    def remove_runs(self, name: str, file_id: bytes, runs: Iterable[Run]) -> None:
        record = self.peers.get(name)
        held = record.holdings.get(file_id) if record is not None else None
        if record is None or held is None:
            return
        runs = list(runs)
        if len(runs) > BULK_RUNS:
            self._replace(record, file_id, _difference(held.runs(), sorted(runs)))
            return
        for first, count in runs:
            held.remove(first, count)

    def _replace(self, record: PeerRecord, file_id: bytes, runs: list[Run]) -> None:
        """Put a new set (sorted, disjoint runs) in place of a peer's holdings of a file."""
        held = SegmentSet(runs)  # in order: appends only
        record.holdings[file_id] = held
        holders = self._by_file.setdefault(file_id, {})
        if record.name not in holders:
            self._holder_names += 1
        holders[record.name] = held

    def forget_file(self, file_id: bytes) -> None:
        """Drop every claim on a file version the broker no longer serves."""
        self._active.pop(file_id, None)
        self._bump(file_id)
        self._holder_names += 1
        self._outside.pop(file_id, None)
        for name in self._by_file.pop(file_id, {}):
            record = self.peers.get(name)
            if record is not None:
                record.holdings.pop(file_id, None)

    def holdings_of(self, name: str, file_id: bytes) -> SegmentSet:
        record = self.peers.get(name)
        held = record.holdings.get(file_id) if record is not None else None
        return held.copy() if held is not None else SegmentSet()

    def holders(
        self, file_id: bytes, now: float, exclude: str | None = None, skip: Container[str] = ()
    ) -> list[Holder]:
        """Live, unbenched peers holding any segment of the file, with their current load;
        `skip`: names to leave out (the file's downloaders, which serve through relay trees)."""
        by_file = self._by_file.get(file_id)
        if not by_file:
            return []
        cached = self._outside.get(file_id)
        if cached is not None and cached[0] is skip and cached[1] == self._holder_names:
            names = cached[2]
        else:
            names = [name for name in by_file if name not in skip]
            if isinstance(skip, (frozenset, tuple)):  # immutable: the same object, the same names
                self._outside[file_id] = (skip, self._holder_names, names)
        out: list[Holder] = []
        for name in names:
            held = by_file[name]
            if name == exclude or not held:
                continue
            record = self.peers[name]
            if record.benched_until > now:
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
            self._bump(file_id)
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
        """The file's active downloaders as (join position, holder), in join order (see
        `members`)."""
        _, members = self.members(file_id, segment_count, now, idle_s)
        out: list[tuple[int, Holder]] = []
        for position, name in members:
            holder = self.holder(name, file_id, now)
            if holder is not None:
                out.append((position, holder))
        return out

    def members(
        self, file_id: bytes, segment_count: int, now: float, idle_s: float
    ) -> tuple[int, list[tuple[int, str]]]:
        """(version, [(join position, name)]) of the file's active downloaders, in join order:
        alive, not benched, and heard from within `idle_s` (COMPLETE_GRACE times that for a
        complete copy, which serves everything it was to relay, at once).
        The version changes when the set does. Pruned at most every PRUNE_S: between prunes
        the list is the cached one (a GET must not cost a pass over a thousand downloaders)."""
        active = self._active.get(file_id)
        if not active:
            return 0, []
        cached = self._members.get(file_id)
        if cached is not None and now - cached[0] < PRUNE_S and cached[1] == self._versions.get(file_id, 0):
            return cached[1], cached[2]
        for name, (_position, last) in list(active.items()):
            record = self.peers.get(name)
            held = record.holdings.get(file_id) if record is not None else None
            complete = held is not None and held.covers(0, segment_count)
            # A complete downloader keeps its place while its crowd is still downloading
            # (COMPLETE_GRACE idle periods), so that the first to finish does not become every
            # other downloader's holder; after that it is a holder like any other.
            if record is None or now - last > (idle_s * COMPLETE_GRACE if complete else idle_s):
                del active[name]
                self._bump(file_id)
        members = sorted(
            (position, name)
            for name, (position, _) in active.items()
            if self.peers[name].benched_until <= now
        )
        version = self._versions.get(file_id, 0)
        self._members[file_id] = (now, version, members)
        if not active:
            del self._active[file_id]
        return version, members

    def holder(self, name: str, file_id: bytes, now: float) -> Holder | None:
        """One peer as a source of one file (its live holdings, not a copy: planning reads it in
        this thread and keeps nothing)."""
        record = self.peers.get(name)
        if record is None:
            return None
        held = record.holdings.get(file_id)
        return Holder(
            name, record.endpoint, held if held is not None else SegmentSet(), self.load_of(record, now)
        )

    def _bump(self, file_id: bytes) -> None:
        self._versions[file_id] = self._versions.get(file_id, 0) + 1

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

    def note_planned_runs(
        self,
        reporter: str,
        file_id: bytes,
        sources: tuple[str, ...],
        entries: tuple[tuple[int, int, int], ...],
        now: float,
    ) -> None:
        """A plan was sent to `reporter`: its `entries` (first, count, index into `sources`, the
        source names), remembered so that its reports about those runs can be believed (the
        origin's are never: it is not reported on). Bounded:
        MAX_PLANNED_FILES files per reporter (the least recently planned go first),
        MAX_PLANNED_RUNS entries per file (the oldest plans go first)."""
        record = self.peers.get(reporter)
        if record is None:
            return
        plans = record.plans
        entry = plans.pop(file_id, None)  # re-inserted last: the dict's order is recency
        if entry is None or now - entry.at > PLANNED_TTL_S:
            entry = _Planned(now)
        entry.at = now
        entries = entries[:MAX_PLANNED_RUNS]
        entry.plans.append((sources, entries))
        entry.runs += len(entries)
        while entry.runs > MAX_PLANNED_RUNS:
            entry.runs -= len(entry.plans.popleft()[1])
        entry.index = None
        plans[file_id] = entry
        while len(plans) > MAX_PLANNED_FILES:
            del plans[next(iter(plans))]

    def planned_runs(
        self, reporter: str, file_id: bytes, source: str, runs: Iterable[Run], now: float
    ) -> list[Run]:
        """The part of `runs` that was planned from `source` to `reporter` within PLANNED_TTL_S."""
        record = self.peers.get(reporter)
        entry = record.plans.get(file_id) if record is not None else None
        if entry is None or now - entry.at > PLANNED_TTL_S:
            return []
        planned = entry.by_source(source)
        if planned is None:
            return []
        out: list[Run] = []
        for first, count in runs:
            out.extend(planned.intersect_run(first, count))
        return out

    def take_recheck(self, name: str) -> tuple[bytes, ...]:
        """The files this peer is to re-verify and announce again (the list is emptied)."""
        record = self.peers.get(name)
        if record is None or not record.recheck:
            return ()
        files = tuple(record.recheck)
        record.recheck.clear()
        return files

    def strikes_of(self, record: PeerRecord) -> int:
        """Strikes that count: each reporter's, up to `strike_limit - 1` (at least 1)."""
        cap = max(self.strike_limit - 1, 1)
        by_reporter: dict[str, int] = {}
        for _, who in record.strikes:
            by_reporter[who] = min(by_reporter.get(who, 0) + 1, cap)
        return sum(by_reporter.values())

    def report_bad(
        self,
        name: str,
        file_id: bytes,
        runs: Iterable[Run],
        reason: str,
        now: float,
        strike: bool = True,
        reporter: str = "",
    ) -> bool:
        """Drop the peer's claim on these segments; with `strike`, bench it after `strike_limit`
        strikes within the window, one reporter's counting for at most `strike_limit - 1`.

        A refusal (the peer says it lacks segments it was listed for) only drops the claim; bytes
        that failed verification also strike. Either way the peer is asked to re-verify the file
        and announce it again (`take_recheck`). Returns True when this report benched the peer.
        """
        record = self.peers.get(name)
        if record is None:
            return False
        self.remove_runs(name, file_id, runs)
        # Whatever the reason, the accused re-verifies and announces what it still holds: a false
        # report costs it the claim for a ping period; a real liar is benched by its strikes.
        record.recheck.pop(file_id, None)
        record.recheck[file_id] = None
        while len(record.recheck) > MAX_RECHECK_FILES:
            del record.recheck[next(iter(record.recheck))]
        if not strike:
            return False
        record.strikes = [(t, who) for t, who in record.strikes if now - t < self.strike_window_s]
        record.strikes.append((now, reporter))
        if self.strikes_of(record) >= self.strike_limit and record.benched_until <= now:
            record.benched_until = now + self.bench_s
            record.bench_reason = reason
            return True
        return False
