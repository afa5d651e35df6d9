"""Agent: the peer's I/O thread, a thin shell around the broker session and the transfers.

It owns the DEALER to the broker, the heartbeat PUB and every REQ lane used to fetch segments;
nothing else touches them. The policy lives in two cores with no I/O: `BrokerSession`
(peer/session.py: registration, request ids, heartbeats, pings, bye) and one `Transfer` per
file being fetched (peer/transfer.py: plans, requests, timeouts, verification, endgame). The
loop here only decodes what arrives, feeds it to the cores with the time, carries out the
commands they return (send, write, close a lane, resolve a future) and sleeps until the nearest
deadline they report.

Lanes: a request goes out on an idle REQ socket connected to its source's endpoint (one request
in flight per socket); the reply returns the socket to the idle pool of that endpoint. A request
the transfer gives up on has its socket closed with linger 0 (a REQ that lost its reply cannot
send again: Lazy Pirate).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import zmq

from common import protocol
from common.errors import (
    BrokerUnavailable,
    MalformedMessage,
    RemoteError,
    StorageError,
    TransferError,
    ZswarmError,
)
from common.manifest import SEGMENT_SIZE, Manifest
from common.metrics import Metrics
from common.protocol import (
    BadSource,
    Error,
    Get,
    Have,
    Heartbeat,
    Holding,
    ListFiles,
    Lost,
    Message,
    Ok,
    Register,
    SegmentData,
    SegmentRequest,
    StatsRequest,
)
from common.ranges import Run
from common.service import RateLimitedLog, ServiceThread
from common.subscription import Subscription
from common.transport import Transport
from peer.config import PeerConfig
from peer.session import (
    BrokerSession,
    BrokerSilent,
    ConnectHeartbeat,
    Delivered,
    PublishHeartbeat,
    RegistrationChanged,
    SendRegister,
    Left,
    SendTracker,
    SessionCommand,
)
from peer.store import Store
from peer.transfer import (
    AbandonRequest,
    Announce,
    AskPlan,
    BadBytes,
    CancelledTransfer,
    Command,
    Completed,
    Failed,
    Finish,
    GetResult,
    Prepare,
    Progress,
    ReportBad,
    RequestTimedOut,
    SendRequest,
    SourceTiming,
    Transfer,
    TransferSettings,
    Write,
)

log = logging.getLogger(__name__)

_MAX_REPLY_HEADER = 64 * 1024
_PROGRESS_INTERVAL_S = 0.1
_IDLE_LANES_PER_ENDPOINT = 8


class PeerMetrics:
    """The agent's metrics (the segment server has its own: each thread owns what it updates)."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests_sent = metrics.counter(
            "segment_requests_total", "segment requests sent, by source", ("source",)
        )
        self.request_timeouts = metrics.counter(
            "segment_request_timeouts_total", "segment requests given up on for lack of a reply"
        )
        self.segments_received = metrics.counter(
            "segments_received_total", "verified segments written, by source", ("source",)
        )
        self.bytes_received = metrics.counter("received_bytes_total", "verified bytes written")
        self.segments_rejected = metrics.counter(
            "segments_rejected_total", "segments that failed verification and were discarded"
        )
        self.endgame_requests = metrics.counter(
            "endgame_requests_total", "duplicate requests for straggling runs (endgame)"
        )
        self.downloads_active = metrics.gauge("downloads_active_downloads", "downloads in progress")
        self.downloads_done = metrics.counter("downloads_completed_total", "downloads that completed")
        self.downloads_failed = metrics.counter("downloads_failed_total", "downloads that failed")
        self.tracker_requests = metrics.counter("tracker_requests_total", "requests sent to the broker")
        self.reply_seconds = metrics.histogram("segment_reply_seconds", "segment request to reply")


class GetFuture(Future[GetResult]):
    """The result of `Peer.start_get`: a Future that can also be awaited, with a progress
    subscription. Cancelling it stops the download (verified segments are kept)."""

    def __init__(self, progress: Subscription[Progress], on_cancel: Callable[[], None]) -> None:
        super().__init__()
        self._progress = progress
        self._on_cancel = on_cancel

    def progress(self) -> Subscription[Progress]:
        """Snapshots of the download's progress, newest first-come; ends when it ends."""
        return self._progress

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel()
        return cancelled

    def __await__(self) -> Any:
        import asyncio

        return asyncio.wrap_future(self).__await__()


@dataclass(eq=False)
class _Job:
    serial: int
    transfer: Transfer
    futures: list[GetFuture]
    progress: Subscription[Progress]
    fd: int = -1
    last_published: float = 0.0
    request_sockets: dict[int, zmq.Socket[Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Plan:
    job: _Job


@dataclass(frozen=True, slots=True)
class _Announced:
    job: _Job
    final: bool


@dataclass(frozen=True, slots=True)
class _Call:
    future: Future[Message]


class Agent(ServiceThread):
    def __init__(
        self,
        config: PeerConfig,
        transport: Transport,
        store: Store,
        serve_endpoint: Callable[[], str],
        metrics: Metrics,
    ) -> None:
        super().__init__(f"zswarm-peer-{config.name}", transport.context)
        self.config = config
        self.transport = transport
        self.store = store
        self.serve_endpoint = serve_endpoint
        self.metrics = metrics
        self.m = PeerMetrics(metrics)
        self.session = BrokerSession(config.broker_timeout_s, time.monotonic())
        self.settings = TransferSettings(
            batch_segments=config.batch_segments,
            lanes_per_source=config.lanes_per_source,
            request_timeout_s=config.request_timeout_s,
            have_flush_interval_s=config.have_flush_interval_s,
            replan_interval_s=config.replan_interval_s,
            broker_timeout_s=config.broker_timeout_s,
        )
        self.timings: dict[str, SourceTiming] = {}  # by endpoint, shared by every transfer
        self.lost_reports: queue.SimpleQueue[tuple[bytes, list[Run]]] = queue.SimpleQueue()
        self._registered = threading.Event()  # set while the broker knows this peer; API threads wait on it
        self._left = threading.Event()  # set once `bye` was answered or timed out
        self._jobs: dict[str, _Job] = {}
        self._serial = 0
        self._dealer: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._idle_lanes: dict[str, list[zmq.Socket[Any]]] = {}
        self._lane_owner: dict[zmq.Socket[Any], tuple[_Job, int, str]] = {}
        self._bad_log = RateLimitedLog(log)

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
        self._apply_session(self.session.register(time.monotonic()))

    def teardown(self) -> None:
        now = time.monotonic()
        for job in list(self._jobs.values()):
            error = TransferError(f"peer closed while downloading {job.transfer.name}")
            self._run(job, job.transfer.abort(error, now))
        for lanes in self._idle_lanes.values():
            for sock in lanes:
                self._close_socket(sock)
        self._idle_lanes.clear()
        for sock in list(self._lane_owner):
            self._close_socket(sock)
        for sock in (self._dealer, self._pub):
            if sock is not None:
                sock.close(linger=0)

    # ---- the loop

    def next_timeout_ms(self, now: float) -> int:
        deadlines = [d for d in (self.session.next_deadline(),) if d is not None]
        for job in self._jobs.values():
            deadline = job.transfer.next_deadline()
            if deadline is not None:
                deadlines.append(deadline)
            if job.futures and job.transfer.download is not None:
                deadlines.append(job.last_published + _PROGRESS_INTERVAL_S)
        # Deadlines already past were acted on by the last tick: counting them would spin.
        upcoming = [d for d in deadlines if d > now]
        wait = min(upcoming) - now if upcoming else 1.0
        return max(0, min(1000, int(wait * 1000) + 1))

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        now = time.monotonic()
        if self._dealer is not None and self._dealer in events:
            self._drain_broker(self._dealer, now)
        for sock in [s for s in events if s in self._lane_owner]:
            self._on_lane_reply(sock, now)
        self._send_lost_reports(now)
        self._apply_session(self.session.tick(now))
        for job in list(self._jobs.values()):
            self._run(job, job.transfer.tick(now))
            if job.transfer.download is not None and now - job.last_published >= _PROGRESS_INTERVAL_S:
                self._publish(job, now)

    # ---- the broker session

    def _drain_broker(self, dealer: zmq.Socket[Any], now: float) -> None:
        while True:
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                reply = protocol.decode(frames, allowed=protocol.TRACKER_REPLIES)
            except MalformedMessage as exc:
                self._bad_log.warning("malformed reply from the broker: %s", exc)
                continue
            self._apply_session(self.session.on_reply(reply, now))

    def _apply_session(self, commands: Iterable[SessionCommand]) -> None:
        for command in commands:
            if isinstance(command, SendTracker):
                self._send_tracker(command.message)
            elif isinstance(command, Delivered):
                self._deliver(command.token, command.reply)
            elif isinstance(command, PublishHeartbeat):
                if self._pub is not None:
                    self._pub.send_multipart(protocol.encode(Heartbeat(self.config.name)), zmq.NOBLOCK)
            elif isinstance(command, SendRegister):
                self._send_register(command.rid)
            elif isinstance(command, ConnectHeartbeat):
                self._connect_heartbeat(command.endpoint)
            elif isinstance(command, RegistrationChanged):
                self._on_registration(command)
            elif isinstance(command, BrokerSilent):
                self._bad_log.warning("broker %s is not answering (%s)", self.config.broker, command.what)
            elif isinstance(command, Left):
                self._left.set()

    def _send_tracker(self, message: Message) -> None:
        assert self._dealer is not None  # created in setup()
        self.m.tracker_requests.inc()
        try:
            self._dealer.send_multipart(protocol.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the broker is away: the request times out like a lost one

    def _send_register(self, rid: int) -> None:
        holdings = tuple(Holding(fid, tuple(runs)) for fid, runs in self.store.holdings())
        self._send_tracker(Register(rid, self.config.name, self.serve_endpoint(), holdings))

    def _connect_heartbeat(self, endpoint: str) -> None:
        if self._pub is None:
            return
        for old in self.transport.connected(self._pub):
            self._pub.disconnect(old)
        self.transport.connect(self._pub, endpoint)

    def _on_registration(self, change: RegistrationChanged) -> None:
        now = time.monotonic()
        if change.registered:
            self._registered.set()
            log.info("registered with the broker as %s", self.config.name)
        else:
            if self._registered.is_set():
                log.warning("%s: registering again", change.why)
            elif "refused" in change.why:
                log.error("%s", change.why)
            self._registered.clear()
        for job in list(self._jobs.values()):
            self._run(job, job.transfer.set_registered(change.registered, now))

    def _request(self, make: Callable[[int], Message], token: Any) -> None:
        self._apply_session(self.session.request(make, token, time.monotonic()))

    def _deliver(self, token: Any, reply: Message | None) -> None:
        now = time.monotonic()
        if isinstance(token, _Plan):
            job = token.job
            if self._jobs.get(job.transfer.name) is not job:
                return
            if reply is None:
                self._run(job, job.transfer.on_plan_timeout(now))
            else:
                cached = None
                file_id = getattr(reply, "file_id", None)
                if getattr(reply, "digests", b"") is None and file_id is not None:
                    cached = self.store.load_manifest(file_id)
                self._run(job, job.transfer.on_plan(reply, cached, now))
        elif isinstance(token, _Announced):
            if token.final and self._jobs.get(token.job.transfer.name) is token.job:
                if not isinstance(reply, Ok):
                    log.warning(
                        "%s: the broker did not confirm the last segments; it learns them at registration",
                        token.job.transfer.name,
                    )
                self._run(token.job, token.job.transfer.on_announced(isinstance(reply, Ok), now))
        elif isinstance(token, _Call):
            future = token.future
            if future.done():
                return
            if reply is None:
                future.set_exception(
                    BrokerUnavailable(
                        f"broker {self.config.broker} did not answer within {self.config.broker_timeout_s} s"
                    )
                )
            elif isinstance(reply, Error):
                future.set_exception(RemoteError.from_wire(reply.code, reply.message))
            else:
                future.set_result(reply)

    def _send_lost_reports(self, now: float) -> None:
        while True:
            try:
                file_id, runs = self.lost_reports.get_nowait()
            except queue.Empty:
                return
            if self.session.registered:
                self._request(lambda rid, f=file_id, r=tuple(runs): Lost(rid, f, r), None)  # type: ignore[misc]

    # ---- transfers: carrying out the core's commands

    def _run(self, job: _Job, commands: Iterable[Command]) -> None:
        todo: deque[Command] = deque(commands)
        transfer = job.transfer
        while todo:
            command = todo.popleft()
            now = time.monotonic()
            if isinstance(command, SendRequest):
                self._send_request(job, command)
            elif isinstance(command, Write):
                todo.extend(self._write(job, command))
            elif isinstance(command, AbandonRequest):
                sock = job.request_sockets.pop(command.request_id, None)
                if sock is not None:
                    self._close_socket(sock)
            elif isinstance(command, Announce):
                if self.session.registered:
                    token = _Announced(job, command.final)
                    self._request(lambda rid, c=command: Have(rid, c.file_id, c.runs), token)  # type: ignore[misc]
                elif command.final:
                    todo.extend(transfer.on_announced(False, now))  # registration carries it
            elif isinstance(command, AskPlan):
                self._request(lambda rid, c=command: Get(rid, c.name, c.known_file_id), _Plan(job))  # type: ignore[misc]
            elif isinstance(command, ReportBad):
                if self.session.registered:
                    self._request(
                        lambda rid, c=command: BadSource(rid, c.file_id, c.source, c.runs, str(c.reason)),  # type: ignore[misc]
                        None,
                    )
            elif isinstance(command, Prepare):
                todo.extend(self._prepare(job, command.manifest, now))
            elif isinstance(command, Finish):
                todo.extend(self._finish(job, command.manifest, now))
            elif isinstance(command, Completed):
                self._complete(job, command.result, now)
            elif isinstance(command, Failed):
                self._fail_job(job, command.error, now)
            elif isinstance(command, RequestTimedOut):
                self.m.request_timeouts.inc()
                self._bad_log.warning(
                    "%s: no reply from %s within %.1f s; asking elsewhere",
                    transfer.name,
                    command.source,
                    command.waited_s,
                )
            elif isinstance(command, BadBytes):
                self.m.segments_rejected.inc(command.segments)
                self._bad_log.warning(
                    "%s: %d segments from %s failed verification; discarded",
                    transfer.name,
                    command.segments,
                    command.source,
                )

    def _send_request(self, job: _Job, command: SendRequest) -> None:
        request, endpoint = command.request, command.endpoint
        idle = self._idle_lanes.get(endpoint)
        if idle:
            sock = idle.pop()
        else:
            sock = self.transport.client(
                zmq.REQ,
                endpoint,
                rcvhwm=4,
                sndhwm=4,
                maxmsgsize=self.config.batch_segments * SEGMENT_SIZE + _MAX_REPLY_HEADER,
            )
            self.poller.register(sock, zmq.POLLIN)
        self._lane_owner[sock] = (job, request.id, endpoint)
        job.request_sockets[request.id] = sock
        self.m.requests_sent.inc(labels=(request.source,))
        if request.duplicate:
            self.m.endgame_requests.inc()
        try:
            sock.send_multipart(
                protocol.encode(SegmentRequest(command.file_id, request.first, request.count)), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # not connected yet and nothing queued: the request times out and the lane is replaced

    def _on_lane_reply(self, sock: zmq.Socket[Any], now: float) -> None:
        job, request_id, endpoint = self._lane_owner[sock]
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        del self._lane_owner[sock]
        job.request_sockets.pop(request_id, None)
        idle = self._idle_lanes.setdefault(endpoint, [])
        if len(idle) < _IDLE_LANES_PER_ENDPOINT:
            idle.append(sock)
        else:
            self.poller.unregister(sock)
            sock.close(linger=0)
        if self._jobs.get(job.transfer.name) is not job:
            return
        request = job.transfer.requests.get(request_id)
        if request is not None:
            self.m.reply_seconds.observe(now - request.sent_at)
        reply: Message | MalformedMessage
        try:
            reply = protocol.decode(frames, _MAX_REPLY_HEADER, allowed=(SegmentData, Error))
        except MalformedMessage as exc:
            self._bad_log.warning("%s: malformed reply from %s: %s", job.transfer.name, endpoint, exc)
            reply = exc
        self._run(job, job.transfer.on_reply(request_id, reply, now))

    def _close_socket(self, sock: zmq.Socket[Any]) -> None:
        self._lane_owner.pop(sock, None)
        try:
            self.poller.unregister(sock)
        except KeyError:
            pass
        sock.close(linger=0)

    def _write(self, job: _Job, command: Write) -> list[Command]:
        transfer = job.transfer
        manifest = transfer.manifest
        assert manifest is not None
        try:
            self.store.write_run(job.fd, manifest.file_id, command.first, command.data)
        except StorageError as exc:
            # Segments written whole before the error are held: they are announced.
            kept = self.store.held_copy(manifest.file_id).intersect_run(command.first, command.count)
            return transfer.on_write_failed(exc, kept, command.source)
        transfer.on_written(command.source, command.first, command.count)
        self.m.segments_received.inc(command.count, labels=(command.source,))
        self.m.bytes_received.inc(len(command.data))
        return []

    def _prepare(self, job: _Job, manifest: Manifest, now: float) -> list[Command]:
        try:
            same = self.store.entry(manifest.file_id)
            if same is not None and same.complete and same.path.is_file():
                # Same content already here (perhaps under another name): no transfer needed.
                held = same.held.copy()
            else:
                held = self.store.begin(manifest)
                job.fd = self.store.open_for_write(manifest.file_id)
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

    def _finish(self, job: _Job, manifest: Manifest, now: float) -> list[Command]:
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

    def _complete(self, job: _Job, result: GetResult, now: float) -> None:
        self._drop(job)
        self.m.downloads_done.inc()
        log.info("%s: done in %.2f s from %s", job.transfer.name, result.seconds, result.sources)
        job.progress.close(job.transfer.progress(now))
        for future in job.futures:
            if not future.done():
                future.set_result(result)

    def _fail_job(self, job: _Job, error: ZswarmError, now: float) -> None:
        self._drop(job)
        self.m.downloads_failed.inc()
        job.progress.close(job.transfer.progress(now))
        if isinstance(error, CancelledTransfer):
            log.info("%s: cancelled; %s", job.transfer.name, "verified segments kept for a resume")
        else:
            log.warning("%s: download failed: %s", job.transfer.name, error)
        for future in job.futures:
            if future.done():
                continue
            if isinstance(error, CancelledTransfer):
                future.cancel()
            else:
                future.set_exception(error)

    def _drop(self, job: _Job) -> None:
        if self._jobs.get(job.transfer.name) is job:
            del self._jobs[job.transfer.name]
        self.m.downloads_active.set(len(self._jobs))
        for sock in job.request_sockets.values():
            self._close_socket(sock)
        job.request_sockets.clear()
        self._close_fd(job)
        if not self._jobs:
            # Idle lanes hold a connection each: release them when nothing downloads.
            for lanes in self._idle_lanes.values():
                for sock in lanes:
                    self._close_socket(sock)
            self._idle_lanes.clear()

    def _close_fd(self, job: _Job) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1

    def _publish(self, job: _Job, now: float) -> None:
        job.last_published = now
        job.progress.publish(job.transfer.progress(now))

    # ---- commands (run in this thread through call())

    def start_get(self, name: str, timeout_s: float, on_cancel: Callable[[], None]) -> GetFuture:
        existing = self._jobs.get(name)
        if existing is not None:
            future = GetFuture(existing.progress, on_cancel)
            existing.futures.append(future)
            return future
        now = time.monotonic()
        cached = self.store.manifest_named(name)
        transfer = Transfer(
            name=name,
            settings=TransferSettings(**{**_settings_dict(self.settings), "timeout_s": timeout_s}),
            started=now,
            known_file_id=cached.file_id if cached is not None else None,
            timings=self.timings,
            registered=self.session.registered,
        )
        progress: Subscription[Progress] = Subscription()
        future = GetFuture(progress, on_cancel)
        self._serial += 1
        job = _Job(self._serial, transfer, [future], progress)
        self._jobs[name] = job
        self.m.downloads_active.set(len(self._jobs))
        self._run(job, transfer.tick(now))
        return future

    def cancel_get(self, name: str) -> None:
        job = self._jobs.get(name)
        if job is None:
            return
        if all(f.cancelled() for f in job.futures):  # others still waiting keep it going
            self._run(job, job.transfer.cancel(time.monotonic()))

    def request_reply(self, make: Callable[[int], Message]) -> Future[Message]:
        """Send one request to the broker; the future gets the reply or BrokerUnavailable."""
        future: Future[Message] = Future()
        self._request(make, _Call(future))
        return future

    def list_files(self) -> Future[Message]:
        return self.request_reply(ListFiles)

    def broker_stats(self) -> Future[Message]:
        return self.request_reply(StatsRequest)

    def say_bye(self, timeout_s: float) -> threading.Event:
        """Leave for good; the event is set once the broker answered (or the timeout passed)."""
        self._registered.clear()
        self._apply_session(self.session.leave(time.monotonic(), timeout_s))
        return self._left

    def rescan(self) -> dict[bytes, int]:
        held = self.store.scan()
        self._apply_session(self.session.register(time.monotonic()))
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
            "downloads": {
                name: {
                    "state": job.transfer.state.value,
                    "done": job.transfer.download.done if job.transfer.download else 0,
                    "segments": job.transfer.download.segment_count if job.transfer.download else None,
                    "seconds": round(now - job.transfer.started, 3),
                    "in_flight": len(job.transfer.requests),
                }
                for name, job in self._jobs.items()
            },
            "counts": {
                "lane_timeouts": int(snapshot.total("segment_request_timeouts_total")),
                "endgame_requests": int(snapshot.total("endgame_requests_total")),
                "segments_rejected": int(snapshot.total("segments_rejected_total")),
            },
            "metrics": snapshot.flat(),
            "loop_errors": self.loop_errors,
        }


def _settings_dict(settings: TransferSettings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in settings.__slots__}


__all__ = ["Agent", "GetFuture", "GetResult"]
