"""Tracker: the broker's policy as one object with no sockets, no disk and no clock.

Theory of operation
-------------------
The tracker's socket shell (broker/service.py) decodes a request and hands it here with the
sender's connection id and `now`; `on_request` returns the replies to send, as (connection id,
message) pairs: usually one, to the sender, none when a request must wait (a GET for a file whose
manifest is being rebuilt), several when a rebuild finishes and the waiting GETs can be answered.
Heartbeats come in through `on_heartbeat`; `tick(now)` evicts silent peers and answers GETs that
waited too long; `next_deadline()` tells the shell how long it may sleep.

Behind it: the `Registry` (who is alive and holds what, load, strikes, active downloads) and the
planner (`plan_download`: which source serves which block); this object composes them into a
GET's answer (candidates, relay trees, spread over the file). The catalog is consulted
through lookups only; files are hashed by the catalog worker on its own thread, whose results
arrive as `on_catalog_change` (so no request ever waits for a disk).

Identity. A peer is the connection it registered over (the ROUTER routing id), and in
authenticated mode also its CURVE key (the ZAP User-Id the shell passes as `key`): a name is
bound to the key the allow-list files it under (`key_names`), so a listed peer cannot register in
another's name. Each registration gets a fresh secret token; a heartbeat counts only with that
token, a growing sequence number and (authenticated) the peer's key. A `bad_source` report is
believed only for runs that were planned from that source to that reporter recently; a refusal
makes the accused re-verify and announce the file again (its next `pong` names it), and a strike
needs several different reporters.

Everything the tracker counts is a metric in its `Metrics` set.
"""

from __future__ import annotations

import heapq
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.planner import (
    MAX_PARTIAL_HOLDERS,
    Plan,
    Relay,
    RelayTrees,
    lend_origin,
    plan_download,
    plan_window,
    stripe_share,
)
from broker.registry import Holder, Registry
from common import protocol
from common.errors import WireCode
from common.manifest import Manifest
from common.metrics import Metrics
from common.protocol import (
    BadSource,
    BadSourceReason,
    Bye,
    Error,
    FileEntry,
    FileInfo,
    Files,
    Get,
    Have,
    ListFiles,
    Lost,
    Message,
    Ok,
    Ping,
    Pong,
    Register,
    Registered,
    Source,
    Stats,
    StatsRequest,
)
from common.ranges import Run, SegmentSet
from common.service import RateLimitedLog

log = logging.getLogger(__name__)

MAX_PLAN_SOURCES = 256  # a GET names at most this many peers (the wire allows 4096)
# A plan covers the first PLAN_WINDOW_BYTES the requester lacks and a share of as much again
# from each partial holder past them (planner.plan_window); the rest is deferred to later plans
# (PROTOCOL.md 8.2: a downloader asks again before its work runs out, and replans every second
# anyway). So a GET of a 1 GiB file costs what one of 64 MiB does: plans of every block were
# 80% of the simulator's time at 100 x 1 GiB, and 10 ms (100 seeds) to 43 ms (100 partial
# holders) of the tracker thread per GET (docs/BENCHMARKS.md).
PLAN_WINDOW_BYTES = 64 << 20
GET_WAIT_S = 2.0  # a GET waits this long for a manifest being rebuilt, then is told to retry
MAX_WAITING_GETS = 10_000  # beyond this, GETs for files being rebuilt are told to retry at once
MAX_CACHED_TREES = 1024  # files whose relay trees are kept between GETs
# The default of TrackerSettings.slow_relay_factor: a relay whose peak upload is this many
# times below the fastest downloader's of its file (and whose children lag) becomes a leaf: a
# 20 Mbit/s uplink relaying a stripe to four children among 100 Mbit/s ones holds all of them
# back (with 100 / 20 links it is 5x).
SLOW_RELAY_FACTOR = 3.0
RELAY_SETTLE_S = 1.0  # a relay is judged once it has had children this long
# A relay that looks slow is found so only if it still looks slow at a check this long later:
# while trees fill, relays fed late look slow for a second or two.
SLOW_CONFIRM_S = 0.5
RELAY_CHECK_S = 0.5  # relays are judged at most this often (a GET of the file runs the check)
# Children this far behind their relay wait on its uplink. 512 KiB finds slow relays sooner on
# a LAN (simulated mixed 100/20 Mbit/s links, 32 MiB, 8 seeds: N = 100 3.0 -> 2.55x the bound;
# N = 1,000 3.47 -> 2.90x) but marks healthy relays slow while their children ramp up on longer
# paths (uniform 100 Mbit/s, N = 100, 25 ms one way: 1.94 -> 2.19x, 10 relays marked and
# unmarked a second later; uniform 20 Mbit/s N = 1,000: 1.38 -> 1.44x), so 1 MiB stays.
SLOW_LAG_BYTES = 1 << 20
# The origin lends its spare upload where the copies planned are complete and far slower than it
# (slow_relay_factor again): such a copy keeps what it delivers in LEND_HORIZON_S, the origin takes
# the rest, as much as its spare upload sends in that time. Its rate is sampled every
# ORIGIN_SAMPLE_S.
LEND_HORIZON_S = 1.0
ORIGIN_SAMPLE_S = 1.0

Reply = tuple[bytes, Message]  # (connection id, message)


class CatalogEntryView(Protocol):
    @property
    def manifest(self) -> Manifest: ...


class CatalogView(Protocol):
    """What the tracker reads of the catalog: in-memory lookups, no disk."""

    def by_name(self, name: str) -> CatalogEntryView | None: ...

    def by_id(self, file_id: bytes) -> CatalogEntryView | None: ...

    def entries(self) -> Sequence[CatalogEntryView]: ...

    def rebuilding(self, name: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class TrackerSettings:
    heartbeat_endpoint: str
    origin_endpoint: str
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    plan_policy: str = "swarm"
    plan_block_segments: int = 64
    origin_lanes: int = 2
    relay_fanout: int = 4
    slow_relay_factor: float = SLOW_RELAY_FACTOR  # 0: relays are never judged slow
    download_idle_s: float = 2.0
    strike_limit: int = 3
    bench_s: float = 30.0
    origin_public_key: bytes | None = None  # the origin's CURVE key (raw), in authenticated mode

    @property
    def peer_expiry_s(self) -> float:
        # Half an interval of grace: a peer that lost liveness - 1 heartbeats in a row and whose
        # next one is a little late is alive; a dead one is gone within interval x (liveness + 1).
        return self.heartbeat_interval_s * (self.heartbeat_liveness + 0.5)


@dataclass(slots=True)
class _FileTrees:
    """One file's relay trees and what they were built from."""

    file_id: bytes
    version: int  # of the file's set of downloaders (Registry.members)
    trees: RelayTrees
    crowd: frozenset[str]  # the downloaders
    slow: frozenset[str]  # relays found slow: leaves in every stripe
    built_at: float  # when the first of these downloaders' trees were built
    checked_at: float
    suspects: dict[str, float] = field(default_factory=dict)  # relay -> since when it looks slow


@dataclass(frozen=True, slots=True)
class _WaitingGet:
    deadline: float
    sender: bytes
    request: Get


def _clip(runs: Sequence[Run], segment_count: int) -> list[Run]:
    """Runs cut to the file's segments (a peer cannot claim segment 10**6 of a 3-segment file)."""
    out: list[Run] = []
    for first, count in runs:
        end = min(first + count, segment_count)
        if first < end:
            out.append((first, end - first))
    return out


def _spread(nth_get: int, segment_count: int, block: int) -> int:
    """Rotation for the n-th GET of a file: golden-ratio steps spread starts over the file."""
    blocks = max((segment_count + block - 1) // block, 1)
    return int(nth_get * 0.6180339887 * blocks) % blocks


class TrackerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter("tracker_requests_total", "tracker requests received, by op", ("op",))
        self.malformed = metrics.counter("tracker_malformed_requests_total", "undecodable tracker requests")
        self.replies_busy = metrics.counter(
            "tracker_replies_busy_total", "big replies replaced by busy: their client left too many unread"
        )
        self.replies_dropped = metrics.counter(
            "tracker_replies_dropped_total", "replies the ROUTER could not queue (peer gone or not reading)"
        )
        self.heartbeats = metrics.counter("heartbeats_total", "heartbeats received")
        self.heartbeats_unknown = metrics.counter("heartbeats_unknown_total", "heartbeats from unknown names")
        self.heartbeats_malformed = metrics.counter("heartbeats_malformed_total", "undecodable heartbeats")
        self.heartbeats_refused = metrics.counter(
            "heartbeats_refused_total",
            "heartbeats refused: unknown name, wrong token, replayed sequence, another peer's key",
            ("reason",),
        )
        self.registers_refused = metrics.counter(
            "registers_refused_total",
            "registrations refused (name taken, key bound to another name)",
            ("reason",),
        )
        self.bad_reports = metrics.counter("bad_source_reports_total", "bad_source reports received")
        self.bad_reports_ignored = metrics.counter(
            "bad_source_reports_ignored_total", "bad_source reports about runs never planned from that source"
        )
        self.segments_planned = metrics.counter(
            "segments_planned_total", "segments planned, by why their source was chosen", ("why",)
        )
        self.slow_relays = metrics.counter(
            "slow_relays_total",
            "downloaders moved to the relay trees' leaves: their uplink relayed far slower",
        )
        self.segments_lent = metrics.counter(
            "segments_lent_total", "segments planned from the origin instead of a far slower peer"
        )
        self.segments_relayed = metrics.counter(
            "segments_relayed_total", "segments planned from a relay-tree parent not yet holding them"
        )
        self.evicted = metrics.counter("peers_evicted_total", "peers dropped after their heartbeats stopped")
        self.live = metrics.gauge("live_peers", "peers registered and alive")
        self.gets_waiting = metrics.gauge("gets_waiting_requests", "GETs waiting for a manifest rebuild")


class Tracker:
    def __init__(
        self, settings: TrackerSettings, catalog: CatalogView, session: int, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.session = session
        self.metrics = metrics
        self.m = TrackerMetrics(metrics)
        self._bad_log = RateLimitedLog(log)
        self.registry = Registry(
            settings.peer_expiry_s, strike_limit=settings.strike_limit, bench_s=settings.bench_s
        )
        self.get_counts: dict[bytes, int] = {}
        self._trees: dict[bytes, _FileTrees] = {}
        self.bench_log: list[dict[str, Any]] = []
        self._waiting: list[tuple[float, int, _WaitingGet]] = []  # heap by deadline
        self._waiting_seq = 0
        # The origin's upload, as the shell reports its byte count: the rate of the last sample,
        # the highest rate seen (its capacity, as far as anyone has loaded it), and the segments
        # lent since the last sample (planned, not yet sent: they count against its spare).
        self._origin_sample: tuple[float, int] | None = None
        self.origin_rate_bps = 0.0
        self.origin_capacity_bps = 0.0
        self._origin_lent_bytes = 0
        # Figures of the broker's other threads (the origin's counters), added by the shell.
        self.extra_stats: Callable[[], dict[str, Any]] | None = None
        # Authenticated mode: the name a CURVE key (raw) may register as (the allow-list file it
        # is in), None for a key that may not register. Unset: names are not bound to keys.
        self.key_names: Callable[[bytes], str | None] | None = None

    # ---- inputs

    def on_origin_upload(self, sent_bytes: int, now: float) -> None:
        """The origin's payload bytes sent so far (the shell reports it often; sampled every
        ORIGIN_SAMPLE_S)."""
        if self._origin_sample is None:
            self._origin_sample = (now, sent_bytes)
            return
        then, before = self._origin_sample
        if now - then < ORIGIN_SAMPLE_S:
            return
        self.origin_rate_bps = max(sent_bytes - before, 0) / (now - then)
        self.origin_capacity_bps = max(self.origin_capacity_bps, self.origin_rate_bps)
        self._origin_sample = (now, sent_bytes)
        self._origin_lent_bytes = 0

    def on_request(
        self, request: Message, sender: bytes, now: float, key: bytes | None = None
    ) -> list[Reply]:
        """`key`: the sender's CURVE public key (raw) in authenticated mode."""
        self.m.requests.inc(labels=(request.OP,))
        record = self.registry.peer_by_routing(sender)
        if record is not None and record.key != key:
            record = None  # a connection carries one key; a mismatch is a bug or a forgery
        if record is not None:
            record.last_seen = now
        peer = record.name if record is not None else None
        if isinstance(request, Get):
            reply = self.on_get(request, sender, peer, now)
            return [] if reply is None else [(sender, reply)]
        if isinstance(request, Register):
            return [(sender, self.on_register(request, sender, now, key))]
        return [(sender, self._answer(request, sender, peer, now))]

    def on_malformed(self, sender: bytes, rid: int, problem: str) -> list[Reply]:
        self.m.malformed.inc()
        return [(sender, Error(rid, WireCode.MALFORMED, problem))]

    def on_heartbeat(
        self, name: str, token: bytes, seq: int, now: float, up_bps: int = 0, key: bytes | None = None
    ) -> str | None:
        """A heartbeat; None when it counted, else why not (see Registry.heartbeat)."""
        self.m.heartbeats.inc()
        refused = self.registry.heartbeat(name, token, seq, now, up_bps, key)
        if refused == "unknown":
            self.m.heartbeats_unknown.inc()
        if refused is not None:
            self.m.heartbeats_refused.inc(labels=(refused,))
        return refused

    def tick(self, now: float) -> tuple[list[str], list[Reply]]:
        """Evict silent peers; tell GETs that waited too long to retry. Returns (evicted, replies)."""
        evicted = self.registry.expire(now)
        if evicted:
            self.m.evicted.inc(len(evicted))
            self.m.live.set(len(self.registry.peers))
        replies: list[Reply] = []
        while self._waiting and self._waiting[0][0] <= now:
            _, _, waiting = heapq.heappop(self._waiting)
            replies.append((waiting.sender, self._retry_later(waiting.request)))
        self.m.gets_waiting.set(len(self._waiting))
        return evicted, replies

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.registry.next_expiry(),) if d is not None]
        if self._waiting:
            deadlines.append(self._waiting[0][0])
        return min(deadlines) if deadlines else None

    def on_catalog_change(self, name: str, old_file_id: bytes | None, now: float) -> list[Reply]:
        """A file was added, changed or removed (the catalog already says so). Holders of the
        old version are not offered for the new one; GETs that waited for it are answered."""
        entry = self.catalog.by_name(name)
        if old_file_id is not None and (entry is None or entry.manifest.file_id != old_file_id):
            self.registry.forget_file(old_file_id)
        if self.catalog.rebuilding(name):
            return []
        replies: list[Reply] = []
        still: list[tuple[float, int, _WaitingGet]] = []
        for item in self._waiting:
            waiting = item[2]
            if waiting.request.name == name:
                record = self.registry.peer_by_routing(waiting.sender)
                reply = self.on_get(waiting.request, waiting.sender, record.name if record else None, now)
                if reply is not None:
                    replies.append((waiting.sender, reply))
            else:
                still.append(item)
        heapq.heapify(still)
        self._waiting = still
        self.m.gets_waiting.set(len(self._waiting))
        return replies

    # ---- requests

    def _answer(self, request: Message, sender: bytes, peer: str | None, now: float) -> Message:
        if isinstance(request, Have):
            return self.on_holdings(request, peer, now, add=True)
        if isinstance(request, Ping):
            recheck = self.registry.take_recheck(peer) if peer is not None else ()
            return Pong(request.rid, self.session, peer is not None, recheck)
        if isinstance(request, Lost):
            return self.on_holdings(request, peer, now, add=False)
        if isinstance(request, BadSource):
            return self.on_bad_source(request, peer, now)
        if isinstance(request, ListFiles):
            return Files(
                request.rid,
                tuple(
                    FileEntry(e.manifest.name, e.manifest.size, e.manifest.file_id)
                    for e in self.catalog.entries()
                ),
            )
        if isinstance(request, StatsRequest):
            return Stats(request.rid, self.stats(now))
        if isinstance(request, Bye):
            if peer is not None:
                self.registry.remove(peer)
                self.m.live.set(len(self.registry.peers))
                log.info("peer %s said bye", peer)
            return Ok(request.rid)
        return Error(getattr(request, "rid", 0), WireCode.UNKNOWN_OP, f"{request.OP} is not a request")

    def on_register(self, request: Register, sender: bytes, now: float, key: bytes | None = None) -> Message:
        if request.proto != protocol.PROTOCOL_VERSION:
            return Error(request.rid, WireCode.VERSION, f"protocol {request.proto} not supported")
        if self.key_names is not None:
            allowed = self.key_names(key) if key is not None else None
            if allowed != request.name:
                self.m.registers_refused.inc(labels=("key",))
                return Error(
                    request.rid,
                    WireCode.FORBIDDEN,
                    f"this key may not register as {request.name!r}"
                    + (f" (its name is {allowed!r})" if allowed else " (it is not on the allow-list)"),
                )
        live = self.registry.peers.get(request.name)
        if live is not None and live.routing_id != sender and (key is None or live.key != key):
            # Another connection holds this name: refuse rather than let one peer take over
            # another (a restarted peer gets its name back once the old entry expires; with
            # CURVE at once, since its key proves it is the same peer).
            self.m.registers_refused.inc(labels=("name_taken",))
            return Error(
                request.rid,
                WireCode.NAME_TAKEN,
                f"the name {request.name!r} is in use by another live peer; "
                f"it is free again once that peer leaves or is silent for {self.settings.peer_expiry_s:g} s",
            )
        holdings: list[tuple[bytes, list[Run]]] = []
        for holding in request.holdings:
            entry = self.catalog.by_id(holding.file_id)
            if entry is not None:  # claims on versions the broker does not serve are dropped
                holdings.append((holding.file_id, _clip(holding.runs, entry.manifest.segment_count)))
        token = secrets.token_bytes(protocol.TOKEN_SIZE)
        replaced = self.registry.register(request.name, sender, request.endpoint, holdings, now, token, key)
        self.m.live.set(len(self.registry.peers))
        log.info(
            "peer %s %s at %s holding %d segments of %d files",
            request.name,
            "re-registered" if replaced else "registered",
            request.endpoint,
            sum(sum(c for _, c in runs) for _, runs in holdings),
            len(holdings),
        )
        s = self.settings
        return Registered(
            request.rid,
            self.session,
            s.heartbeat_endpoint,
            s.heartbeat_interval_s,
            s.heartbeat_liveness,
            token,
        )

    def on_get(self, request: Get, sender: bytes, peer: str | None, now: float) -> Message | None:
        if self.catalog.rebuilding(request.name):
            return self._wait_for_rebuild(request, sender, now)
        entry = self.catalog.by_name(request.name)
        if entry is None:
            return Error(request.rid, WireCode.NOT_FOUND, f"no file named {request.name!r}")
        manifest = entry.manifest
        s = self.settings
        file_id, segments = manifest.file_id, manifest.segment_count
        need = SegmentSet.full(segments)
        if peer is not None:
            need.difference_update(self.registry.holdings_of(peer, file_id))
        nth = self.get_counts[file_id] = self.get_counts.get(file_id, 0) + 1
        relay = None
        holders: list[Holder] = []
        if s.plan_policy == "swarm":
            if peer is not None and need:
                self.registry.note_active(peer, file_id, now)
            trees, crowd = self._relay_trees(file_id, segments, manifest.segment_size, now)
            relay = self._relay(trees, file_id, peer, now) if peer is not None else None
            # The file's downloaders serve each other through the relay trees, also once they
            # are complete (as parents, at once); the holders planned by what they hold are the
            # others: earlier copies, and partial ones no longer growing. A downloader that
            # finished first must not become everyone's holder: its one uplink would carry the
            # rest of the crowd's tail.
            holders = self._candidates(manifest, now, peer, skip=crowd)
        need = plan_window(
            need, holders, segments, s.plan_block_segments, PLAN_WINDOW_BYTES // manifest.segment_size
        )
        plan = plan_download(
            segments,
            need,
            holders,
            s.origin_endpoint,
            block=s.plan_block_segments,
            rotate=_spread(nth, segments, s.plan_block_segments),
            relay=relay,
        )
        if s.plan_policy == "swarm" and s.slow_relay_factor > 0:
            plan = self._lend_origin(plan, manifest.segment_size)
        per_source = plan.segments_per_source()
        for name, count in plan.segments_by_source(per_source).items():
            self.registry.note_planned(name, count, now)
        for why, count in plan.segments_by_reason(per_source).items():
            self.m.segments_planned.inc(count, labels=(why,))
        if plan.relayed:
            self.m.segments_relayed.inc(plan.relayed)
        if peer is not None:
            # What this plan sends `peer` to fetch from which source: its bad_source reports
            # are believed for those runs only.
            self.registry.note_planned_runs(
                peer, file_id, tuple(src.name for src in plan.sources), plan.entries, now
            )
        return FileInfo(
            rid=request.rid,
            name=manifest.name,
            size=manifest.size,
            file_id=manifest.file_id,
            segment_size=manifest.segment_size,
            digests=None if request.known_file_id == manifest.file_id else manifest.digests,
            sources=self._sources(plan.sources),
            plan=plan.entries,
            origin_lanes=s.origin_lanes,
        )

    def _lend_origin(self, plan: Plan, segment: int) -> Plan:
        """Complete copies (seeds, finished downloaders) whose peak upload is `slow_relay_factor`
        times below the origin's spare upload (its capacity less what it sends and has lent)
        keep what they deliver in LEND_HORIZON_S; the origin takes the rest, as much as that
        spare sends in that time. A lone slow copy no longer sets the pace of a download while
        the origin idles. Relays still fetching are a swarm at work and are left alone: lending
        from them too sent 1.57 origin copies instead of 1.03 in a simulated mixed swarm."""
        spare = self.origin_capacity_bps - self.origin_rate_bps - self._origin_lent_bytes / LEND_HORIZON_S
        if spare <= 0:
            return plan
        factor = self.settings.slow_relay_factor
        peers = self.registry.peers
        keep: dict[str, int] = {}
        for source in plan.sources[:-1]:
            if source.runs is not None:
                continue  # not a complete copy: a relay still fetching, part of a swarm at work
            record = peers.get(source.name)
            if record is not None and 0 < record.up_bps * factor < spare:
                keep[source.name] = int(record.up_bps * LEND_HORIZON_S) // segment
        if not keep:
            return plan
        plan, moved = lend_origin(plan, keep, int(spare * LEND_HORIZON_S) // segment)
        if moved:
            self._origin_lent_bytes += moved * segment
            self.m.segments_lent.inc(moved)
        return plan

    def _wait_for_rebuild(self, request: Get, sender: bytes, now: float) -> Message | None:
        if len(self._waiting) >= MAX_WAITING_GETS:
            return self._retry_later(request)
        self._waiting_seq += 1
        heapq.heappush(
            self._waiting,
            (now + GET_WAIT_S, self._waiting_seq, _WaitingGet(now + GET_WAIT_S, sender, request)),
        )
        self.m.gets_waiting.set(len(self._waiting))
        return None

    @staticmethod
    def _retry_later(request: Get) -> Message:
        return Error(request.rid, WireCode.BUSY, f"the manifest of {request.name!r} is being rebuilt; retry")

    def _relay_trees(
        self, file_id: bytes, segments: int, segment_size: int, now: float
    ) -> tuple[RelayTrees, frozenset[str]]:
        """The file's relay trees, rebuilt when its set of downloaders changed or a relay
        turned out slow."""
        s = self.settings
        version, members = self.registry.members(file_id, segments, now, s.download_idle_s)
        cached = self._trees.get(file_id)
        if cached is None or cached.version != version:
            names = frozenset(name for _, name in members)
            # What was learnt of the relays, and when they were last judged, outlive a change of
            # the downloaders, and a GET that rebuilds the trees judges them too when it is time:
            # while downloaders come and go, the judgement waits for no GET that changes nothing.
            kept = cached if cached is not None and cached.crowd & names else None
            # Downloaders whose uplinks are known from earlier files are leaves from the start.
            # While the trees settle (no relay of this file is judged yet) the set is drawn
            # anew from the whole crowd at each change: drawn from the first few downloaders,
            # it would keep what a few figures said; after that, newcomers join it.
            built_at = kept.built_at if kept is not None else now
            if cached is None or now - built_at < RELAY_SETTLE_S:
                slow = self._known_slow(names, names)
            else:
                slow = (cached.slow & names) | self._known_slow(names, names - cached.crowd)
            cached = _FileTrees(
                file_id,
                version,
                RelayTrees(members, s.relay_fanout, slow),
                names,
                slow,
                built_at,
                kept.checked_at if kept is not None else now,
                {n: t for n, t in kept.suspects.items() if n in names} if kept is not None else {},
            )
            self._trees[file_id] = cached
            if len(self._trees) > MAX_CACHED_TREES:
                self._trees.pop(next(iter(self._trees)))
        if s.slow_relay_factor and now - cached.checked_at >= RELAY_CHECK_S:
            cached.checked_at = now
            slow = self._slow_relays(cached, segment_size, now)
            if slow != cached.slow:
                if slow - cached.slow:
                    log.info(
                        "relays of file %s: %s relay far slower than the others; they become leaves",
                        file_id.hex()[:12],
                        ", ".join(sorted(slow - cached.slow)),
                    )
                if cached.slow - slow:
                    log.info(
                        "relays of file %s: %s have uploaded fast since; they relay again",
                        file_id.hex()[:12],
                        ", ".join(sorted(cached.slow - slow)),
                    )
                self.m.slow_relays.inc(len(slow - cached.slow))
                cached.slow = slow
                cached.trees = RelayTrees(members, s.relay_fanout, slow)
        return cached.trees, cached.crowd

    def _known_slow(self, names: frozenset[str], newcomers: frozenset[str]) -> frozenset[str]:
        """The `newcomers` to a file's downloaders `names` known to be slow before they relay
        any of it: their highest upload rate since registering (heartbeats, shown while they
        served earlier files) is under 1 / slow_relay_factor of the upper quartile of the
        figures among `names` (at least the second highest). Not the highest: a few peers'
        claims cannot make every other a leaf. A peer that has reported no upload is not
        judged. In a fresh swarm `_slow_relays` finds the slow relays within seconds, but a
        slow stripe root hides the slow relays below it (they are never loaded, so never
        judged): simulated mixed links (half the uplinks 20 Mbit/s, half 100), 32 MiB, N = 16,
        the second file of a swarm took 1.80x the bound when its trees learnt anew, 1.45-1.56x
        with this (N = 100: 2.08-2.87x, 1.87-1.96x)."""
        factor = self.settings.slow_relay_factor
        if not factor or not newcomers:
            return frozenset()
        peers = self.registry.peers
        known = [peers[name].up_peak for name in names if name in peers and peers[name].up_peak]
        if len(known) < 2:
            return frozenset()
        # The upper quartile, at least the second highest: a few peers' outlying figures (a
        # burst to a client on their own host, or a lie) cannot make the others leaves.
        bar = heapq.nlargest(max(2, len(known) // 4 + 1), known)[-1]
        return frozenset(
            name for name in newcomers if name in peers and 0 < peers[name].up_peak * factor < bar
        )

    def slow_relays(self, file_id: bytes) -> frozenset[str]:
        """The downloaders of a file found too slow to relay (leaves of its relay trees)."""
        cached = self._trees.get(file_id)
        return cached.slow if cached is not None else frozenset()

    def _slow_relays(self, cached: _FileTrees, segment_size: int, now: float) -> frozenset[str]:
        """The slow set grown by the relays that hold their children back: their children lag
        more than SLOW_LAG_BYTES behind them in the stripe they relay (so what limits the
        children is the relay's uplink, not what reaches the relay), and the relay's peak upload
        rate (heartbeats) is under 1 / slow_relay_factor of the fastest downloader's. Judged once
        the trees have stood RELAY_SETTLE_S, and only a relay that still looks so SLOW_CONFIRM_S
        after it first did is marked; one marked that has since uploaded fast is unmarked.
        Neither figure alone will do: a relay fed slowly uploads slowly on a fast link, and a
        fast relay's children lag while they start."""
        trees = cached.trees
        if now - cached.built_at < RELAY_SETTLE_S or len(cached.crowd) <= trees.stripes:
            return cached.slow
        peers = self.registry.peers
        best = max((peers[name].up_bps for name in cached.crowd if name in peers), default=0)
        if not best:
            return cached.slow
        file_id, block = cached.file_id, self.settings.plan_block_segments
        lag = max(1, SLOW_LAG_BYTES // segment_size)
        held: dict[tuple[str, int], int] = {}

        def share(name: str, stripe: int) -> int:
            if (name, stripe) not in held:
                record = peers.get(name)
                segments = record.holdings.get(file_id) if record is not None else None
                held[name, stripe] = (
                    stripe_share(segments, stripe, trees.stripes, block) if segments is not None else 0
                )
            return held[name, stripe]

        looking_slow: set[str] = set()
        for stripe, relay, children in trees.families():
            record = peers.get(relay)
            if relay in cached.slow or record is None or not children:
                continue
            if not 0 < record.up_bps * self.settings.slow_relay_factor < best:
                continue
            behind = share(relay, stripe) - sum(share(c, stripe) for c in children) / len(children)
            if behind > lag:
                looking_slow.add(relay)
        # Looking slow once is not enough: while the trees fill, relays fed late upload slowly
        # and their children lag.
        suspects = cached.suspects
        for name in list(suspects):
            if name not in looking_slow:
                del suspects[name]  # it caught up: it was being fed late, not slow
        slow = set()
        for name in looking_slow:
            since = suspects.setdefault(name, now)
            if now - since >= SLOW_CONFIRM_S:
                slow.add(name)
                del suspects[name]
        # A relay found slow that has since uploaded fast (serving what its children had asked
        # before they moved, or as a holder) was fed late, not slow: it relays again. At N = 100
        # on uniform links, 256 MiB, a few such relays kept as leaves left others relaying two
        # stripes, and the swarm went at their pace: 2.2x the bound instead of 1.2x.
        factor = self.settings.slow_relay_factor
        kept = frozenset(name for name in cached.slow if name in peers and peers[name].up_bps * factor < best)
        return kept | slow

    def _relay(self, trees: RelayTrees, file_id: bytes, peer: str, now: float) -> Relay | None:
        names = trees.parents(peer)
        if names is None:
            return None
        parents = tuple(self.registry.holder(n, file_id, now) if n is not None else None for n in names)
        # Only a stripe's root looks at what the other downloaders hold (few of them are roots).
        others: tuple[Holder, ...] = ()
        if None in names:
            holders = (self.registry.holder(n, file_id, now) for n in trees.orders[0] if n != peer)
            others = tuple(h for h in holders if h is not None)
        return Relay(trees.stripes, parents, others)

    def _candidates(
        self, manifest: Manifest, now: float, requester: str | None, skip: frozenset[str] = frozenset()
    ) -> list[Holder]:
        """Holders to plan over: all of them up to MAX_PLAN_SOURCES, else the least loaded."""
        if self.settings.plan_policy == "origin_only":
            return []
        holders = self.registry.holders(manifest.file_id, now, exclude=requester, skip=skip)
        if len(holders) <= MAX_PLAN_SOURCES and len(holders) <= MAX_PARTIAL_HOLDERS:
            return holders
        # Complete holders are cheap to plan and to send (no runs); partial ones cost a walk of
        # their runs and their runs in the reply, so only a few of them, fewer when seeds abound.
        segments = manifest.segment_count
        complete = [h for h in holders if h.segments.covers(0, segments)]
        partial = [h for h in holders if not h.segments.covers(0, segments)]
        partial_limit = MAX_PARTIAL_HOLDERS if len(complete) < MAX_PARTIAL_HOLDERS else 8
        chosen = heapq.nsmallest(MAX_PLAN_SOURCES, complete, key=lambda h: h.load)
        chosen += heapq.nsmallest(
            min(partial_limit, MAX_PLAN_SOURCES - len(chosen)), partial, key=lambda h: h.load
        )
        return chosen

    def on_holdings(self, request: Have | Lost, peer: str | None, now: float, add: bool) -> Message:
        if peer is None:
            return Error(request.rid, WireCode.NOT_REGISTERED, "register first")
        entry = self.catalog.by_id(request.file_id)
        if entry is not None:
            runs = _clip(request.runs, entry.manifest.segment_count)
            if add:
                self.registry.add_runs(peer, request.file_id, runs)
                self.registry.note_progress(peer, request.file_id, now)
            else:
                self.registry.remove_runs(peer, request.file_id, runs)
                log.info("peer %s lost %d segments of %s", peer, sum(c for _, c in runs), entry.manifest.name)
        return Ok(request.rid)

    def _sources(self, planned: Sequence[Any]) -> tuple[Source, ...]:
        """The `file` reply's sources, each with its CURVE key in authenticated mode."""
        out: list[Source] = []
        for src in planned:
            if src.name == "broker":
                key = self.settings.origin_public_key
            else:
                record = self.registry.peers.get(src.name)
                key = record.key if record is not None else None
            out.append(Source(src.name, src.endpoint, src.runs, key, src.why))
        return tuple(out)

    def on_bad_source(self, request: BadSource, peer: str | None, now: float) -> Message:
        if peer is None:
            return Error(request.rid, WireCode.NOT_REGISTERED, "register first")
        self.m.bad_reports.inc()
        reason = BadSourceReason(request.reason)
        runs = self.registry.planned_runs(peer, request.file_id, request.source, request.runs, now)
        if not runs:
            # Never planned from that source to this reporter (or too long ago): nothing it
            # says about them can be checked, so nothing happens to the accused.
            self.m.bad_reports_ignored.inc()
            self._bad_log.warning(
                "%s reports %s for segments never planned from it to %s: ignored", peer, request.source, peer
            )
            return Ok(request.rid)
        benched = self.registry.report_bad(
            request.source, request.file_id, runs, reason.value, now, strike=reason.strikes, reporter=peer
        )
        log.warning(
            "%s reports %s for %d segments: %s",
            peer,
            request.source,
            sum(c for _, c in runs),
            request.reason,
        )
        if benched:
            log.warning(
                "peer %s benched for %.0f s after repeated bad reports (last: %s)",
                request.source,
                self.settings.bench_s,
                reason.value,
            )
            self.bench_log.append({"peer": request.source, "reason": reason.value, "by": peer})
            del self.bench_log[:-100]
        return Ok(request.rid)

    # ---- statistics

    def stats(self, now: float) -> dict[str, Any]:
        peers = {
            name: {
                "endpoint": r.endpoint,
                "last_seen_s": round(now - r.last_seen, 3),
                "registered_s": round(now - r.registered_at, 3),
                "files": len(r.holdings),
                "segments": sum(len(s) for s in r.holdings.values()),
                "benched_s": round(max(r.benched_until - now, 0.0), 3),
                "upload_bps": r.up_bps,
                "bench_reason": r.bench_reason,
            }
            for name, r in self.registry.peers.items()
        }
        snap = self.metrics.snapshot()
        requests = {
            labels[0]: int(value) for labels, value in snap.values.get("tracker_requests_total", {}).items()
        }
        requests["malformed"] = int(snap.get("tracker_malformed_requests_total"))
        requests["replies_dropped"] = int(snap.get("tracker_replies_dropped_total"))
        requests["heartbeats"] = int(snap.get("heartbeats_total"))
        requests["heartbeats_unknown"] = int(snap.get("heartbeats_unknown_total"))
        requests["malformed_heartbeats"] = int(snap.get("heartbeats_malformed_total"))
        requests["bad_reports"] = int(snap.get("bad_source_reports_total"))
        requests["bad_reports_ignored"] = int(snap.get("bad_source_reports_ignored_total"))
        requests["heartbeats_refused"] = int(snap.total("heartbeats_refused_total"))
        requests["registers_refused"] = int(snap.total("registers_refused_total"))
        return {
            "session": self.session,
            "live_peers": sorted(peers),
            "peers": peers,
            "files": len(self.catalog.entries()),
            "requests": requests,
            "evicted": self.registry.evicted_total,
            "segments_relayed": int(snap.get("segments_relayed_total")),
            "segments_lent": int(snap.get("segments_lent_total")),
            "benched": list(self.bench_log),
            "metrics": snap.flat(),
            **(self.extra_stats() if self.extra_stats is not None else {}),
        }
