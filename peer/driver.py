"""PeerDriver: carries out what a peer's cores decide, whatever carries the bytes.

The broker session (peer/session.py) and each file's transfer (peer/transfer.py) return commands;
this class routes them: session commands to the tracker connection, a plan's answer to its
transfer, a transfer's requests, writes and announcements to the I/O below. It holds the jobs (a
transfer with its waiters and its progress subscription), the per-source timings every transfer
shares, and the peer's metrics. It does no I/O itself: a subclass provides the `io_*` methods.
The real peer's agent (peer/agent.py) provides them with ZeroMQ sockets and the disk store; the
in-memory swarm (sim/) with simulated links and an in-memory store. So both run the same policy.

Contract for subclasses: `io_write`, `io_prepare` and `io_finish` return the commands that their
outcome produced (the transfer's answer to `on_written`, `on_prepared`, `on_finished`...); those
run next, before any other input.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common.errors import BrokerUnavailable, RemoteError, ZswarmError
from common.manifest import Manifest
from common.metrics import Metrics
from common.protocol import MAX_REQUEST_RUNS, BadSource, Error, FileInfo, Get, Have, Lost, Message, Ok, Source
from common.ranges import Run
from common.service import RateLimitedLog
from common.subscription import Subscription
from peer.session import (
    BrokerSession,
    BrokerSilent,
    ConnectHeartbeat,
    Delivered,
    Left,
    PublishHeartbeat,
    Recheck,
    RegistrationChanged,
    SendRegister,
    SendTracker,
    SessionCommand,
)
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
    TransferState,
    Write,
)

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.1
ANNOUNCE_RUNS = MAX_REQUEST_RUNS // 4  # runs per `have` when announcing what is held again


class PeerMetrics:
    """The metrics the driver updates (the segment server has its own: each thread owns what it
    updates)."""

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
        """Snapshots of the download's progress (the newest unread one); ends when it ends."""
        return self._progress

    def cancel(self) -> bool:
        cancelled = super().cancel()
        if cancelled:
            self._on_cancel()
        return cancelled

    def __await__(self) -> Any:
        return asyncio.wrap_future(self).__await__()


@dataclass(eq=False)
class Job:
    """A transfer with the futures waiting for it and its progress subscription; `io` is for
    the subclass's per-job resources (a file descriptor, sockets)."""

    transfer: Transfer
    futures: list[GetFuture]
    progress: Subscription[Progress]
    last_published: float = 0.0
    io: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Plan:
    job: Job


@dataclass(frozen=True, slots=True)
class _Announced:
    job: Job
    final: bool


@dataclass(frozen=True, slots=True)
class _Call:
    future: Future[Message]


def _have(command: Announce, rid: int) -> Message:
    return Have(rid, command.file_id, command.runs)


def _have_runs(file_id: bytes, runs: tuple[Run, ...], rid: int) -> Message:
    return Have(rid, file_id, runs)


def _get(command: AskPlan, rid: int) -> Message:
    return Get(rid, command.name, command.known_file_id)


def _bad_source(command: ReportBad, rid: int) -> Message:
    return BadSource(rid, command.file_id, command.source, command.runs, str(command.reason))


class PeerDriver:
    def __init__(
        self,
        name: str,
        settings: TransferSettings,
        metrics: Metrics,
        now: float,
        manifest_type: type[Manifest] = Manifest,
    ) -> None:
        self.peer_name = name
        self.manifest_type = manifest_type
        self.settings = settings
        self.metrics = metrics
        self.m = PeerMetrics(metrics)
        self.session = BrokerSession(settings.broker_timeout_s, now)
        self.timings: dict[str, SourceTiming] = {}  # by endpoint, shared by every transfer
        self.jobs: dict[str, Job] = {}
        self.publish_progress = True  # the in-memory swarm has no readers: it turns this off
        self._bad_log = RateLimitedLog(log)

    # ---- I/O, provided by a subclass

    def io_send_tracker(self, message: Message) -> None:
        raise NotImplementedError

    def io_send_register(self, rid: int) -> None:
        raise NotImplementedError

    def io_publish_heartbeat(self) -> None:
        raise NotImplementedError

    def io_connect_heartbeat(self, endpoint: str) -> None:
        raise NotImplementedError

    def io_send_request(self, job: Job, command: SendRequest) -> None:
        raise NotImplementedError

    def io_abandon_request(self, job: Job, request_id: int) -> None:
        raise NotImplementedError

    def io_write(self, job: Job, command: Write, now: float) -> list[Command]:
        raise NotImplementedError

    def io_prepare(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        raise NotImplementedError

    def io_finish(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        raise NotImplementedError

    def io_load_manifest(self, file_id: bytes) -> Manifest | None:
        raise NotImplementedError

    def io_cached_manifest(self, name: str) -> Manifest | None:
        raise NotImplementedError

    def io_job_started(self, job: Job) -> None:
        """A get began (its manifest may not be known yet)."""

    def io_job_ended(self, job: Job) -> None:
        """Release the job's I/O resources (its open requests, its file)."""

    def io_held_runs(self, file_id: bytes) -> list[Run]:
        """The verified segments held of a file (for announcing them again)."""
        return []

    def io_recheck(self, file_ids: tuple[bytes, ...], now: float) -> None:
        """The broker asks: re-verify these files and announce what is held. The default
        announces what the store says it holds (a subclass verifies first)."""
        for file_id in file_ids:
            self.announce_held(file_id, self.io_held_runs(file_id), now)

    def on_sources(self, sources: tuple[Source, ...]) -> None:
        """A plan named these sources (their endpoints and, authenticated, their keys)."""

    def on_registration_event(self, change: RegistrationChanged) -> None:
        """A subclass's hook (the agent sets an event API threads wait on)."""

    def on_left(self) -> None:
        """A subclass's hook: `bye` was answered or timed out."""

    # ---- inputs

    def on_tracker_reply(self, reply: Message, now: float) -> None:
        self.apply_session(self.session.on_reply(reply, now), now)
        round_trip = self.session.round_trip_s
        for job in self.jobs.values():
            job.transfer.round_trip_s = round_trip

    def on_segment_reply(self, job: Job, request_id: int, reply: Message | Exception, now: float) -> None:
        if self.jobs.get(job.transfer.name) is not job:
            return
        request = job.transfer.requests.get(request_id)
        if request is not None:
            self.m.reply_seconds.observe(now - request.sent_at)
        self.run(job, job.transfer.on_reply(request_id, reply, now), now)  # type: ignore[arg-type]

    def tick(self, now: float) -> None:
        """Timers: the session's, every transfer's, and progress publication."""
        self.apply_session(self.session.tick(now), now)
        for job in list(self.jobs.values()):
            self.run(job, job.transfer.tick(now), now)
            if (
                self.publish_progress
                and job.transfer.download is not None
                and now - job.last_published >= PROGRESS_INTERVAL_S
            ):
                self.publish(job, now)

    def next_deadline(self, now: float) -> float | None:
        """The nearest deadline ahead of `now` among the session's and every transfer's."""
        deadlines = [d for d in (self.session.next_deadline(now),) if d is not None]
        for job in self.jobs.values():
            deadline = job.transfer.next_deadline(now)
            if deadline is not None:
                deadlines.append(deadline)
            if self.publish_progress and job.transfer.download is not None:
                deadlines.append(job.last_published + PROGRESS_INTERVAL_S)
        upcoming = [d for d in deadlines if d > now]
        return min(upcoming) if upcoming else None

    # ---- the broker session

    def apply_session(self, commands: Iterable[SessionCommand], now: float) -> None:
        for command in commands:
            if isinstance(command, SendTracker):
                self.m.tracker_requests.inc()
                self.io_send_tracker(command.message)
            elif isinstance(command, Delivered):
                self.deliver(command.token, command.reply, now)
            elif isinstance(command, PublishHeartbeat):
                self.io_publish_heartbeat()
            elif isinstance(command, SendRegister):
                self.m.tracker_requests.inc()
                self.io_send_register(command.rid)
            elif isinstance(command, ConnectHeartbeat):
                self.io_connect_heartbeat(command.endpoint)
            elif isinstance(command, RegistrationChanged):
                self._on_registration(command, now)
            elif isinstance(command, BrokerSilent):
                self._bad_log.warning("the broker is not answering (%s)", command.what)
            elif isinstance(command, Left):
                self.on_left()
            elif isinstance(command, Recheck):
                self.io_recheck(command.file_ids, now)

    def _on_registration(self, change: RegistrationChanged, now: float) -> None:
        if change.registered:
            log.info("registered with the broker as %s", self.peer_name)
        elif "refused" in change.why:
            self._bad_log.warning("%s", change.why)
        elif change.why != "registering again":
            log.warning("%s: registering again", change.why)
        self.on_registration_event(change)
        for job in list(self.jobs.values()):
            self.run(job, job.transfer.set_registered(change.registered, now), now)

    def request(self, make: Callable[[int], Message], token: Any, now: float) -> None:
        self.apply_session(self.session.request(make, token, now), now)

    def deliver(self, token: Any, reply: Message | None, now: float) -> None:
        if isinstance(token, _Plan):
            job = token.job
            if self.jobs.get(job.transfer.name) is not job:
                return
            if reply is None:
                self.run(job, job.transfer.on_plan_timeout(now), now)
            else:
                if isinstance(reply, FileInfo):
                    self.on_sources(reply.sources)
                cached = None
                file_id = getattr(reply, "file_id", None)
                if getattr(reply, "digests", b"") is None and file_id is not None:
                    cached = self.io_load_manifest(file_id)
                self.run(job, job.transfer.on_plan(reply, cached, now), now)
        elif isinstance(token, _Announced):
            job = token.job
            if token.final and self.jobs.get(job.transfer.name) is job:
                if not isinstance(reply, Ok):
                    log.warning(
                        "%s: the broker did not confirm the last segments; it learns them at registration",
                        job.transfer.name,
                    )
                self.run(job, job.transfer.on_announced(isinstance(reply, Ok), now), now)
        elif isinstance(token, _Call):
            future = token.future
            if future.done():
                return
            if reply is None:
                future.set_exception(
                    BrokerUnavailable(f"the broker did not answer within {self.settings.broker_timeout_s} s")
                )
            elif isinstance(reply, Error):
                future.set_exception(RemoteError.from_wire(reply.code, reply.message))
            else:
                future.set_result(reply)

    def announce_held(self, file_id: bytes, runs: list[Run], now: float) -> None:
        """Tell the broker again what is held of a file (`have`, in requests of at most
        ANNOUNCE_RUNS runs, ~180 KB: well inside the tracker's inbound budget per connection):
        after a refusal reported against this peer, or what did not fit in `register`. Nothing
        while not registered: the next registration carries it."""
        if not self.session.registered or not runs:
            return
        for start in range(0, len(runs), ANNOUNCE_RUNS):
            part = tuple(runs[start : start + ANNOUNCE_RUNS])
            self.request(partial(_have_runs, file_id, part), None, now)

    def report_lost(self, file_id: bytes, runs: list[Run], now: float) -> None:
        if self.session.registered:
            self.request(lambda rid: Lost(rid, file_id, tuple(runs)), None, now)

    # ---- transfers: carrying out the core's commands

    def run(self, job: Job, commands: Iterable[Command], now: float) -> None:
        todo: deque[Command] = deque(commands)
        transfer = job.transfer
        while todo:
            command = todo.popleft()
            if isinstance(command, SendRequest):
                self.m.requests_sent.inc(labels=(command.request.source,))
                if command.request.duplicate:
                    self.m.endgame_requests.inc()
                self.io_send_request(job, command)
            elif isinstance(command, Write):
                written = self.io_write(job, command, now)
                if not written:
                    self.m.segments_received.inc(command.count, labels=(command.source,))
                    self.m.bytes_received.inc(len(command.data))
                todo.extend(written)
            elif isinstance(command, AbandonRequest):
                self.io_abandon_request(job, command.request_id)
            elif isinstance(command, Announce):
                if self.session.registered:
                    self.request(partial(_have, command), _Announced(job, command.final), now)
                elif command.final:
                    todo.extend(transfer.on_announced(False, now))  # registration carries it
            elif isinstance(command, AskPlan):
                self.request(partial(_get, command), _Plan(job), now)
            elif isinstance(command, ReportBad):
                if self.session.registered:
                    self.request(partial(_bad_source, command), None, now)
            elif isinstance(command, Prepare):
                todo.extend(self.io_prepare(job, command.manifest, now))
            elif isinstance(command, Finish):
                todo.extend(self.io_finish(job, command.manifest, now))
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

    def _complete(self, job: Job, result: GetResult, now: float) -> None:
        self._drop(job)
        self.m.downloads_done.inc()
        log.info("%s: done in %.2f s from %s", job.transfer.name, result.seconds, result.sources)
        job.progress.close(job.transfer.progress(now))
        for future in job.futures:
            if not future.done():
                future.set_result(result)

    def _fail_job(self, job: Job, error: ZswarmError, now: float) -> None:
        self._drop(job)
        self.m.downloads_failed.inc()
        job.progress.close(job.transfer.progress(now))
        if isinstance(error, CancelledTransfer):
            log.info("%s: cancelled; the verified segments are kept for a resume", job.transfer.name)
        else:
            log.warning("%s: download failed: %s", job.transfer.name, error)
        for future in job.futures:
            if future.done():
                continue
            if isinstance(error, CancelledTransfer):
                future.cancel()
            else:
                future.set_exception(error)

    def _drop(self, job: Job) -> None:
        if self.jobs.get(job.transfer.name) is job:
            del self.jobs[job.transfer.name]
        self.m.downloads_active.set(len(self.jobs))
        self.io_job_ended(job)

    def publish(self, job: Job, now: float) -> None:
        job.last_published = now
        job.progress.publish(job.transfer.progress(now))

    # ---- commands

    def start_get(self, name: str, timeout_s: float, on_cancel: Callable[[], None], now: float) -> GetFuture:
        existing = self.jobs.get(name)
        if existing is not None:
            future = GetFuture(existing.progress, on_cancel)
            existing.futures.append(future)
            return future
        cached = self.io_cached_manifest(name)
        if not self.jobs:
            # Timings say how each source delivers within the downloads under way (its load, and
            # whether it is a relay parent still fetching); with none under way they describe a
            # swarm that is gone, and requests sized from them start the next file wrong:
            # simulated, 16 peers on 100 Mbit/s uplinks, a second 32 MiB file took 1.38x the
            # bound against the first's 1.23x, 1.26x when measured anew.
            self.timings.clear()
        transfer = Transfer(
            name=name,
            settings=dataclasses.replace(self.settings, timeout_s=timeout_s),
            started=now,
            known_file_id=cached.file_id if cached is not None else None,
            timings=self.timings,
            registered=self.session.registered,
            round_trip_s=self.session.round_trip_s,
            manifest_type=self.manifest_type,
        )
        progress: Subscription[Progress] = Subscription()
        future = GetFuture(progress, on_cancel)
        job = Job(transfer, [future], progress)
        self.jobs[name] = job
        self.m.downloads_active.set(len(self.jobs))
        self.io_job_started(job)
        self.run(job, transfer.tick(now), now)
        return future

    def cancel_get(self, name: str, now: float) -> None:
        job = self.jobs.get(name)
        if job is None:
            return
        if all(f.cancelled() for f in job.futures):  # others still waiting keep it going
            self.run(job, job.transfer.cancel(now), now)

    def abort_all(self, error: ZswarmError, now: float) -> None:
        for job in list(self.jobs.values()):
            self.run(job, job.transfer.abort(error, now), now)

    def request_reply(self, make: Callable[[int], Message], now: float) -> Future[Message]:
        """Send one request to the broker; the future gets the reply or BrokerUnavailable."""
        future: Future[Message] = Future()
        self.request(make, _Call(future), now)
        return future

    def downloads(self, now: float) -> dict[str, dict[str, Any]]:
        return {
            name: {
                "state": job.transfer.state.value,
                "done": job.transfer.download.done if job.transfer.download else 0,
                "segments": job.transfer.download.segment_count if job.transfer.download else None,
                "seconds": round(now - job.transfer.started, 3),
                "in_flight": len(job.transfer.requests),
            }
            for name, job in self.jobs.items()
            if job.transfer.state is not TransferState.DONE
        }
