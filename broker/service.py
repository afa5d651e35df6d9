"""Broker: the tracker (ROUTER + heartbeat SUB) and the origin (segment server), each a thread.

The tracker thread is a thin shell around the pure parts: it decodes a request, calls the
registry / planner / catalog, encodes the reply and re-arms its poll timeout from the registry's
next expiry. A bad message is answered with an error (when it has a sender) and counted; it never
stops the loop. Replies go out non-blocking with ROUTER_MANDATORY, so a vanished peer costs a
counted drop, not a stall.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import zmq

from broker.catalog import Catalog, CatalogEntry
from broker.config import BrokerConfig
from broker.planner import MAX_PARTIAL_HOLDERS, origin_share, plan_download
from broker.registry import Holder, Registry
from common import protocol
from common.errors import ClosedError, MalformedMessage, WireCode
from common.protocol import (
    BadSource,
    Bye,
    Error,
    FileEntry,
    FileInfo,
    Files,
    Get,
    Have,
    Heartbeat,
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
from common.segserver import SegmentServer
from common.service import RateLimitedLog, ServiceThread, bind, endpoint, make_socket

log = logging.getLogger(__name__)

_DRAIN = 256  # messages handled per wake-up before timers are looked at again
MAX_PLAN_SOURCES = 256  # a GET names at most this many peers (the wire allows 4096)


def _clip(runs: tuple[Run, ...], segment_count: int) -> list[Run]:
    """Runs cut to the file's segments (a peer cannot claim segment 10**6 of a 3-segment file)."""
    out: list[Run] = []
    for first, count in runs:
        end = min(first + count, segment_count)
        if first < end:
            out.append((first, end - first))
    return out


class TrackerService(ServiceThread):
    def __init__(
        self,
        config: BrokerConfig,
        context: zmq.Context[Any],
        catalog: Catalog,
        origin: SegmentServer,
    ) -> None:
        super().__init__("zswarm-tracker", context)
        self.config = config
        self.catalog = catalog
        self.origin = origin
        self.session = random.getrandbits(63) + 1
        self.registry = Registry(
            config.peer_expiry_s, strike_limit=config.strike_limit, bench_s=config.bench_s
        )
        self.tracker_port = config.tracker_port
        self.heartbeat_port = config.heartbeat_port
        self.counts: Counter[str] = Counter()  # messages received, by kind
        self.segments_deferred = 0  # segments left out of plans by origin claims (super-seeding)
        self.get_counts: Counter[bytes] = Counter()
        self.bench_log: list[dict[str, Any]] = []
        self._bad_log = RateLimitedLog(log)
        self._router: zmq.Socket[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None

    # ---- sockets

    def setup(self) -> None:
        host = self.config.bind_host
        router = make_socket(
            self.context,
            zmq.ROUTER,
            router_mandatory=1,
            maxmsgsize=self.config.max_request_bytes,
            sndhwm=10_000,
            rcvhwm=10_000,
        )
        self._router = router
        self.tracker_port = bind(router, host, self.tracker_port)
        sub = make_socket(self.context, zmq.SUB, maxmsgsize=4096, rcvhwm=100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub = sub
        self.heartbeat_port = bind(sub, host, self.heartbeat_port)
        self.poller.register(router, zmq.POLLIN)
        self.poller.register(sub, zmq.POLLIN)

    def teardown(self) -> None:
        for sock in (self._router, self._sub):
            if sock is not None:
                sock.close(linger=0)

    def next_timeout_ms(self, now: float) -> int:
        deadline = self.registry.next_expiry()
        if deadline is None:
            return 1000
        return max(0, min(1000, int((deadline - now) * 1000) + 1))

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        router, sub = self._router, self._sub
        assert router is not None and sub is not None  # set in setup(), before the loop runs
        if sub in events:
            self._drain_heartbeats(sub)
        if router in events:
            for _ in range(_DRAIN):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_frames(router, frames)
        now = time.monotonic()
        for name in self.registry.expire(now):
            log.info("peer %s evicted: no heartbeat for %.1f s", name, self.config.peer_expiry_s)
        for name in self.catalog.take_stale():
            self._rebuild(name)

    # ---- dispatch

    def _on_frames(self, router: zmq.Socket[Any], frames: list[bytes]) -> None:
        if len(frames) < 2:
            self.counts["malformed"] += 1
            return
        routing_id, body = frames[0], frames[1:]
        try:
            request = protocol.decode(body, self.config.max_request_bytes, allowed=protocol.TRACKER_REQUESTS)
        except MalformedMessage as exc:
            self.counts["malformed"] += 1
            self._bad_log.warning("malformed request: %s", exc)
            reply: Message = Error(protocol.rid_of(body), WireCode.MALFORMED, str(exc))
        else:
            self.counts[request.OP] += 1
            now = time.monotonic()
            peer = self.registry.peer_by_routing(routing_id)
            if peer is not None:
                peer.last_seen = now
            reply = self._dispatch(request, routing_id, peer.name if peer else None, now)
        try:
            router.send_multipart([routing_id, *protocol.encode(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.counts["replies_dropped"] += 1
            self._bad_log.warning("reply dropped: %s", exc.strerror)

    def _dispatch(self, request: Message, routing_id: bytes, peer: str | None, now: float) -> Message:
        if isinstance(request, Get):
            return self.on_get(request, peer, now)
        if isinstance(request, Have):
            return self.on_holdings(request, peer, add=True)
        if isinstance(request, Ping):
            return Pong(request.rid, self.session, peer is not None)
        if isinstance(request, Register):
            return self.on_register(request, routing_id, now)
        if isinstance(request, Lost):
            return self.on_holdings(request, peer, add=False)
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
            return Stats(request.rid, self.stats())
        if isinstance(request, Bye):
            if peer is not None:
                self.registry.remove(peer)
                log.info("peer %s said bye", peer)
            return Ok(request.rid)
        return Error(getattr(request, "rid", 0), WireCode.UNKNOWN_OP, f"{request.OP} is not a request")

    def on_register(self, request: Register, routing_id: bytes, now: float) -> Message:
        if request.proto != protocol.PROTOCOL_VERSION:
            return Error(request.rid, WireCode.VERSION, f"protocol {request.proto} not supported")
        holdings: list[tuple[bytes, list[Run]]] = []
        for holding in request.holdings:
            entry = self.catalog.by_id(holding.file_id)
            if entry is not None:  # claims on versions the broker does not serve are dropped
                holdings.append((holding.file_id, _clip(holding.runs, entry.manifest.segment_count)))
        replaced = self.registry.register(request.name, routing_id, request.endpoint, holdings, now)
        log.info(
            "peer %s %s at %s holding %d segments of %d files",
            request.name,
            "re-registered" if replaced else "registered",
            request.endpoint,
            sum(sum(c for _, c in runs) for _, runs in holdings),
            len(holdings),
        )
        return Registered(
            request.rid,
            self.session,
            endpoint(self.config.public_host, self.heartbeat_port),
            self.config.heartbeat_interval_s,
            self.config.heartbeat_liveness,
        )

    def on_get(self, request: Get, peer: str | None, now: float) -> Message:
        entry = self.catalog.by_name(request.name)
        if entry is not None and not self.catalog.is_current(entry):
            entry = self._rebuild(request.name)  # never hand out a manifest the file no longer matches
        if entry is None:
            return Error(request.rid, WireCode.NOT_FOUND, f"no file named {request.name!r}")
        manifest = entry.manifest
        need = SegmentSet.full(manifest.segment_count)
        if peer is not None:
            need.difference_update(self.registry.holdings_of(peer, manifest.file_id))
        self.get_counts[manifest.file_id] += 1
        claims = self.registry.origin_claims(manifest.file_id, now, self.config.origin_claim_idle_s)
        plan = plan_download(
            manifest.segment_count,
            need,
            self._candidates(manifest.file_id, now, peer),
            endpoint(self.config.public_host, self.origin.port),
            block=self.config.plan_block_segments,
            rotate=_spread(
                self.get_counts[manifest.file_id], manifest.segment_count, self.config.plan_block_segments
            ),
            claims=claims,
            requester=peer,
            origin_window=origin_share(
                self.config.origin_window_blocks if self.config.plan_policy == "swarm" else 0,
                self.config.origin_lanes,
                claims,
                peer or "",
                -(-manifest.segment_count // self.config.plan_block_segments),
            ),
        )
        if plan.claimed and peer is not None:
            self.registry.claim_origin_blocks(manifest.file_id, peer, plan.claimed, now)
        self.segments_deferred += plan.deferred
        for name, count in plan.segments_by_source().items():
            self.registry.note_planned(name, count, now)
        return FileInfo(
            rid=request.rid,
            name=manifest.name,
            size=manifest.size,
            file_id=manifest.file_id,
            segment_size=manifest.segment_size,
            digests=None if request.known_file_id == manifest.file_id else manifest.digests,
            sources=tuple(Source(s.name, s.endpoint, s.runs) for s in plan.sources),
            plan=plan.entries,
            origin_lanes=self.config.origin_lanes,
        )

    def _candidates(self, file_id: bytes, now: float, requester: str | None) -> list[Holder]:
        """Holders to plan over: all of them up to MAX_PLAN_SOURCES, else the least loaded."""
        if self.config.plan_policy == "origin_only":
            return []
        holders = self.registry.holders(file_id, now, exclude=requester)
        if len(holders) <= MAX_PLAN_SOURCES and len(holders) <= MAX_PARTIAL_HOLDERS:
            return holders
        # Complete holders are cheap to plan and to send (no runs); partial ones cost a walk of
        # their runs and their runs in the reply, so only a few of them, fewer when seeds abound.
        entry = self.catalog.by_id(file_id)
        segments = entry.manifest.segment_count if entry is not None else 0
        complete = [h for h in holders if h.segments.covers(0, segments)]
        partial = [h for h in holders if not h.segments.covers(0, segments)]
        partial_limit = MAX_PARTIAL_HOLDERS if len(complete) < MAX_PARTIAL_HOLDERS else 8
        chosen = heapq.nsmallest(MAX_PLAN_SOURCES, complete, key=lambda h: h.load)
        chosen += heapq.nsmallest(
            min(partial_limit, MAX_PLAN_SOURCES - len(chosen)), partial, key=lambda h: h.load
        )
        return chosen

    def on_holdings(self, request: Have | Lost, peer: str | None, add: bool) -> Message:
        if peer is None:
            return Error(request.rid, WireCode.NOT_REGISTERED, "register first")
        entry = self.catalog.by_id(request.file_id)
        if entry is not None:
            runs = _clip(request.runs, entry.manifest.segment_count)
            if add:
                self.registry.add_runs(peer, request.file_id, runs)
                self.registry.note_progress(peer, request.file_id, time.monotonic())
            else:
                self.registry.remove_runs(peer, request.file_id, runs)
                log.info("peer %s lost %d segments of %s", peer, sum(c for _, c in runs), entry.manifest.name)
        return Ok(request.rid)

    def on_bad_source(self, request: BadSource, peer: str | None, now: float) -> Message:
        if peer is None:
            return Error(request.rid, WireCode.NOT_REGISTERED, "register first")
        self.counts["bad_reports"] += 1
        strike = request.reason != "refused"
        benched = self.registry.report_bad(
            request.source, request.file_id, request.runs, request.reason, now, strike=strike
        )
        log.warning(
            "%s reports %s for %d segments: %s",
            peer,
            request.source,
            sum(c for _, c in request.runs),
            request.reason,
        )
        if benched:
            log.warning(
                "peer %s benched for %.0f s after repeated bad reports (last: %s)",
                request.source,
                self.config.bench_s,
                request.reason,
            )
            self.bench_log.append({"peer": request.source, "reason": request.reason, "by": peer})
        return Ok(request.rid)

    def _drain_heartbeats(self, sub: zmq.Socket[Any]) -> None:
        now = time.monotonic()
        for _ in range(_DRAIN * 4):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                beat = cast(Heartbeat, protocol.decode(frames, 4096, allowed=(Heartbeat,)))
            except MalformedMessage as exc:
                self.counts["malformed_heartbeats"] += 1
                self._bad_log.warning("malformed heartbeat: %s", exc)
                continue
            self.counts["heartbeats"] += 1
            if not self.registry.touch(beat.name, now):
                self.counts["heartbeats_unknown"] += 1

    def _rebuild(self, name: str) -> CatalogEntry | None:
        old = self.catalog.by_name(name)
        entry: CatalogEntry | None = self.catalog.rebuild(name)
        if old is not None and (entry is None or entry.manifest.file_id != old.manifest.file_id):
            self.registry.forget_file(old.manifest.file_id)
        log.warning(
            "%s changed on disk: %s",
            name,
            f"new version {entry.manifest.file_id.hex()[:16]}" if entry else "no longer shared",
        )
        return entry

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        peers = {
            name: {
                "endpoint": r.endpoint,
                "last_seen_s": round(now - r.last_seen, 3),
                "registered_s": round(now - r.registered_at, 3),
                "files": len(r.holdings),
                "segments": sum(len(s) for s in r.holdings.values()),
                "benched_s": round(max(r.benched_until - now, 0.0), 3),
                "bench_reason": r.bench_reason,
            }
            for name, r in self.registry.peers.items()
        }
        return {
            "session": self.session,
            "live_peers": sorted(peers),
            "peers": peers,
            "files": len(self.catalog.entries()),
            "origin": self.origin.counters(),
            "segments_served": self.origin.segments_served,
            "requests": dict(self.counts),
            "evicted": self.registry.evicted_total,
            "segments_deferred": self.segments_deferred,
            "loop_errors": self.loop_errors + self.origin.loop_errors,  # bugs met; service went on
            "benched": self.bench_log[-100:],
        }


def _spread(nth_get: int, segment_count: int, block: int) -> int:
    """Rotation for the n-th GET of a file: golden-ratio steps spread starts over the file."""
    blocks = max((segment_count + block - 1) // block, 1)
    return int(nth_get * 0.6180339887 * blocks) % blocks


class Broker:
    """The broker: `with Broker(config) as b:` or `start()` / `close()`."""

    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.catalog = Catalog(Path(config.share_dir), Path(config.manifest_dir))
        self._context: zmq.Context[Any] | None = None
        self._origin: SegmentServer | None = None
        self._tracker: TrackerService | None = None
        self._closed = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> Broker:
        return cls(BrokerConfig.from_yaml(path))

    def start(self) -> Self:
        if self._context is not None:
            return self
        self.catalog.scan()
        self._context = zmq.Context()
        try:
            self._origin = SegmentServer(
                "zswarm-origin",
                self._context,
                self.catalog,
                self.config.bind_host,
                self.config.origin_port,
                self.config.upload_limit_mib_s * 1024 * 1024,
            )
            self._origin.start()
            self._tracker = TrackerService(self.config, self._context, self.catalog, self._origin)
            self._tracker.start()
        except BaseException:
            self.close()
            raise
        log.info(
            "broker ready: tracker %s, heartbeats %s, origin %s",
            self.tracker_endpoint,
            self.heartbeat_endpoint,
            self.origin_endpoint,
        )
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for service in (self._tracker, self._origin):
            if service is not None:
                service.stop()
        if self._context is not None:
            self._context.term()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _running_tracker(self) -> TrackerService:
        if self._tracker is None or self._closed:
            raise ClosedError("broker is not running")
        return self._tracker

    @property
    def tracker_endpoint(self) -> str:
        return endpoint(self.config.public_host, self._running_tracker().tracker_port)

    @property
    def heartbeat_endpoint(self) -> str:
        return endpoint(self.config.public_host, self._running_tracker().heartbeat_port)

    @property
    def origin_endpoint(self) -> str:
        if self._origin is None:
            raise ClosedError("broker is not running")
        return endpoint(self.config.public_host, self._origin.port)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        tracker = self._running_tracker()
        return tracker.call(tracker.stats).result(timeout)
