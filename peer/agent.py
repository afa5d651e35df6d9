"""Agent: the peer's I/O thread. It owns the DEALER to the broker, the heartbeat PUB and every REQ
lane used to fetch segments; nothing else touches them.

The policy is not here: the broker session and the transfers (peer/session.py, peer/transfer.py)
decide, and `PeerDriver` (peer/driver.py) routes their commands. This class is the ZeroMQ and
disk end of it: the loop decodes what arrives, feeds it in with the time, and sleeps until the
nearest deadline the cores report; the `io_*` methods send, write and close.

Lanes: a request goes out on an idle REQ socket connected to its source's endpoint (one request
in flight per socket); the reply returns the socket to the idle pool of that endpoint. A request
the transfer gives up on has its socket closed with linger 0 (a REQ that lost its reply cannot
send again: Lazy Pirate). In authenticated mode a lane is a CURVE client of the key the broker
gave for that source in the plan: a lane to a source whose key is unknown is never opened.

Identity: heartbeats carry the registration's token and a growing sequence number. `register`
is kept within the protocol's bounds (MAX_REQUEST_RUNS runs, REGISTER_MAX_BYTES); what does not
fit is announced with `have` once registered. When the broker relays a refusal reported against
this peer (`Recheck`), a worker thread re-verifies the file's held segments on disk (at most once
per RECHECK_INTERVAL_S per file) and the agent announces what verified.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import zmq

from common import protocol
from common.errors import MalformedMessage, StorageError, TransferError, WireCode
from common.manifest import SEGMENT_SIZE, Manifest
from common.metrics import Metrics, PeakRate
from common.protocol import (
    MAX_HOLDINGS,
    MAX_REQUEST_RUNS,
    REGISTER_MAX_BYTES,
    Error,
    Heartbeat,
    Holding,
    ListFiles,
    Message,
    Register,
    SegmentData,
    SegmentRequest,
    Source,
    StatsRequest,
)
from common.ranges import Run
from common.service import RateLimitedLog, ServiceThread
from common.threads import worker_thread
from common.transport import Transport
from peer.config import PeerConfig
from peer.driver import GetFuture, Job, PeerDriver
from peer.session import RegistrationChanged
from peer.store import Store
from peer.transfer import Command, SendRequest, TransferSettings, Write

log = logging.getLogger(__name__)

_MAX_REPLY_HEADER = 64 * 1024
_IDLE_LANES_PER_ENDPOINT = 8
RECHECK_INTERVAL_S = 60.0  # a file is re-verified on the broker's request at most this often
_HOLDING_BYTES = 64  # a holding's encoded size, its runs aside (file_id, keys, headers)
_RUN_BYTES = 11  # a run's widest encoding


def fit_register(
    holdings: list[tuple[bytes, list[tuple[int, int]]]], fixed_bytes: int
) -> tuple[list[Holding], list[bytes]]:
    """Holdings for a `register` within the protocol's bounds (runs, holdings, bytes), and the
    files left out or cut short, to announce with `have` once registered."""
    out: list[Holding] = []
    rest: list[bytes] = []
    runs_left = MAX_REQUEST_RUNS
    bytes_left = REGISTER_MAX_BYTES - fixed_bytes - 64
    for file_id, runs in holdings:
        if len(out) >= MAX_HOLDINGS or runs_left <= 0 or bytes_left < _HOLDING_BYTES + _RUN_BYTES:
            rest.append(file_id)
            continue
        take = min(len(runs), runs_left, (bytes_left - _HOLDING_BYTES) // _RUN_BYTES)
        out.append(Holding(file_id, tuple(runs[:take])))
        runs_left -= take
        bytes_left -= _HOLDING_BYTES + take * _RUN_BYTES
        if take < len(runs):
            rest.append(file_id)
    return out, rest


class Agent(ServiceThread, PeerDriver):
    def __init__(
        self,
        config: PeerConfig,
        transport: Transport,
        store: Store,
        serve_endpoint: Callable[[], str],
        metrics: Metrics,
    ) -> None:
        ServiceThread.__init__(self, f"zswarm-peer-{config.name}", transport.context)
        settings = TransferSettings(
            batch_segments=config.batch_segments,
            lanes_per_source=config.lanes_per_source,
            request_timeout_s=config.request_timeout_s,
            have_flush_interval_s=config.have_flush_interval_s,
            replan_interval_s=config.replan_interval_s,
            broker_timeout_s=config.broker_timeout_s,
        )
        PeerDriver.__init__(self, config.name, settings, metrics, time.monotonic())
        self.config = config
        self.transport = transport
        self.store = store
        self.serve_endpoint = serve_endpoint
        self.lost_reports: queue.SimpleQueue[tuple[bytes, list[Run]]] = queue.SimpleQueue()
        self._registered = threading.Event()  # set while the broker knows this peer; API threads wait on it
        self._left = threading.Event()  # set once `bye` was answered or timed out
        self._dealer: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._idle_lanes: dict[str, list[zmq.Socket[Any]]] = {}
        self._lane_owner: dict[zmq.Socket[Any], tuple[Job, int, str]] = {}
        self._log = RateLimitedLog(log)
        self._upload_peak = PeakRate()
        self.served_bytes: Callable[[], int] | None = None  # the segment server's total, set by Peer
        self._source_keys: dict[str, bytes] = {}  # endpoint -> CURVE key (authenticated mode)
        self._keyless: list[tuple[Job, int]] = []  # requests to sources of unknown key: failed
        self._unannounced: list[bytes] = []  # files `register` had no room for
        self._verified: queue.SimpleQueue[tuple[bytes, list[tuple[int, int]]]] = queue.SimpleQueue()
        self._to_verify: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._verified_at: dict[bytes, float] = {}
        self._verifier: threading.Thread | None = None
        self._verifier_lock = threading.Lock()

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def wait_registered(self, timeout: float) -> bool:
        return self._registered.wait(timeout)

    # ---- sockets

    def setup(self) -> None:
        self._dealer = self.transport.client(zmq.DEALER, self.config.broker, sndhwm=1000, rcvhwm=1000)
        self.poller.register(self._dealer, zmq.POLLIN)
        self._pub = self.transport.socket(zmq.PUB, sndhwm=10)
        now = time.monotonic()
        self.apply_session(self.session.register(now), now)

    def teardown(self) -> None:
        now = time.monotonic()
        self.abort_all(TransferError(f"peer {self.config.name} closed during the download"), now)
        for lanes in self._idle_lanes.values():
            for sock in lanes:
                self._close_socket(sock)
        self._idle_lanes.clear()
        for sock in list(self._lane_owner):
            self._close_socket(sock)
        for own in (self._dealer, self._pub):
            if own is not None:
                own.close(linger=0)
        verifier = self._verifier
        if verifier is not None and verifier is not threading.current_thread():
            verifier.join(5.0)

    # ---- the loop

    def next_timeout_ms(self, now: float) -> int:
        deadline = self.next_deadline(now)
        wait = deadline - now if deadline is not None else 1.0
        return max(0, min(1000, int(wait * 1000) + 1))

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        now = time.monotonic()
        if self._dealer is not None and self._dealer in events:
            self._drain_broker(self._dealer, now)
        for sock in [s for s in events if s in self._lane_owner]:
            self._on_lane_reply(sock, now)
        while self._keyless:
            job, request_id = self._keyless.pop()
            self.on_segment_reply(
                job, request_id, Error(0, WireCode.INTERNAL, "no key known for this source"), now
            )
        while True:
            try:
                file_id, runs = self.lost_reports.get_nowait()
            except queue.Empty:
                break
            self.report_lost(file_id, runs, now)
        while True:
            try:
                file_id, runs = self._verified.get_nowait()
            except queue.Empty:
                break
            self.announce_held(file_id, runs, now)
        self.tick(now)

    def _drain_broker(self, dealer: zmq.Socket[Any], now: float) -> None:
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = protocol.decode(frames, allowed=protocol.TRACKER_REPLIES)
            except MalformedMessage as exc:
                self._log.warning("malformed reply from the broker: %s", exc)
                continue
            self.on_tracker_reply(reply, now)

    def _on_lane_reply(self, sock: zmq.Socket[Any], now: float) -> None:
        job, request_id, endpoint = self._lane_owner[sock]
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        del self._lane_owner[sock]
        job.io.get("sockets", {}).pop(request_id, None)
        idle = self._idle_lanes.setdefault(endpoint, [])
        if len(idle) < _IDLE_LANES_PER_ENDPOINT:
            # An idle lane leaves the poller: libzmq checks every polled socket at every poll
            # (a zero-timeout poll(2) each), and idle lanes were most of a peer's syscalls.
            self.poller.unregister(sock)
            idle.append(sock)
        else:
            self._close_socket(sock)
        reply: Message | MalformedMessage
        try:
            reply = protocol.decode(frames, _MAX_REPLY_HEADER, allowed=(SegmentData, Error))
        except MalformedMessage as exc:
            self._log.warning("%s: malformed reply from %s: %s", job.transfer.name, endpoint, exc)
            reply = exc
        self.on_segment_reply(job, request_id, reply, now)

    def _close_socket(self, sock: zmq.Socket[Any]) -> None:
        self._lane_owner.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except KeyError:
            pass
        sock.close(linger=0)

    # ---- I/O for the driver

    def io_send_tracker(self, message: Message) -> None:
        assert self._dealer is not None  # created in setup()
        try:
            self._dealer.send_multipart(protocol.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the broker is away: the request times out like a lost one

    def io_send_register(self, rid: int) -> None:
        serve = self.serve_endpoint()
        holdings, self._unannounced = fit_register(
            self.store.holdings(), len(self.config.name.encode()) + len(serve) + 64
        )
        if self._unannounced:
            log.info("%d files are announced after registering (no room in register)", len(self._unannounced))
        self.io_send_tracker(Register(rid, self.config.name, serve, tuple(holdings)))

    def io_publish_heartbeat(self) -> None:
        if self._pub is None:
            return
        served = self.served_bytes() if self.served_bytes is not None else 0
        up_bps = int(self._upload_peak.sample(time.monotonic(), served))
        beat = Heartbeat(self.config.name, self.session.token, self.session.heartbeat_seq, up_bps)
        try:
            self._pub.send_multipart(protocol.encode(beat), zmq.NOBLOCK)
        except zmq.Again:
            pass  # heartbeats may be lost: the next one follows

    def io_held_runs(self, file_id: bytes) -> list[tuple[int, int]]:
        return self.store.held_runs(file_id)

    def io_recheck(self, file_ids: tuple[bytes, ...], now: float) -> None:
        """Re-verify on a worker thread (at most once per RECHECK_INTERVAL_S per file; else just
        announce again), then announce what verified (run_once drains `_verified`)."""
        for file_id in file_ids:
            last = self._verified_at.get(file_id)
            if last is not None and now - last < RECHECK_INTERVAL_S:
                self.announce_held(file_id, self.store.held_runs(file_id), now)
                continue
            self._verified_at[file_id] = now
            if len(self._verified_at) > 4096:
                self._verified_at = {
                    f: t for f, t in self._verified_at.items() if now - t < RECHECK_INTERVAL_S
                }
            self._to_verify.put(file_id)
        with self._verifier_lock:
            if self._verifier is None or not self._verifier.is_alive():
                self._verifier = worker_thread(self._verify_queued, f"zswarm-verify-{self.config.name}")
                self._verifier.start()

    def _verify_queued(self) -> None:
        while self.alive:
            try:
                file_id = self._to_verify.get_nowait()
            except queue.Empty:
                with self._verifier_lock:
                    if self._to_verify.empty():
                        self._verifier = None
                        return
                continue
            try:
                runs = self.store.reverify(file_id)
            except Exception:
                log.exception("re-verifying %s failed", file_id.hex()[:16])
                continue
            self._verified.put((file_id, runs))
            self.wakeup.wake()

    def on_sources(self, sources: tuple[Source, ...]) -> None:
        if not self.transport.secure:
            return
        for source in sources:
            if source.public_key is None:
                continue
            if self._source_keys.get(source.endpoint) != source.public_key:
                # A new key for this endpoint: lanes authenticated with the old one must go.
                for sock in self._idle_lanes.pop(source.endpoint, []):
                    self._close_socket(sock)
                self._source_keys[source.endpoint] = source.public_key
        if len(self._source_keys) > 65_536:
            self._source_keys.clear()  # rebuilt from the next plans

    def io_connect_heartbeat(self, endpoint: str) -> None:
        if self._pub is None:
            return
        for old in self.transport.connected(self._pub):
            self._pub.disconnect(old)
        self.transport.connect(self._pub, endpoint)

    def on_registration_event(self, change: RegistrationChanged) -> None:
        if change.registered:
            self._registered.set()
            now = time.monotonic()
            unannounced, self._unannounced = self._unannounced, []
            for file_id in unannounced:
                self.announce_held(file_id, self.store.held_runs(file_id), now)
        else:
            self._registered.clear()

    def on_left(self) -> None:
        self._left.set()

    def io_send_request(self, job: Job, command: SendRequest) -> None:
        request, endpoint = command.request, command.endpoint
        idle = self._idle_lanes.get(endpoint)
        if idle:
            sock = idle.pop()
            self.poller.register(sock, zmq.POLLIN)
        else:
            key = self._source_keys.get(endpoint)
            if self.transport.secure and key is None:
                self._keyless.append((job, request.id))  # failed on the next turn of the loop
                self.wakeup.wake()
                return
            sock = self.transport.client(
                zmq.REQ,
                endpoint,
                key,
                rcvhwm=4,
                sndhwm=4,
                maxmsgsize=self.config.batch_segments * SEGMENT_SIZE + _MAX_REPLY_HEADER,
            )
            self.poller.register(sock, zmq.POLLIN)
        self._lane_owner[sock] = (job, request.id, endpoint)
        job.io.setdefault("sockets", {})[request.id] = sock
        try:
            sock.send_multipart(
                protocol.encode(SegmentRequest(command.file_id, request.first, request.count)), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # not connected yet and nothing queued: the request times out and the lane is replaced

    def io_abandon_request(self, job: Job, request_id: int) -> None:
        sock = job.io.get("sockets", {}).pop(request_id, None)
        if sock is not None:
            self._close_socket(sock)

    def io_write(self, job: Job, command: Write, now: float) -> list[Command]:
        transfer = job.transfer
        manifest = transfer.manifest
        assert manifest is not None
        try:
            self.store.write_run(job.io["fd"], manifest.file_id, command.first, command.data)
        except StorageError as exc:
            # Segments written whole before the error are held: they are announced.
            kept = self.store.held_copy(manifest.file_id).intersect_run(command.first, command.count)
            return transfer.on_write_failed(exc, kept, command.source)
        transfer.on_written(command.source, command.first, command.count)
        return []

    def io_prepare(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        self.store.unexpect(job.transfer.name)  # the manifest is known: no longer a guess
        try:
            same = self.store.entry(manifest.file_id)
            if same is not None and same.complete and same.path.is_file():
                # Same content already here (perhaps under another name): no transfer needed.
                held = same.held.copy()
            else:
                held = self.store.begin(manifest)
                job.io["fd"] = self.store.open_for_write(manifest.file_id)
        except StorageError as exc:
            return job.transfer.on_prepare_failed(exc, now)
        if held and len(held) < manifest.segment_count:
            log.info(
                "%s: resuming with %d of %d segments already verified",
                job.transfer.name,
                len(held),
                manifest.segment_count,
            )
        return job.transfer.on_prepared(held, now)

    def io_finish(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        self._close_fd(job)
        try:
            same = self.store.entry(manifest.file_id)
            if same is not None and same.complete and same.manifest.name != manifest.name:
                path = self.store.copy_complete(same, manifest)
            else:
                path = self.store.finish(manifest.file_id)
        except StorageError as exc:
            return job.transfer.on_finish_failed(exc, now)
        return job.transfer.on_finished(path, now)

    def io_load_manifest(self, file_id: bytes) -> Manifest | None:
        return self.store.load_manifest(file_id)

    def io_cached_manifest(self, name: str) -> Manifest | None:
        return self.store.manifest_named(name)

    def io_job_started(self, job: Job) -> None:
        self.store.expect(job.transfer.name)

    def io_job_ended(self, job: Job) -> None:
        self.store.unexpect(job.transfer.name)
        if job.transfer.manifest is not None:
            self.store.stop_fetching(job.transfer.manifest.file_id)
        for sock in job.io.get("sockets", {}).values():
            self._close_socket(sock)
        job.io.pop("sockets", None)
        self._close_fd(job)
        if not self.jobs:
            # Idle lanes hold a connection each: release them when nothing downloads.
            for lanes in self._idle_lanes.values():
                for sock in lanes:
                    self._close_socket(sock)
            self._idle_lanes.clear()

    @staticmethod
    def _close_fd(job: Job) -> None:
        fd = job.io.pop("fd", -1)
        if fd >= 0:
            os.close(fd)

    # ---- commands (run in this thread through call())

    def api_start_get(self, name: str, timeout_s: float, on_cancel: Callable[[], None]) -> GetFuture:
        return self.start_get(name, timeout_s, on_cancel, time.monotonic())

    def api_cancel_get(self, name: str) -> None:
        self.cancel_get(name, time.monotonic())

    def api_request(self, make: Callable[[int], Message]) -> Future[Message]:
        return self.request_reply(make, time.monotonic())

    def list_files(self) -> Future[Message]:
        return self.api_request(ListFiles)

    def broker_stats(self) -> Future[Message]:
        return self.api_request(StatsRequest)

    def say_bye(self, timeout_s: float) -> threading.Event:
        """Leave for good; the event is set once the broker answered (or the timeout passed)."""
        self._registered.clear()
        now = time.monotonic()
        self.apply_session(self.session.leave(now, timeout_s), now)
        return self._left

    def rescan(self) -> dict[bytes, int]:
        held = self.store.scan()
        now = time.monotonic()
        self.apply_session(self.session.register(now), now)
        return held

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        snapshot = self.metrics.snapshot()
        return {
            "name": self.config.name,
            "broker": self.config.broker,
            "registered": self.session.registered,
            "session": self.session.state.value,
            "serving": self.serve_endpoint(),
            "downloads": self.downloads(now),
            "counts": {
                "lane_timeouts": int(snapshot.total("segment_request_timeouts_total")),
                "endgame_requests": int(snapshot.total("endgame_requests_total")),
                "segments_rejected": int(snapshot.total("segments_rejected_total")),
            },
            "metrics": snapshot.flat(),
            "loop_errors": self.loop_errors,
        }


__all__ = ["Agent", "GetFuture"]
