"""Broker: the tracker (ROUTER + heartbeat SUB), the origin (segment server) and the catalog
worker, each a thread; `Broker` is the node that starts and stops them.

The tracker thread is a thin shell around `Tracker` (broker/tracker.py): it decodes what
arrives, hands it over with the sender and the time, sends the replies it gets back, and sleeps
until the tracker's next deadline. A bad message is answered with an error (when it has a
sender) and counted; it never stops the loop. Replies go out non-blocking with ROUTER_MANDATORY,
so a vanished peer costs a counted drop, not a stall. Catalog changes found by the worker thread
reach the tracker through `call()`, so the registry is only ever touched by its own thread.

Hostile clients: requests are bounded by op before they are decoded (`protocol.decode_request`);
the ROUTER's frame limit is the largest request's; replies of 64 KiB or more (`file` replies
carry manifests) count against their client's `ReplyBudget` while libzmq holds them, and a client
over it gets `busy` instead, so a client that asks and never reads holds a bounded amount of
memory however many connections it opens. In authenticated mode the sender's CURVE key (the ZAP
User-Id of the frame) goes to the tracker with every request and heartbeat.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import zmq
from zmq.utils import z85

from broker.catalog import Catalog, CatalogWorker, Change
from broker.config import BrokerConfig
from broker.tracker import Reply, Tracker, TrackerSettings
from common import protocol
from common.errors import ClosedError, MalformedMessage, WireCode
from common.metrics import Metrics, Snapshot
from common.node import Node, Service
from common.protocol import Error, Heartbeat
from common.security import peer_identity
from common.segserver import SegmentServer
from common.service import RateLimitedLog, ServiceThread
from common.transport import (
    HEARTBEAT_INBOUND,
    TRACKER_INBOUND,
    ReplyBudget,
    Transport,
    client_identity,
    endpoint,
)

log = logging.getLogger(__name__)

_DRAIN = 256  # messages handled per wake-up before timers are looked at again
CLIENT_REPLY_BYTES = 16 * 1024 * 1024  # unread reply bytes (big ones: manifests) per client
TOTAL_REPLY_BYTES = 256 * 1024 * 1024  # ... all clients together
TRACKER_SNDHWM = 256  # replies queued per connection (small ones; big ones are budgeted)
TRACKER_RCVHWM = 64  # requests queued per connection (each at most 1 MiB)
_CLIENTS_KEPT = 65_536  # routing id -> client, for replies sent later (waiting GETs)


def raw_key(frame: zmq.Frame) -> bytes | None:
    """The sender's CURVE public key (raw 32 bytes) that ZAP attached to a frame, if any."""
    user = peer_identity(frame)
    if user is None:
        return None
    try:
        return bytes(z85.decode(user.encode("ascii")))
    except (ValueError, UnicodeEncodeError):
        return None


class TrackerService(ServiceThread):
    def __init__(
        self,
        config: BrokerConfig,
        transport: Transport,
        catalog: Catalog,
        origin: SegmentServer,
        metrics: Metrics,
    ) -> None:
        super().__init__("zswarm-tracker", transport.context)
        self.config = config
        self.transport = transport
        self.catalog = catalog
        self.origin = origin
        self.metrics = metrics
        self.tracker: Tracker | None = None  # made in setup(), once the ports are known
        self.tracker_port = config.tracker_port
        self.heartbeat_port = config.heartbeat_port
        self._bad_log = RateLimitedLog(log)
        self._router: zmq.Socket[Any] | None = None
        self._sub: zmq.Socket[Any] | None = None
        self.budget = ReplyBudget(CLIENT_REPLY_BYTES, TOTAL_REPLY_BYTES)
        self._clients: OrderedDict[bytes, str] = OrderedDict()

    # ---- sockets

    def setup(self) -> None:
        config, host = self.config, self.config.bind_host
        self._router, self.tracker_port = self.transport.server(
            zmq.ROUTER,
            host,
            self.tracker_port,
            "tracker_port",
            inbound=TRACKER_INBOUND,
            router_mandatory=1,
            maxmsgsize=config.effective_max_request_bytes,
            sndhwm=TRACKER_SNDHWM,
            rcvhwm=TRACKER_RCVHWM,
        )
        self._sub, self.heartbeat_port = self.transport.server(
            zmq.SUB,
            host,
            self.heartbeat_port,
            "heartbeat_port",
            inbound=HEARTBEAT_INBOUND,
            maxmsgsize=4096,
            rcvhwm=1000,
        )
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.poller.register(self._router, zmq.POLLIN)
        self.poller.register(self._sub, zmq.POLLIN)
        settings = TrackerSettings(
            heartbeat_endpoint=endpoint(config.public_host, self.heartbeat_port),
            origin_endpoint=endpoint(config.public_host, self.origin.port),
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_liveness=config.heartbeat_liveness,
            plan_policy=config.plan_policy,
            plan_block_segments=config.plan_block_segments,
            origin_lanes=config.origin_lanes,
            relay_fanout=config.relay_fanout,
            slow_relay_factor=config.slow_relay_factor,
            download_idle_s=config.download_idle_s,
            strike_limit=config.strike_limit,
            bench_s=config.bench_s,
            origin_public_key=self._origin_key(),
        )
        self.tracker = Tracker(settings, self.catalog, random.getrandbits(63) + 1, self.metrics)
        self.tracker.extra_stats = self._origin_stats
        security = self.transport.security
        if security is not None and security.allow_list is not None:
            allow_list = security.allow_list
            self.tracker.key_names = allow_list.name_of

    def _origin_key(self) -> bytes | None:
        security = self.transport.security
        return bytes(z85.decode(security.keys.public)) if security is not None else None

    def teardown(self) -> None:
        for sock in (self._router, self._sub):
            if sock is not None:
                sock.close(linger=0)

    def next_timeout_ms(self, now: float) -> int:
        deadline = self.tracker.next_deadline() if self.tracker is not None else None
        if deadline is None:
            return 1000
        return max(0, min(1000, int((deadline - now) * 1000) + 1))

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        router, sub, tracker = self._router, self._sub, self.tracker
        assert router is not None and sub is not None and tracker is not None  # set in setup()
        if sub in events:
            self._drain_heartbeats(sub, tracker)
        if router in events:
            for _ in range(_DRAIN):
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_frames(frames, tracker)
        now = time.monotonic()
        # The origin thread's snapshot (a reference swap: safe to read here) gives its bytes sent.
        tracker.on_origin_upload(int(self.origin.published.get("served_bytes_total")), now)
        evicted, replies = tracker.tick(now)
        for name in evicted:
            log.info("peer %s evicted: no heartbeat for %.1f s", name, self.config.peer_expiry_s)
        self._send(replies)

    # ---- dispatch

    def _on_frames(self, frames: list[zmq.Frame], tracker: Tracker) -> None:
        if len(frames) < 2:
            tracker.m.malformed.inc()
            return
        routing_id, body = frames[0].bytes, frames[1:]
        secure = self.transport.secure
        client = client_identity(frames[0], secure)
        self._clients[routing_id] = client
        self._clients.move_to_end(routing_id)
        if len(self._clients) > _CLIENTS_KEPT:
            self._clients.popitem(last=False)
        try:
            request = protocol.decode_request(body, self.config.effective_max_request_bytes)
        except MalformedMessage as exc:
            self._bad_log.warning("malformed request: %s", exc)
            self._send(tracker.on_malformed(routing_id, protocol.rid_of(body), str(exc)))
            return
        key = raw_key(frames[0]) if secure else None
        self._send(tracker.on_request(request, routing_id, time.monotonic(), key))

    def _send(self, replies: list[Reply]) -> None:
        router = self._router
        assert router is not None and self.tracker is not None
        for routing_id, reply in replies:
            frames = [routing_id, *protocol.encode(reply)]
            size = len(frames[1])
            client = self._clients.get(routing_id, "")
            if size >= 64 * 1024 and client and not self.budget.allows(client, size):
                # This client has not read the big replies it already has: no more for now.
                self.tracker.m.replies_busy.inc()
                busy = Error(getattr(reply, "rid", 0), WireCode.BUSY, "too many unread replies; retry later")
                frames = [routing_id, *protocol.encode(busy)]
                size = 0
            try:
                self.budget.send(router, frames, client, size)
            except zmq.ZMQError as exc:
                self.tracker.m.replies_dropped.inc()
                self._bad_log.warning("reply dropped: %s", exc.strerror)

    def _drain_heartbeats(self, sub: zmq.Socket[Any], tracker: Tracker) -> None:
        now = time.monotonic()
        secure = self.transport.secure
        for _ in range(_DRAIN * 4):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                beat = cast(Heartbeat, protocol.decode(frames, 4096, allowed=(Heartbeat,)))
            except MalformedMessage as exc:
                tracker.m.heartbeats_malformed.inc()
                self._bad_log.warning("malformed heartbeat: %s", exc)
                continue
            key = raw_key(frames[0]) if secure else None
            refused = tracker.on_heartbeat(beat.name, beat.token, beat.seq, now, beat.up_bps, key)
            if refused is not None and refused != "unknown":
                self._bad_log.warning("heartbeat for %s refused: %s", beat.name, refused)

    # ---- commands (run in this thread through call())

    def on_catalog_changes(self, changes: list[Change]) -> None:
        tracker = self.tracker
        if tracker is None:
            return
        now = time.monotonic()
        for change in changes:
            self._send(tracker.on_catalog_change(change.name, change.old_file_id, now))

    def _origin_stats(self) -> dict[str, Any]:
        watch = self.transport.watch
        auth = self.transport.authenticator
        return {
            "connections": watch.counts() if watch is not None else {},
            "authentication": {"accepted": auth.accepted, "refused": auth.refused}
            if auth is not None
            else None,
            "origin": self.origin.counters(),
            "segments_served": self.origin.segments_served,
            "loop_errors": self.loop_errors + self.origin.loop_errors,  # bugs met; service went on
        }

    def stats(self) -> dict[str, Any]:
        assert self.tracker is not None
        return self.tracker.stats(time.monotonic())


class Broker(Node):
    """The broker: `with Broker(config) as b:` or `start()` / `close()`."""

    def __init__(self, config: BrokerConfig) -> None:
        super().__init__("broker")
        self.config = config
        self.catalog = Catalog(Path(config.share_dir), Path(config.manifest_dir))
        self._origin: SegmentServer | None = None
        self._tracker: TrackerService | None = None
        self._worker: CatalogWorker | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Broker:
        return cls(BrokerConfig.from_yaml(path))

    # ---- lifecycle (common/node.py)

    def prepare(self) -> None:
        self.config.check_share_dir()
        self.catalog.scan()
        log.info(
            "catalog: %d files (%d manifests built, %d reused) from %s",
            len(self.catalog.entries()),
            self.catalog.built,
            self.catalog.reused,
            self.catalog.share_dir,
        )

    def make_services(self, transport: Transport) -> list[Service]:
        config = self.config
        self._origin = SegmentServer(
            "zswarm-origin",
            transport,
            self.catalog,
            config.bind_host,
            config.origin_port,
            config.upload_limit_mib_s * 1024 * 1024,
            port_key="origin_port",
        )
        self._tracker = TrackerService(config, transport, self.catalog, self._origin, self.metrics)
        tracker = self._tracker

        def post(changes: list[Change]) -> None:
            if tracker.alive:
                tracker.call(lambda: tracker.on_catalog_changes(changes))

        self._worker = CatalogWorker(self.catalog, config.rescan_interval_s, post)
        return [self._origin, self._tracker, self._worker]

    def after_start(self) -> None:
        log.info(
            "broker ready: tracker %s, heartbeats %s, origin %s",
            self.tracker_endpoint,
            self.heartbeat_endpoint,
            self.origin_endpoint,
        )

    def _running_tracker(self) -> TrackerService:
        if self._tracker is None or not self.running:
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
        if self._origin is None or not self.running:
            raise ClosedError("broker is not running")
        return endpoint(self.config.public_host, self._origin.port)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        tracker = self._running_tracker()
        return tracker.call(tracker.stats).result(timeout)

    def rescan(self, timeout: float = 600.0) -> list[str]:
        """List the share folder now: files added, changed or removed take effect before this
        returns (new files are hashed first). Returns the names shared afterwards."""
        if self._worker is None or not self.running:
            raise ClosedError("broker is not running")
        self._worker.rescan(timeout)
        return [e.manifest.name for e in self.catalog.entries()]

    def metrics_snapshot(self, timeout: float = 5.0) -> Snapshot:
        tracker = self._running_tracker()
        snap = tracker.call(self.metrics.snapshot).result(timeout)
        if self._origin is not None:
            snap.values.update(self._origin.published.values)
            snap.meta.update(self._origin.published.meta)
        watch = self.transport.watch if self.transport is not None else None
        if watch is not None:
            snap.values.update(watch.published.values)
            snap.meta.update(watch.published.meta)
        return snap
