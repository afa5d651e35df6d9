"""Agent: the peer's I/O thread. It owns the DEALER to the broker, the heartbeat PUB, and every
REQ lane used to fetch segments; nothing else touches them.

Theory of operation
-------------------
Broker dialog. The agent registers with what the store holds, then publishes a heartbeat every
interval the broker asked for. Requests carry a `rid`; replies are matched by it, and a request
unanswered after `broker_timeout_s` fails. When nothing has come from the broker for a heartbeat
expiry period the agent sends `ping`; a `pong` saying the peer is unknown (the broker restarted,
or evicted it) or any `not_registered` error makes it register again with everything it holds.
So a restarted broker relearns the swarm from the peers, without an operator.

Downloads. `get` asks the broker for the manifest and a plan, then runs a `Download` (pure state)
with up to `lanes_per_source` REQ sockets per source (fewer for the broker, as it says). A lane
sends one run request and waits; its reply is verified segment by segment, the verified parts are
written with `pwrite`, and they are reported to the broker in `have` batches every
`have_flush_interval_s`, so this peer is a source for them at once. A lane whose reply does not
come within `request_timeout_s` is closed (linger 0) and replaced: a REQ socket that lost its
reply cannot send again (Lazy Pirate). Bad bytes and refusals are reported (`bad_source`). Every
`replan_interval_s` a download still leaning on the broker asks for a fresh plan, to move to peers
that gained segments meanwhile. On completion the last `have` is acknowledged before the file is
moved to its final name and the future resolves: by then the broker knows this peer holds it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import zmq

from common import protocol
from common.errors import (
    BrokerUnavailable,
    IntegrityError,
    MalformedMessage,
    NoSourceLeft,
    RemoteError,
    StorageError,
    TransferError,
    WireCode,
    ZswarmError,
)
from common.manifest import SEGMENT_SIZE, Manifest
from common.protocol import (
    BadSource,
    Bye,
    Error,
    FileInfo,
    Files,
    Get,
    Have,
    Heartbeat,
    Holding,
    ListFiles,
    Lost,
    Message,
    Ok,
    Ping,
    Pong,
    Register,
    Registered,
    SegmentData,
    SegmentRequest,
    Stats,
    StatsRequest,
)
from common.ranges import Run, SegmentSet
from common.service import RateLimitedLog, ServiceThread, make_socket
from peer.config import PeerConfig
from peer.download import BROKER, Download
from peer.store import Store

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
_MAX_REPLY_HEADER = 64 * 1024
_PROGRESS_INTERVAL_S = 0.1
_MIN_REPLAN_GAP_S = 0.02  # deferred segments: ask again at most this often
_MAX_REQUEST_TIMEOUT_S = 60.0
_ORIGIN_PATIENCE = 4  # origin requests time out after 4 x request_timeout_s at least


@dataclass(frozen=True)
class GetResult:
    """What `Peer.get` returns."""

    name: str
    path: Path
    size: int
    file_id: str  # hex
    seconds: float
    segment_sources: list[str]  # for each segment: "broker", a peer's name, or "local"
    sources: dict[str, int]  # source -> number of segments


@dataclass
class _Pending:
    deadline: float
    on_reply: Callable[[Message], None]
    on_timeout: Callable[[], None]


@dataclass
class _Lane:
    job: _Job
    source: str
    endpoint: str
    sock: zmq.Socket[Any] | None = None
    request: Run | None = None
    sent_at: float = 0.0
    deadline: float = 0.0


class _ReplyTimes:
    """Smoothed reply time of one source (RFC 6298 style), so that a loaded but healthy source on
    a slow link is given the time it needs, while `request_timeout_s` stays the floor."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def sample(self, seconds: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
            self.srtt = 0.875 * self.srtt + 0.125 * seconds

    def timeout(self, floor: float) -> float:
        if self.srtt is None:
            return floor
        return min(max(floor, self.srtt + 4 * self.rttvar), _MAX_REQUEST_TIMEOUT_S)

    def patience(self, floor: float) -> float:
        """How long a request may take before it counts as a straggler (endgame)."""
        return max(floor / 4, 2 * self.srtt) if self.srtt is not None else floor / 4


@dataclass
class _Job:
    name: str
    future: Future[GetResult]
    progress: ProgressFn | None
    started: float
    deadline: float
    manifest: Manifest | None = None
    download: Download | None = None
    fd: int = -1
    lanes: dict[str, list[_Lane]] = field(default_factory=dict)
    unflushed: SegmentSet = field(default_factory=SegmentSet)
    last_flush: float = 0.0
    next_replan: float = 0.0
    last_plan_request: float = 0.0
    plan_was_empty: bool = False
    replanning: bool = False
    stuck_replans: int = 0
    finishing: bool = False
    origin_lanes: int = 1
    last_progress: float = 0.0


class Agent(ServiceThread):
    def __init__(
        self, config: PeerConfig, context: zmq.Context[Any], store: Store, serve_endpoint: Callable[[], str]
    ) -> None:
        super().__init__(f"zswarm-peer-{config.name}", context)
        self.config = config
        self.store = store
        self.serve_endpoint = serve_endpoint
        self._registered = threading.Event()  # set while the broker knows this peer; API threads wait on it
        self.session = 0
        self.heartbeat_interval_s = 1.0
        self.heartbeat_liveness = 3
        self.heartbeat_endpoint: str | None = None
        self.counts: dict[str, int] = {}
        self.lost_reports: queue.SimpleQueue[tuple[bytes, list[Run]]] = queue.SimpleQueue()
        self._dealer: zmq.Socket[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._next_rid = 1
        self._pending: dict[int, _Pending] = {}
        self._registering = False
        self._last_broker_reply = 0.0
        self._ping_pending = False
        self._next_heartbeat = 0.0
        self._next_register = 0.0
        self._jobs: dict[str, _Job] = {}
        self._lanes_by_sock: dict[zmq.Socket[Any], _Lane] = {}
        self._reply_times: dict[str, _ReplyTimes] = {}  # by endpoint
        self._bad_log = RateLimitedLog(log)
        self._broker_down_logged = False

    @property
    def registered(self) -> bool:
        return self._registered.is_set()

    def wait_registered(self, timeout: float) -> bool:
        return self._registered.wait(timeout)

    # ---- sockets

    def setup(self) -> None:
        dealer = make_socket(self.context, zmq.DEALER, sndhwm=1000, rcvhwm=1000)
        dealer.connect(self.config.broker)
        self._dealer = dealer
        self.poller.register(dealer, zmq.POLLIN)
        self._pub = make_socket(self.context, zmq.PUB, sndhwm=10)
        self._send_register(time.monotonic())

    def teardown(self) -> None:
        for job in list(self._jobs.values()):
            self._fail(job, TransferError(f"peer closed while downloading {job.name}"))
        for sock in (self._dealer, self._pub):
            if sock is not None:
                sock.close(linger=0)

    # ---- the loop

    def next_timeout_ms(self, now: float) -> int:
        deadlines = [self._next_heartbeat if self.registered else self._next_register]
        deadlines.extend(p.deadline for p in self._pending.values())
        for lane in self._lanes_by_sock.values():
            if lane.request is not None:
                deadlines.append(lane.deadline)
                download = lane.job.download
                if download is not None and download.in_endgame():
                    deadlines.append(lane.sent_at + self._patience(lane.endpoint))  # a straggler then
        for job in self._jobs.values():
            deadlines.append(job.deadline)
            if job.download is None:
                deadlines.append(job.started + self.config.broker_timeout_s)
            if job.download is not None and not job.finishing:
                if job.unflushed:
                    deadlines.append(job.last_flush + self.config.have_flush_interval_s)
                deadlines.append(job.next_replan)
                if download_waits(job):
                    deadlines.append(job.last_plan_request + _MIN_REPLAN_GAP_S)
        if self.registered:
            deadlines.append(self._last_broker_reply + self._broker_silence_s())
        # Deadlines already past were acted on by the last tick, or need no action (a ping
        # under way, a replan not wanted): counting them would spin the loop.
        upcoming = [d for d in deadlines if d > now]
        wait = min(upcoming) - now if upcoming else 1.0
        return max(0, min(1000, int(wait * 1000) + 1))

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        if self._dealer is not None and self._dealer in events:
            self._drain_broker(self._dealer)
        for sock in [s for s in events if s in self._lanes_by_sock]:
            self._on_lane_reply(self._lanes_by_sock[sock])
        now = time.monotonic()
        self._send_lost_reports()
        self._tick_broker(now)
        for job in list(self._jobs.values()):
            self._tick_job(job, now)

    # ---- broker requests

    def _request(
        self,
        make: Callable[[int], Message],
        on_reply: Callable[[Message], None],
        on_timeout: Callable[[], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        rid = self._next_rid
        self._next_rid = rid + 1 if rid < protocol.MAX_RID else 1
        now = time.monotonic()
        self._pending[rid] = _Pending(
            now + (timeout_s or self.config.broker_timeout_s), on_reply, on_timeout or (lambda: None)
        )
        assert self._dealer is not None  # created in setup()
        try:
            self._dealer.send_multipart(protocol.encode(make(rid)), zmq.NOBLOCK)
        except zmq.Again:
            pass  # queue full while the broker is away: the request times out like a lost one

    def _drain_broker(self, dealer: zmq.Socket[Any]) -> None:
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
            self._last_broker_reply = time.monotonic()
            if self._broker_down_logged:
                log.info("broker answers again")
                self._broker_down_logged = False
            pending = self._pending.pop(getattr(reply, "rid", -1), None)
            if pending is None:
                continue  # a reply that came after its request timed out
            if isinstance(reply, Error) and reply.code == WireCode.NOT_REGISTERED:
                self._lost_registration("the broker does not know this peer")
            pending.on_reply(reply)

    def _tick_broker(self, now: float) -> None:
        for rid in [rid for rid, p in self._pending.items() if p.deadline <= now]:
            self._pending.pop(rid).on_timeout()
        if not self.registered:
            if not self._registering and now >= self._next_register:
                self._send_register(now)
            return
        if now >= self._next_heartbeat and self._pub is not None:
            self._pub.send_multipart(protocol.encode(Heartbeat(self.config.name)), zmq.NOBLOCK)
            self._next_heartbeat = now + self.heartbeat_interval_s
        if not self._ping_pending and now - self._last_broker_reply >= self._broker_silence_s():
            self._ping_pending = True
            self._request(Ping, self._on_pong, self._on_ping_timeout, timeout_s=self._broker_silence_s())

    def _broker_silence_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def _on_pong(self, reply: Message) -> None:
        self._ping_pending = False
        if isinstance(reply, Pong) and (not reply.known or reply.session != self.session):
            self._lost_registration("the broker restarted or forgot this peer")

    def _on_ping_timeout(self) -> None:
        self._ping_pending = False
        if not self._broker_down_logged:
            log.warning("broker %s is not answering", self.config.broker)
            self._broker_down_logged = True

    def _lost_registration(self, why: str) -> None:
        if self.registered:
            log.warning("%s: registering again", why)
        self._registered.clear()
        if not self._registering:
            self._send_register(time.monotonic())

    def _send_register(self, now: float) -> None:
        self._registering = True
        self._next_register = now + self.config.broker_timeout_s
        holdings = tuple(Holding(fid, tuple(runs)) for fid, runs in self.store.holdings())
        endpoint = self.serve_endpoint()
        self._request(
            lambda rid: Register(rid, self.config.name, endpoint, holdings),
            self._on_registered,
            self._on_register_timeout,
        )

    def _on_registered(self, reply: Message) -> None:
        self._registering = False
        if not isinstance(reply, Registered):
            log.error("registration refused: %s", getattr(reply, "message", reply))
            self._next_register = time.monotonic() + self.config.broker_timeout_s
            return
        self._registered.set()
        self.session = reply.session
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.heartbeat_liveness = reply.heartbeat_liveness
        if reply.heartbeat_endpoint != self.heartbeat_endpoint and self._pub is not None:
            if self.heartbeat_endpoint is not None:
                self._pub.disconnect(self.heartbeat_endpoint)
            self._pub.connect(reply.heartbeat_endpoint)
            self.heartbeat_endpoint = reply.heartbeat_endpoint
        self._next_heartbeat = 0.0
        log.info("registered with the broker as %s", self.config.name)
        for job in list(self._jobs.values()):
            if job.manifest is None and not job.replanning:
                self._ask_plan(job)

    def _on_register_timeout(self) -> None:
        self._registering = False
        if not self._broker_down_logged:
            log.warning("broker %s did not answer the registration; retrying", self.config.broker)
            self._broker_down_logged = True

    def _send_lost_reports(self) -> None:
        while True:
            try:
                file_id, runs = self.lost_reports.get_nowait()
            except queue.Empty:
                return
            if self.registered:
                self._request(_lost_maker(file_id, tuple(runs)), lambda _: None)

    # ---- commands (run in this thread through call())

    def start_get(
        self, name: str, future: Future[GetResult], timeout_s: float, progress: ProgressFn | None
    ) -> None:
        existing = self._jobs.get(name)
        if existing is not None:
            existing.future.add_done_callback(lambda f: _chain(f, future))
            return
        now = time.monotonic()
        job = _Job(name, future, progress, now, now + timeout_s)
        self._jobs[name] = job
        if self.registered:
            self._ask_plan(job)

    def request_reply(self, make: Callable[[int], Message]) -> Future[Message]:
        """Send one request to the broker; the future gets the reply or BrokerUnavailable."""
        future: Future[Message] = Future()

        def on_reply(reply: Message) -> None:
            if isinstance(reply, Error):
                future.set_exception(RemoteError.from_wire(reply.code, reply.message))
            else:
                future.set_result(reply)

        def on_timeout() -> None:
            future.set_exception(
                BrokerUnavailable(
                    f"broker {self.config.broker} did not answer within {self.config.broker_timeout_s} s"
                )
            )

        self._request(make, on_reply, on_timeout)
        return future

    def list_files(self) -> Future[Message]:
        return self.request_reply(ListFiles)

    def broker_stats(self) -> Future[Message]:
        return self.request_reply(StatsRequest)

    def say_bye(self) -> Future[Message]:
        self._registered.clear()
        return self.request_reply(Bye)

    def rescan(self) -> dict[bytes, int]:
        held = self.store.scan()
        self._send_register(time.monotonic())
        return held

    def status(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "broker": self.config.broker,
            "registered": self.registered,
            "serving": self.serve_endpoint(),
            "downloads": {
                name: {
                    "done": job.download.done if job.download else 0,
                    "segments": job.download.segment_count if job.download else None,
                    "seconds": round(time.monotonic() - job.started, 3),
                }
                for name, job in self._jobs.items()
            },
            "counts": dict(self.counts),
            "loop_errors": self.loop_errors,
        }

    # ---- downloads

    def _ask_plan(self, job: _Job) -> None:
        job.replanning = True
        known = job.manifest.file_id if job.manifest is not None else None
        if known is None:
            cached = self.store.manifest_named(job.name)
            known = cached.file_id if cached is not None else None
        self._request(
            lambda rid: Get(rid, job.name, known),
            lambda reply: self._on_plan(job, reply),
            lambda: self._on_plan_timeout(job),
        )

    def _on_plan_timeout(self, job: _Job) -> None:
        job.replanning = False
        if job.download is None:
            self._fail(
                job,
                BrokerUnavailable(
                    f"broker {self.config.broker} did not answer within {self.config.broker_timeout_s} s"
                ),
            )
        else:
            job.next_replan = time.monotonic() + self.config.replan_interval_s

    def _on_plan(self, job: _Job, reply: Message) -> None:
        job.replanning = False
        if self._jobs.get(job.name) is not job:
            return
        if isinstance(reply, Error):
            if reply.code == WireCode.NOT_REGISTERED:
                return  # re-registration is under way; the plan is asked again once registered
            self._fail(job, RemoteError.from_wire(reply.code, reply.message))
            return
        if not isinstance(reply, FileInfo):
            self._fail(job, MalformedMessage(f"unexpected reply {reply.OP} to get"))
            return
        try:
            manifest = self._manifest_from(job, reply)
        except ZswarmError as exc:
            self._fail(job, exc)
            return
        now = time.monotonic()
        if job.manifest is not None and manifest.file_id != job.manifest.file_id:
            self._fail(job, TransferError(f"{job.name} changed on the broker during the download; retry"))
            return
        if job.download is None and not self._begin(job, manifest, reply):
            return
        assert job.download is not None
        sources = [
            (s.name, s.endpoint, None if s.runs is None else SegmentSet(s.runs)) for s in reply.sources
        ]
        queued_before = job.download.queued()
        job.download.replan(sources, list(reply.plan))
        # A plan that brought work may be followed by the next one at once; one that brought
        # nothing (everything deferred) waits _MIN_REPLAN_GAP_S before asking again.
        job.plan_was_empty = job.download.queued() <= queued_before
        job.origin_lanes = reply.origin_lanes
        job.next_replan = now + self.config.replan_interval_s
        self._check_stuck(job)

    def _manifest_from(self, job: _Job, reply: FileInfo) -> Manifest:
        if reply.digests is None:
            cached = job.manifest or self.store.load_manifest(reply.file_id)
            if cached is None or cached.file_id != reply.file_id:
                raise TransferError("the broker omitted the manifest of a file this peer does not have")
            return cached
        manifest = Manifest(
            name=reply.name, size=reply.size, digests=reply.digests, segment_size=reply.segment_size
        )
        problem = manifest.consistency_error()
        if problem or manifest.file_id != reply.file_id:
            raise IntegrityError(
                f"the broker sent an inconsistent manifest for {job.name}: {problem or 'file_id mismatch'}"
            )
        return manifest

    def _begin(self, job: _Job, manifest: Manifest, reply: FileInfo) -> bool:
        job.manifest = manifest
        try:
            same = self.store.entry(manifest.file_id)
            if same is not None and same.complete and same.path.is_file():
                # Same content already here (perhaps under another name): no transfer needed.
                path = self.store.final_path(manifest)
                if same.manifest.name != manifest.name:
                    path = self.store.copy_complete(same, manifest)
                self._resolve(job, path, ["local"] * manifest.segment_count)
                return False
            held = self.store.begin(manifest)
            job.fd = self.store.open_for_write(manifest.file_id)
        except StorageError as exc:
            self._fail(job, exc)
            return False
        job.download = Download(manifest.segment_count, held, self.config.batch_segments)
        job.last_flush = time.monotonic()
        if held:
            log.info(
                "%s: resuming with %d of %d segments already verified",
                job.name,
                len(held),
                manifest.segment_count,
            )
        return True

    def _check_stuck(self, job: _Job) -> None:
        download = job.download
        if download is None or not download.stuck:
            return
        if job.stuck_replans < 2 and not job.replanning:
            # Sources ran out: a fresh plan may know new holders (or a restarted broker).
            job.stuck_replans += 1
            download.stuck.clear()
            self._ask_plan(job)
            return
        if not job.replanning:
            self._fail(
                job,
                NoSourceLeft(
                    f"{job.name}: {len(download.stuck)} segments have no live source left; retry later"
                ),
            )

    def _tick_job(self, job: _Job, now: float) -> None:
        if now >= job.deadline and not job.future.done():
            self._fail(job, TransferError(f"{job.name}: not finished within the timeout"))
            return
        download = job.download
        if download is None and not self.registered and now - job.started >= self.config.broker_timeout_s:
            self._fail(
                job,
                BrokerUnavailable(
                    f"not registered with the broker {self.config.broker} after "
                    f"{self.config.broker_timeout_s} s: is it running?"
                ),
            )
            return
        if download is None or job.finishing:
            return
        for lane in [ln for lanes in job.lanes.values() for ln in lanes]:
            if lane.request is not None and now >= lane.deadline:
                self._on_lane_timeout(lane)
        if job.unflushed and now - job.last_flush >= self.config.have_flush_interval_s:
            self._flush_have(job, now)
        if download.complete:
            self._finish(job)
            return
        self._check_stuck(job)
        if self._jobs.get(job.name) is not job:
            return
        if not job.replanning and self._wants_plan(job, download, now):
            # Haves first: the broker plans from what it knows this peer holds.
            self._flush_have(job, now)
            self._ask_plan(job)
            job.last_plan_request = now
            job.next_replan = now + self.config.replan_interval_s
        self._pump(job, now)

    def _wants_plan(self, job: _Job, download: Download, now: float) -> bool:
        if job.plan_was_empty and now - job.last_plan_request < _MIN_REPLAN_GAP_S:
            return False
        if now >= job.next_replan and self._leans_on_broker(download):
            return True  # peers may have gained what the broker is serving us
        idle = not download.sources_with_work() and download.pending == 0
        low_water = self.config.batch_segments * self.config.lanes_per_source
        return idle or download.wants_plan(low_water)

    @staticmethod
    def _leans_on_broker(download: Download) -> bool:
        broker = download.sources.get(BROKER)
        return broker is not None and bool(broker.queue)

    def _pump(self, job: _Job, now: float) -> None:
        download = job.download
        assert download is not None
        for source_name in download.sources_with_work():
            source = download.sources[source_name]
            limit = job.origin_lanes if source_name == BROKER else self.config.lanes_per_source
            lanes = job.lanes.setdefault(source_name, [])
            for lane in lanes:
                if lane.request is None and lane.endpoint != source.endpoint:
                    self._close_lane(lane)
                    lane.endpoint = source.endpoint
            while len(lanes) < limit:
                lanes.append(_Lane(job, source_name, source.endpoint))
            for lane in lanes[:limit]:
                if lane.request is not None:
                    continue
                run = download.take(source_name)
                if run is None:
                    break
                self._send_on_lane(job, lane, run, now)
        if download.in_endgame():
            # Stragglers: runs in flight for twice their source's usual reply time (at least a
            # quarter of the request timeout).
            stragglers: list[tuple[str, Run]] = [
                (lane.source, lane.request)
                for lanes in job.lanes.values()
                for lane in lanes
                if lane.request is not None and now - lane.sent_at >= self._patience(lane.endpoint)
            ]
            for source_name, source in download.sources.items() if stragglers else ():
                run = download.take_endgame(source_name, stragglers)
                if run is None:
                    continue
                lanes = job.lanes.setdefault(source_name, [])
                idle = next(
                    (ln for ln in lanes if ln.request is None and ln.endpoint == source.endpoint), None
                )
                if idle is None:
                    idle = _Lane(job, source_name, source.endpoint)
                    lanes.append(idle)
                self._count("endgame_requests")
                self._send_on_lane(job, idle, run, now)

    def _send_on_lane(self, job: _Job, lane: _Lane, run: Run, now: float) -> None:
        assert job.manifest is not None
        if lane.sock is None:
            lane.sock = make_socket(
                self.context,
                zmq.REQ,
                rcvhwm=4,
                sndhwm=4,
                maxmsgsize=self.config.batch_segments * SEGMENT_SIZE + _MAX_REPLY_HEADER,
            )
            lane.sock.connect(lane.endpoint)
            self.poller.register(lane.sock, zmq.POLLIN)
            self._lanes_by_sock[lane.sock] = lane
        lane.request = run
        lane.sent_at = now
        # The origin is the last resort and often the busiest source: giving up on a slow reply
        # only makes it send the same run twice, so it gets four times the floor.
        floor = self.config.request_timeout_s * (_ORIGIN_PATIENCE if lane.source == BROKER else 1)
        times = self._reply_times.get(lane.endpoint)
        lane.deadline = now + (times.timeout(floor) if times else floor)
        try:
            lane.sock.send_multipart(
                protocol.encode(SegmentRequest(job.manifest.file_id, run[0], run[1])), zmq.NOBLOCK
            )
        except zmq.ZMQError:
            pass  # not connected yet and nothing queued: the lane times out and is replaced

    def _patience(self, endpoint: str) -> float:
        times = self._reply_times.get(endpoint)
        return times.patience(self.config.request_timeout_s) if times else self.config.request_timeout_s / 4

    def _close_lane(self, lane: _Lane) -> None:
        if lane.sock is not None:
            self.poller.unregister(lane.sock)
            self._lanes_by_sock.pop(lane.sock, None)
            lane.sock.close(linger=0)
            lane.sock = None

    def _on_lane_timeout(self, lane: _Lane) -> None:
        job, run = lane.job, lane.request
        assert run is not None and job.download is not None
        lane.request = None
        self._close_lane(lane)  # Lazy Pirate: a REQ that lost its reply cannot be reused
        job.download.on_reply(lane.source, run[0], run[1])
        job.download.on_failed(lane.source, run[0], run[1], timed_out=True)
        self._count("lane_timeouts")
        self._bad_log.warning(
            "%s: no reply from %s within %.1f s; asking elsewhere",
            job.name,
            lane.source,
            lane.deadline - lane.sent_at,
        )

    def _on_lane_reply(self, lane: _Lane) -> None:
        job, run, sock = lane.job, lane.request, lane.sock
        assert sock is not None
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        if run is None or job.download is None or job.manifest is None or job.finishing:
            return
        lane.request = None
        self._reply_times.setdefault(lane.endpoint, _ReplyTimes()).sample(time.monotonic() - lane.sent_at)
        download = job.download
        download.on_reply(lane.source, run[0], run[1])
        try:
            reply = protocol.decode(frames, _MAX_REPLY_HEADER, allowed=(SegmentData, Error))
        except MalformedMessage as exc:
            self._bad_log.warning("%s: malformed reply from %s: %s", job.name, lane.source, exc)
            download.on_failed(lane.source, run[0], run[1], timed_out=False)
            self._report_bad(job, lane.source, [run], "malformed reply")
            return
        if isinstance(reply, Error):
            if reply.code == WireCode.NOT_HELD:
                download.on_refused(lane.source, [run])
                self._report_bad(job, lane.source, [run], "refused")
            else:
                download.on_failed(lane.source, run[0], run[1], timed_out=False)
            return
        self._accept_data(job, lane.source, run, cast(SegmentData, reply))

    def _accept_data(self, job: _Job, source: str, run: Run, reply: SegmentData) -> None:
        download, manifest = job.download, job.manifest
        assert download is not None and manifest is not None
        first, count = run
        if (reply.file_id, reply.first, reply.count) != (manifest.file_id, first, count):
            download.on_failed(source, first, count, timed_out=False)
            self._report_bad(job, source, [run], "reply does not match the request")
            return
        missing = SegmentSet(reply.missing)
        if missing and not SegmentSet([run]).covers(*_span(missing)):
            download.on_failed(source, first, count, timed_out=False)
            self._report_bad(job, source, [run], "missing segments outside the request")
            return
        present = SegmentSet([run])
        present.difference_update(missing)
        payload = memoryview(reply.payload)
        expected = sum(manifest.run_length(f, c) for f, c in present.runs())
        if len(payload) != expected:
            download.on_failed(source, first, count, timed_out=False)
            self._report_bad(job, source, [run], "payload length does not match")
            return
        if missing:
            download.on_refused(source, missing.runs())
            self._report_bad(job, source, missing.runs(), "refused")
        offset = 0
        bad: list[Run] = []
        for run_first, run_count in present.runs():
            length = manifest.run_length(run_first, run_count)
            piece = payload[offset : offset + length]
            offset += length
            flags = manifest.verify_run(run_first, piece)
            k = 0
            while k < run_count:
                j = k
                while j < run_count and flags[j] == flags[k]:
                    j += 1
                sub_first, sub_count = run_first + k, j - k
                if flags[k]:
                    for new_first, new_count in download.not_done_runs(sub_first, sub_count):
                        start = (new_first - run_first) * manifest.segment_size
                        data = piece[start : start + manifest.run_length(new_first, new_count)]
                        if not self._write(job, source, new_first, new_count, data):
                            return
                else:
                    download.on_failed(source, sub_first, sub_count, timed_out=False)
                    bad.append((sub_first, sub_count))
                k = j
        if bad:
            self._count("segments_rejected", sum(c for _, c in bad))
            self._bad_log.warning(
                "%s: %d segments from %s failed verification; discarded",
                job.name,
                sum(c for _, c in bad),
                source,
            )
            self._report_bad(job, source, bad, "checksum mismatch")
        self._progress(job, time.monotonic())

    def _write(self, job: _Job, source: str, first: int, count: int, data: memoryview) -> bool:
        """Write verified segments and count them; False when the download failed."""
        download, manifest = job.download, job.manifest
        assert download is not None and manifest is not None
        try:
            self.store.write_run(job.fd, manifest.file_id, first, data)
        except StorageError as exc:
            # Segments written whole before the error are held: announce them.
            for got_first, got_count in self.store.held_copy(manifest.file_id).intersect_run(first, count):
                download.on_done(source, got_first, got_count)
                job.unflushed.add(got_first, got_count)
            self._fail(job, exc)
            return False
        download.on_done(source, first, count)
        job.unflushed.add(first, count)
        job.stuck_replans = 0  # progress: running out of sources later deserves fresh replans
        return True

    def _report_bad(self, job: _Job, source: str, runs: list[Run], reason: str) -> None:
        if source == BROKER or not runs or job.manifest is None or not self.registered:
            return
        file_id = job.manifest.file_id
        self._request(lambda rid: BadSource(rid, file_id, source, tuple(runs), reason), lambda _: None)

    def _flush_have(
        self, job: _Job, now: float, on_ack: Callable[[Message | None], None] | None = None
    ) -> None:
        assert job.manifest is not None
        runs = tuple(job.unflushed.runs())
        job.unflushed = SegmentSet()
        job.last_flush = now
        if not runs and on_ack is None:
            return
        file_id = job.manifest.file_id
        if not self.registered:
            if on_ack is not None:
                on_ack(None)  # the coming registration carries every held segment
            return
        self._request(
            lambda rid: Have(rid, file_id, runs),
            on_ack or (lambda _: None),
            (lambda: on_ack(None)) if on_ack is not None else None,
        )

    def _progress(self, job: _Job, now: float, force: bool = False) -> None:
        if job.progress is None or job.download is None:
            return
        if force or now - job.last_progress >= _PROGRESS_INTERVAL_S:
            job.last_progress = now
            try:
                job.progress(job.download.done, job.download.segment_count)
            except Exception:
                log.exception("progress callback failed")

    def _finish(self, job: _Job) -> None:
        job.finishing = True
        self._close_job_lanes(job)
        self._flush_have(job, time.monotonic(), on_ack=lambda reply: self._finalize(job, reply))

    def _finalize(self, job: _Job, ack: Message | None) -> None:
        if self._jobs.get(job.name) is not job:
            return
        if not isinstance(ack, Ok):
            log.warning(
                "%s: the broker did not confirm the last segments; it learns them at registration", job.name
            )
        assert job.manifest is not None and job.download is not None
        try:
            os.close(job.fd)
            job.fd = -1
            path = self.store.finish(job.manifest.file_id)
        except StorageError as exc:
            self._fail(job, exc)
            return
        self._progress(job, time.monotonic(), force=True)
        self._resolve(job, path, [s or "local" for s in job.download.segment_sources])

    def _resolve(self, job: _Job, path: Path, segment_sources: list[str]) -> None:
        assert job.manifest is not None
        self._drop_job(job)
        counts = dict(Counter(segment_sources))
        result = GetResult(
            name=job.manifest.name,
            path=path,
            size=job.manifest.size,
            file_id=job.manifest.file_id.hex(),
            seconds=time.monotonic() - job.started,
            segment_sources=segment_sources,
            sources=counts,
        )
        log.info("%s: done in %.2f s from %s", job.name, result.seconds, counts)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._drop_job(job)
        log.warning("%s: download failed: %s", job.name, exc)
        if job.unflushed and job.manifest is not None and self.registered:
            self._flush_have(job, time.monotonic())
        if not job.future.done():
            job.future.set_exception(exc)

    def _drop_job(self, job: _Job) -> None:
        if self._jobs.get(job.name) is job:
            del self._jobs[job.name]
        self._close_job_lanes(job)
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1

    def _close_job_lanes(self, job: _Job) -> None:
        for lanes in job.lanes.values():
            for lane in lanes:
                self._close_lane(lane)
        job.lanes.clear()

    def _count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def download_waits(job: _Job) -> bool:
    """Nothing to fetch until the broker plans again (deferred segments only)."""
    d = job.download
    return d is not None and not d.complete and d.pending == 0 and not d.sources_with_work()


def _lost_maker(file_id: bytes, runs: tuple[Run, ...]) -> Callable[[int], Message]:
    return lambda rid: Lost(rid, file_id, runs)


def _span(runs: SegmentSet) -> Run:
    """The smallest single run containing every run of the set."""
    all_runs = runs.runs()
    first = all_runs[0][0]
    return first, all_runs[-1][0] + all_runs[-1][1] - first


def _chain(source: Future[GetResult], target: Future[GetResult]) -> None:
    if target.done():
        return
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


__all__ = ["Agent", "Files", "GetResult", "Stats"]
