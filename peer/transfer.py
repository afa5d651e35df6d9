"""Transfer: one file's download, as a state machine with no I/O and no clock.

Theory of operation
-------------------
A `Transfer` is fed what happened (a plan arrived, a reply arrived, a write went through, time
passed: every input carries `now`) and answers with commands for its shell (ask for a plan, send
this request, write these verified bytes, announce these segments, give up on that request,
finish the file) and events (completed, failed, a source timed out). It never touches a socket,
a file or the clock, so the same object runs behind real ZeroMQ sockets (peer/agent.py) and in
the in-memory swarm (sim/), and its tests run in microseconds.

    PLANNING --plan--> (Prepare) --prepared--> FETCHING --all written--> FINISHING --ack, moved--> DONE
        |                                          |                          |
        +-------------------- any failure, timeout or cancel -----------------+--> FAILED

PLANNING: it asks the broker for the manifest and a plan (once the broker session is
registered), checks the manifest, and asks the shell to prepare the file (which reports what is
already held: a resumed download). FETCHING: `Download` (peer/download.py) keeps every segment's
state and each source's queue; `tick` sends requests while each source's in-flight limit allows
(see "Scheduling"), times them out (the shell then closes that REQ socket: Lazy Pirate), asks
for fresh plans (when leaning on the origin, when work runs low, when deferred segments wait,
when sources run out) and duplicates stragglers to idle peers in the endgame. A reply is checked
against its request, every segment is verified against the manifest, and the verified parts not
yet written become `Write` commands; a segment counts as done only when the shell reports its
write (`on_written`), so a failed write never leaves a claimed but absent segment. Written
segments are announced to the broker every `have_flush_interval_s` (haves first, then any plan
request, on the same connection, so the broker plans from what it knows). FINISHING: the last
announcement is acknowledged before the shell moves the file to its final name, so when `get`
returns the broker already offers this peer as a source.

Contract with the shell: execute the commands of one call in order, and report the outcome of
every `Write` (`on_written` / `on_write_failed`) before feeding any other input.

Scheduling
----------
Each source's requests in flight and their length follow what it delivers: a source's reply
times and delivery rate are measured (`SourceTiming`, shared by all transfers of a peer), a
request's deadline is the time the bytes ahead of it and its own need at that rate plus the
reply time's variation, never below `request_timeout_s` (the origin gets four times that: it is
the last resort, and asking it twice only doubles its load).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import (
    BrokerUnavailable,
    IntegrityError,
    MalformedMessage,
    NoSourceLeft,
    RemoteError,
    TransferError,
    WireCode,
    ZswarmError,
)
from common.manifest import SEGMENT_SIZE, Manifest
from common.protocol import BadSourceReason as BadReason
from common.protocol import Error, FileInfo, Message, SegmentData
from common.ranges import Run, SegmentSet
from peer.download import BROKER, LOCAL, Download, Request

MIN_REPLAN_GAP_S = 0.02  # deferred segments: ask again at most this often
PLAN_AHEAD_S = 0.25  # deferred segments: ask again while this much work is left at the pace
INITIAL_BATCH_BYTES = 64 * 1024  # a request while a source's rate is unknown (a probe)
LATER_LIMIT_S = 5.0  # segments a relay parent keeps answering `later` for go elsewhere after this
STEAL_BACKLOG_S = 1.0  # a source with more queued than this at its rate gives work to idle ones...
STEAL_FACTOR = 4.0  # ...that deliver this many times faster
FIRST_REPLAN_S = 0.25  # the first plan is followed soon by another: downloaders arrive together
REQUESTS_PER_DOWNLOAD = 100  # see TransferSettings.request_target_s
DELIVERY_SLACK = 3.0  # a request times out after this many times what its bytes should take
MAX_REQUEST_TIMEOUT_S = 60.0
ORIGIN_PATIENCE = 4  # origin requests time out after 4 x request_timeout_s at least
STUCK_REPLANS = 2  # fresh plans asked when sources run out, before giving up
RATE_MEMORY_S = 0.5  # SourceTiming: the delivery rate forgets the past with this time constant


class TransferState(enum.Enum):
    PLANNING = "planning"
    FETCHING = "fetching"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"


class CancelledTransfer(TransferError):
    """The download was cancelled; verified segments are kept for a later resume."""


# --------------------------------------------------------------------------- settings and results


@dataclass(frozen=True, slots=True)
class TransferSettings:
    batch_segments: int = 64
    lanes_per_source: int = 2
    request_timeout_s: float = 2.0
    have_flush_interval_s: float = 0.1
    replan_interval_s: float = 1.0
    timeout_s: float = 3600.0
    broker_timeout_s: float = 5.0
    # A request should take about 1/REQUESTS_PER_DOWNLOAD of what is left of the download at its
    # present pace, between these bounds: short ones keep relay trees and tails tight, long ones
    # keep the cost per byte low (each request costs both ends about a millisecond and a half of
    # CPU: with 200 and 0.05 s, a 20 Mbit/s download made one request per segment or so, and the
    # 16-host benchmark spent 62 CPU-s per GiB against 45 with 100 and 0.1 s).
    request_target_s: float = 0.1
    request_target_max_s: float = 1.0
    queue_target_s: float = (
        0.3  # bytes in flight to a source: about this long at its rate (at least two requests)
    )


@dataclass(frozen=True)
class GetResult:
    """What `Peer.get` returns."""

    name: str
    path: Path
    size: int
    file_id: str  # hex
    seconds: float
    sources: dict[str, int]  # source -> number of segments ("broker", a peer, or "local")
    source_runs: dict[str, list[Run]]  # source -> the runs of segments it delivered
    # source -> why the broker's plans named it (common.protocol.SourceReason: complete, partial,
    # relay, holder, origin); "local" for what was held before, "moved" for work taken from a
    # slower source or an endgame copy
    source_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def segment_sources(self) -> list[str]:
        """For each segment: "broker", the peer it came from, or "local"."""
        out = [LOCAL] * (sum(self.sources.values()))
        for name, runs in self.source_runs.items():
            for first, count in runs:
                out[first : first + count] = [name] * count
        return out


@dataclass(frozen=True, slots=True)
class Progress:
    """One transfer at one moment: what progress subscribers receive."""

    name: str
    state: TransferState
    size: int  # 0 while the manifest is not known
    segments: int
    done: int  # segments verified and written (including those held before)
    bytes_done: int
    seconds: float
    rate_bps: float  # bytes per second over the transfer so far (fetched bytes only)
    sources: dict[str, int]
    in_flight: int
    error: str | None = None

    @property
    def fraction(self) -> float:
        return (
            self.done / self.segments if self.segments else (1.0 if self.state is TransferState.DONE else 0.0)
        )


# --------------------------------------------------------------------------- commands and events


@dataclass(frozen=True, slots=True)
class AskPlan:
    """Send `get` for this transfer's file (the reply comes back through `on_plan`)."""

    name: str
    known_file_id: bytes | None


@dataclass(frozen=True, slots=True)
class Prepare:
    """Open (or resume) the partial file for this manifest; answer with `on_prepared`."""

    manifest: Manifest


@dataclass(frozen=True, slots=True)
class SendRequest:
    request: Request
    endpoint: str
    file_id: bytes


@dataclass(frozen=True, slots=True)
class AbandonRequest:
    """No reply is wanted any more: close the socket carrying it (a REQ that lost its reply
    cannot send again)."""

    request_id: int


@dataclass(frozen=True, slots=True)
class Write:
    source: str
    first: int
    count: int
    data: memoryview


@dataclass(frozen=True, slots=True)
class Announce:
    """Tell the broker these segments are held (`have`). `final`: answer with `on_announced`."""

    file_id: bytes
    runs: tuple[Run, ...]
    final: bool = False


@dataclass(frozen=True, slots=True)
class ReportBad:
    file_id: bytes
    source: str
    runs: tuple[Run, ...]
    reason: BadReason


@dataclass(frozen=True, slots=True)
class Finish:
    """Every segment is written and announced: move the file to its final name; answer with
    `on_finished` or `on_finish_failed`."""

    manifest: Manifest


@dataclass(frozen=True, slots=True)
class Completed:
    result: GetResult


@dataclass(frozen=True, slots=True)
class Failed:
    error: ZswarmError


@dataclass(frozen=True, slots=True)
class RequestTimedOut:
    """An event for the log and the metrics: no reply within the deadline."""

    source: str
    run: Run
    waited_s: float


@dataclass(frozen=True, slots=True)
class BadBytes:
    source: str
    segments: int


Command = (
    AskPlan
    | Prepare
    | SendRequest
    | AbandonRequest
    | Write
    | Announce
    | ReportBad
    | Finish
    | Completed
    | Failed
    | RequestTimedOut
    | BadBytes
)


# --------------------------------------------------------------------------- per-source timing


class SourceTiming:
    """Reply times (RFC 6298 style) and delivery rate of one source, as this peer sees them.

    A loaded but healthy source on a slow link is given the time its queue needs; the floor
    (`request_timeout_s`) keeps a fast source from being judged on a few lucky replies.
    """

    __slots__ = ("_bytes", "_seconds", "last_arrival", "rate_bps", "rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rate_bps: float | None = None
        self.last_arrival = -math.inf
        self._bytes = 0.0  # decayed sums of bytes delivered and of the intervals they took
        self._seconds = 0.0

    def sample(self, seconds: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = seconds, seconds / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - seconds)
            self.srtt = 0.875 * self.srtt + 0.125 * seconds

    def delivered(self, nbytes: int, sent_at: float, now: float) -> None:
        """A reply of `nbytes` arrived: it took the time since the source could have started on
        it (its previous reply, or the request, whichever came later). The rate is the bytes over
        the time of the last RATE_MEMORY_S or so (both sums decay with time), not an average of
        per-reply rates: replies of parallel lanes served side by side arrive together, and the
        second one's interval is a few microseconds; as a rate of its own it would read fifty
        times the link, and such a rate sizes requests to whole blocks that a relay parent is
        still fetching (it answers them only once it holds all of them, or after PARK_MAX_S:
        store and forward instead of cut-through, and its children starve)."""
        interval = max(now - max(sent_at, self.last_arrival), 0.0)
        self.last_arrival = now
        if nbytes <= 0:
            return
        keep = math.exp(-interval / RATE_MEMORY_S)
        self._bytes = keep * self._bytes + nbytes
        self._seconds = keep * self._seconds + interval
        if self._seconds > 0:
            self.rate_bps = self._bytes / self._seconds

    def timeout(self, floor: float) -> float:
        if self.srtt is None:
            return floor
        return min(max(floor, self.srtt + 4 * self.rttvar), MAX_REQUEST_TIMEOUT_S)

    def patience(self, floor: float) -> float:
        """How long a request may take before it counts as a straggler (endgame)."""
        return max(floor / 4, 2 * self.srtt) if self.srtt is not None else floor / 4


# --------------------------------------------------------------------------- the transfer


@dataclass
class _Timers:
    last_flush: float = 0.0
    next_replan: float = 0.0
    last_plan_request: float = 0.0
    retry_plan_at: float = 0.0  # the broker said busy: not before this


@dataclass
class Transfer:
    name: str
    settings: TransferSettings
    started: float
    known_file_id: bytes | None = None  # a manifest this peer has cached for the name
    timings: dict[str, SourceTiming] = field(default_factory=dict)  # by endpoint, shared
    state: TransferState = TransferState.PLANNING
    manifest: Manifest | None = None
    download: Download | None = None
    requests: dict[int, Request] = field(default_factory=dict)  # by id: the same objects as download's
    registered: bool = False
    error: ZswarmError | None = None
    result: GetResult | None = None
    origin_lanes: int = 1
    # The network's round trip from this peer (the session's smallest broker round trip since
    # it registered; the shell keeps it current). Requests last long enough to cover it.
    round_trip_s: float = 0.0
    plan_asked: bool = False  # a `get` is out, its answer not yet in
    plan_was_empty: bool = False
    stuck_replans: int = 0
    bytes_fetched: int = 0
    request_timeouts: int = 0
    endgame_requests: int = 0
    _pending_plan: FileInfo | None = None
    _unflushed: SegmentSet = field(default_factory=SegmentSet)
    _timers: _Timers = field(default_factory=_Timers)
    _next_request_id: int = 1
    _plans_applied: int = 0
    # `tick` has nothing to do until an input arrives or `_due` passes: it returns at once then
    # (the shell ticks every transfer after every input, the in-memory swarm a million times).
    _dirty: bool = True
    _due: float = -math.inf
    _target_s: float = 0.05  # the request target of the moment (see TransferSettings)
    _reasons: dict[str, str] = field(default_factory=dict)  # source -> why the first plan naming it did
    _fetch_started: float = -1.0
    # How a manifest from the wire is built: the in-memory swarm passes a subclass that checks
    # simulated payloads instead of hashing them (everything else is the same code).
    manifest_type: type[Manifest] = Manifest

    # ---- inputs: the broker session

    def set_registered(self, registered: bool, now: float) -> list[Command]:
        self._dirty = True
        self.registered = registered
        return self.tick(now)

    def on_plan(self, reply: Message, cached: Manifest | None, now: float) -> list[Command]:
        """The broker's answer to `get`. `cached`: the manifest this peer holds for the reply's
        file_id, when the broker left the digests out."""
        self._dirty = True
        self.plan_asked = False
        if self.state not in (TransferState.PLANNING, TransferState.FETCHING):
            return []
        if isinstance(reply, Error):
            if reply.code == WireCode.NOT_REGISTERED:
                return []  # re-registration is under way; the plan is asked again once registered
            if reply.code == WireCode.BUSY:
                # The broker is rebuilding this file's manifest: ask again in a moment.
                self._timers.retry_plan_at = now + min(self.settings.replan_interval_s, 0.5)
                return []
            return self._fail(RemoteError.from_wire(reply.code, reply.message))
        if not isinstance(reply, FileInfo):
            return self._fail(MalformedMessage(f"unexpected reply {reply.OP} to get"))
        try:
            manifest = self._manifest_from(reply, cached)
        except ZswarmError as exc:
            return self._fail(exc)
        if self.manifest is not None and manifest.file_id != self.manifest.file_id:
            return self._fail(TransferError(f"{self.name} changed on the broker during the download; retry"))
        self.origin_lanes = reply.origin_lanes
        if self.download is None:
            if self.manifest is None:
                self.manifest = manifest
                self._pending_plan = reply
                return [Prepare(manifest)]
            self._pending_plan = reply  # still preparing: the newest plan wins
            return []
        self._apply_plan(reply, now)
        return self.tick(now)

    def on_plan_timeout(self, now: float) -> list[Command]:
        self._dirty = True
        self.plan_asked = False
        if self.state is TransferState.PLANNING:
            return self._fail(
                BrokerUnavailable(f"the broker did not answer within {self.settings.broker_timeout_s} s")
            )
        self._timers.next_replan = now + self.settings.replan_interval_s
        return []

    # ---- inputs: the store

    def on_prepared(self, held: SegmentSet, now: float) -> list[Command]:
        self._dirty = True
        self._fetch_started = now
        if self.state is not TransferState.PLANNING or self.manifest is None:
            return []
        self.download = Download(self.manifest.segment_count, held, self.settings.batch_segments)
        self.state = TransferState.FETCHING
        self._timers.last_flush = now
        plan, self._pending_plan = self._pending_plan, None
        if plan is not None:
            self._apply_plan(plan, now)
        return self.tick(now)

    def on_prepare_failed(self, error: ZswarmError, now: float) -> list[Command]:
        return self._fail(error)

    def on_written(self, source: str, first: int, count: int) -> None:
        self._dirty = True
        download = self.download
        if download is None:
            return
        download.on_done(source, first, count)
        self._unflushed.add(first, count)
        self.stuck_replans = 0  # progress: running out of sources later deserves fresh replans

    def on_write_failed(self, error: ZswarmError, kept: Sequence[Run], source: str) -> list[Command]:
        """A write failed; `kept`: segments written whole before the error (they are held)."""
        for first, count in kept:
            self.on_written(source, first, count)
        return self._fail(error)

    def on_announced(self, acked: bool, now: float) -> list[Command]:
        """The final `have` was acknowledged (or not: the broker learns it at registration)."""
        if self.state is not TransferState.FINISHING or self.manifest is None:
            return []
        return [Finish(self.manifest)]

    def on_finished(self, path: Path, now: float) -> list[Command]:
        if self.state is not TransferState.FINISHING or self.manifest is None or self.download is None:
            return []
        self.state = TransferState.DONE
        download = self.download
        self.result = GetResult(
            name=self.manifest.name,
            path=path,
            size=self.manifest.size,
            file_id=self.manifest.file_id.hex(),
            seconds=now - self.started,
            sources=download.source_counts(),
            source_runs=download.source_runs(),
            source_reasons={
                name: self._reasons.get(name, "local" if name == LOCAL else "moved")
                for name in download.source_counts()
            },
        )
        return [Completed(self.result)]

    def on_finish_failed(self, error: ZswarmError, now: float) -> list[Command]:
        return self._fail(error)

    # ---- inputs: segment replies

    def on_reply(self, request_id: int, reply: Message | MalformedMessage, now: float) -> list[Command]:
        self._dirty = True
        request = self.requests.pop(request_id, None)
        download, manifest = self.download, self.manifest
        if request is None or download is None or manifest is None:
            return []
        download.end_request(request)
        if self.state is not TransferState.FETCHING:
            return []
        source, run = request.source, request.run
        endpoint = self._endpoint(source)
        timing = self.timings.get(endpoint) if endpoint else None
        if timing is None and endpoint:
            timing = self.timings[endpoint] = SourceTiming()
        if timing is not None:
            timing.sample(now - request.sent_at)
        if isinstance(reply, MalformedMessage):
            download.on_failed(source, *run, timed_out=False)
            return self._bad(source, [run], BadReason.MALFORMED)
        if isinstance(reply, Error):
            if reply.code == WireCode.NOT_HELD:
                download.on_refused(source, [run])
                return self._bad(source, [run], BadReason.REFUSED)
            # busy, internal: the source may serve it later; steer elsewhere, blame nobody.
            download.on_failed(source, *run, timed_out=reply.code in (WireCode.BUSY, WireCode.INTERNAL))
            return []
        if not isinstance(reply, SegmentData):
            download.on_failed(source, *run, timed_out=False)
            return self._bad(source, [run], BadReason.MALFORMED)
        if timing is not None:
            timing.delivered(len(reply.payload), request.sent_at, now)
            self._extend_deadlines(source, timing, now)
        return self._accept(source, request, reply, manifest, download, now)

    def _accept(
        self,
        source: str,
        request: Request,
        reply: SegmentData,
        manifest: Manifest,
        download: Download,
        now: float,
    ) -> list[Command]:
        first, count = request.run
        if (reply.file_id, reply.first, reply.count) != (manifest.file_id, first, count):
            download.on_failed(source, first, count, timed_out=False)
            return self._bad(source, [request.run], BadReason.MISMATCH)
        if not reply.missing and not reply.later:
            # The common case, every segment present: no run arithmetic.
            payload = memoryview(reply.payload)
            if len(payload) != manifest.run_length(first, count):
                download.on_failed(source, first, count, timed_out=False)
                return self._bad(source, [request.run], BadReason.LENGTH)
            return self._verify_and_write(source, [(first, count)], payload, manifest, download, [])
        missing = SegmentSet(reply.missing)
        later = SegmentSet(reply.later)
        absent = missing.copy()
        absent.update(later)
        if absent and (
            not SegmentSet([request.run]).covers(*_span(absent)) or len(absent) != len(missing) + len(later)
        ):
            download.on_failed(source, first, count, timed_out=False)
            return self._bad(source, [request.run], BadReason.MISMATCH)
        present = SegmentSet([request.run])
        present.difference_update(absent)
        payload = memoryview(reply.payload)
        if len(payload) != sum(manifest.run_length(f, c) for f, c in present.runs()):
            download.on_failed(source, first, count, timed_out=False)
            return self._bad(source, [request.run], BadReason.LENGTH)
        commands: list[Command] = []
        if later:
            # A relay parent still fetching them: ask it again (or, asked under an older plan,
            # leave them to the next one), nobody is to blame.
            download.on_later(source, later.runs(), now, LATER_LIMIT_S, asked_under=request.plan)
        if missing:
            download.on_refused(source, missing.runs())
            commands += self._bad(source, missing.runs(), BadReason.REFUSED)
        return self._verify_and_write(source, present.runs(), payload, manifest, download, commands)

    def _verify_and_write(
        self,
        source: str,
        runs: list[Run],
        payload: memoryview,
        manifest: Manifest,
        download: Download,
        commands: list[Command],
    ) -> list[Command]:
        offset = 0
        bad: list[Run] = []
        for run_first, run_count in runs:
            length = manifest.run_length(run_first, run_count)
            piece = payload[offset : offset + length]
            offset += length
            good, failed = manifest.split_verified(run_first, run_count, piece)
            for sub_first, sub_count in failed:
                download.on_failed(source, sub_first, sub_count, timed_out=False)
                bad.append((sub_first, sub_count))
            for sub_first, sub_count in good:
                for new_first, new_count in download.not_done_runs(sub_first, sub_count):
                    start = (new_first - run_first) * manifest.segment_size
                    data = piece[start : start + manifest.run_length(new_first, new_count)]
                    self.bytes_fetched += len(data)
                    commands.append(Write(source, new_first, new_count, data))
        if bad:
            commands.append(BadBytes(source, sum(c for _, c in bad)))
            commands += self._bad(source, bad, BadReason.CHECKSUM)
        return commands

    # ---- inputs: time, and the user

    def tick(self, now: float) -> list[Command]:
        """Advance: overall deadline, request timeouts, haves, completion, plans, sending."""
        if not self._dirty and now < self._due:
            return []
        commands = self._tick(now)
        self._dirty = False
        self._due = self._next_deadline(now) or math.inf
        return commands

    def _tick(self, now: float) -> list[Command]:
        self._target_s = self._request_target(now)
        state = self.state
        if state in (TransferState.DONE, TransferState.FAILED, TransferState.FINISHING):
            return []
        if now - self.started >= self.settings.timeout_s:
            return self._fail(
                TransferError(f"{self.name}: not finished within {self.settings.timeout_s:g} s")
            )
        if state is TransferState.PLANNING:
            if self.manifest is not None:
                return []  # preparing
            if not self.registered:
                if now - self.started >= self.settings.broker_timeout_s:
                    return self._fail(
                        BrokerUnavailable(
                            f"not registered with the broker after {self.settings.broker_timeout_s:g} s: "
                            "is it running?"
                        )
                    )
                return []
            if not self.plan_asked and now >= self._timers.retry_plan_at:
                return self._ask_plan(now)
            return []
        download = self.download
        assert download is not None
        commands: list[Command] = []
        for request in [r for r in self.requests.values() if r.deadline <= now]:
            commands += self._time_out(request, now)
        settings = self.settings
        if self._unflushed and now - self._timers.last_flush >= settings.have_flush_interval_s:
            commands += self._flush(now)
        if download.complete:
            return commands + self._finish(now)
        if download.stuck:
            commands += self._check_stuck(now)
            if self.state is not TransferState.FETCHING:
                return commands
        if self.registered and not self.plan_asked and self._wants_plan(download, now):
            commands += self._flush(now) + self._ask_plan(now)
            self._timers.next_replan = now + settings.replan_interval_s
        commands += self._pump(download, now)
        return commands

    def cancel(self, now: float) -> list[Command]:
        """Stop: give up every request, announce what is written, keep it for a resume."""
        return self.abort(CancelledTransfer(f"{self.name}: cancelled"), now)

    def abort(self, error: ZswarmError, now: float) -> list[Command]:
        """Fail with this error (the peer is closing, the user cancelled)."""
        if self.state in (TransferState.DONE, TransferState.FAILED):
            return []
        return self._fail(error)

    def next_deadline(self, now: float) -> float | None:
        """When `tick` must run next at the latest (None: only inputs matter). Deadlines already
        past were acted on by the last tick, or need no action yet (a replan held back by its
        minimum gap, a straggler with no idle peer to copy it to): they do not count."""
        if not self._dirty:
            return self._due if self._due > now and self._due != math.inf else None
        return self._next_deadline(now)

    def _next_deadline(self, now: float) -> float | None:
        state = self.state
        if state in (TransferState.DONE, TransferState.FAILED, TransferState.FINISHING):
            return None
        deadlines = [self.started + self.settings.timeout_s]
        if state is TransferState.PLANNING:
            if self.manifest is None and not self.registered:
                deadlines.append(self.started + self.settings.broker_timeout_s)
            if self.manifest is None and self.registered and not self.plan_asked:
                deadlines.append(self._timers.retry_plan_at)
            return _upcoming(deadlines, now)
        download = self.download
        assert download is not None
        if self.requests:
            deadlines.append(min(r.deadline for r in self.requests.values()))
            if download.in_endgame():
                deadlines.append(min(r.sent_at + self._patience(r.source) for r in self.requests.values()))
        if self._unflushed:
            deadlines.append(self._timers.last_flush + self.settings.have_flush_interval_s)
        if not self.plan_asked:
            deadlines.append(self._timers.next_replan)
            if self._waits_for_plan(download):
                deadlines.append(self._timers.last_plan_request + MIN_REPLAN_GAP_S)
        return _upcoming(deadlines, now)

    def progress(self, now: float) -> Progress:
        manifest, download = self.manifest, self.download
        seconds = self.result.seconds if self.result is not None else now - self.started
        done = download.done if download is not None else 0
        if manifest is None:
            size = segments = bytes_done = 0
        else:
            size, segments = manifest.size, manifest.segment_count
            bytes_done = min(size, done * manifest.segment_size) if done < segments else size
        return Progress(
            name=self.name,
            state=self.state,
            size=size,
            segments=segments,
            done=done,
            bytes_done=bytes_done,
            seconds=seconds,
            rate_bps=self.bytes_fetched / seconds if seconds > 0 else 0.0,
            sources=download.source_counts() if download is not None else {},
            in_flight=len(self.requests),
            error=str(self.error) if self.error is not None else None,
        )

    # ---- plans

    def _ask_plan(self, now: float) -> list[Command]:
        self.plan_asked = True
        self._timers.last_plan_request = now
        known = self.manifest.file_id if self.manifest is not None else self.known_file_id
        return [AskPlan(self.name, known)]

    def _manifest_from(self, reply: FileInfo, cached: Manifest | None) -> Manifest:
        if reply.digests is None:
            have = self.manifest if self.manifest is not None else cached
            if have is None or have.file_id != reply.file_id:
                raise TransferError("the broker omitted the manifest of a file this peer does not have")
            return have
        manifest = self.manifest_type(
            name=reply.name, size=reply.size, digests=reply.digests, segment_size=reply.segment_size
        )
        problem = manifest.consistency_error()
        if problem or manifest.file_id != reply.file_id:
            raise IntegrityError(
                f"the broker sent an inconsistent manifest for {self.name}: {problem or 'file_id mismatch'}"
            )
        return manifest

    def _apply_plan(self, reply: FileInfo, now: float) -> None:
        download = self.download
        assert download is not None
        sources = [
            (s.name, s.endpoint, None if s.runs is None else SegmentSet(s.runs)) for s in reply.sources
        ]
        for source in reply.sources:
            self._reasons.setdefault(source.name, str(source.why))
        queued_before = download.queued()
        download.replan(sources, list(reply.plan))
        # A plan that brought work may be followed by the next one at once; one that brought
        # nothing (everything deferred) waits MIN_REPLAN_GAP_S before asking again.
        self.plan_was_empty = download.queued() <= queued_before
        first = self._plans_applied == 0
        self._plans_applied += 1
        self._timers.next_replan = now + (
            min(FIRST_REPLAN_S, self.settings.replan_interval_s) if first else self.settings.replan_interval_s
        )

    def _wants_plan(self, download: Download, now: float) -> bool:
        if self.plan_was_empty and now - self._timers.last_plan_request < MIN_REPLAN_GAP_S:
            return False
        if now >= self._timers.next_replan:
            # Peers may have gained what the broker is serving us, and relay trees change as
            # downloaders come and go.
            return True
        if download.pending == 0 and not download.has_work():
            return True  # idle
        if not download.deferred():
            return False
        # Deferred segments (a plan covers a window of a big file): ask again while PLAN_AHEAD_S
        # of work is left at the present pace, so the next plan is here before the work runs out.
        low_water = max(
            self.settings.batch_segments * self.settings.lanes_per_source,
            int(self._pace(download) * PLAN_AHEAD_S) // self._segment_bytes,
        )
        return download.wants_plan(low_water)

    @staticmethod
    def _leans_on_broker(download: Download) -> bool:
        broker = download.sources.get(BROKER)
        return broker is not None and bool(broker.queue)

    @staticmethod
    def _waits_for_plan(download: Download) -> bool:
        """Nothing to fetch until the broker plans again (deferred segments only)."""
        return not download.complete and download.pending == 0 and not download.has_work()

    def _check_stuck(self, now: float) -> list[Command]:
        download = self.download
        assert download is not None
        if self.plan_asked:
            return []
        if self.stuck_replans < STUCK_REPLANS and self.registered:
            # Sources ran out: a fresh plan may know new holders (or a restarted broker).
            self.stuck_replans += 1
            download.stuck.clear()
            return self._ask_plan(now)
        if self.stuck_replans < STUCK_REPLANS:
            return []  # not registered: the plan is asked once the session is back
        return self._fail(
            NoSourceLeft(f"{self.name}: {len(download.stuck)} segments have no live source left; retry later")
        )

    # ---- sending

    def _endpoint(self, source: str) -> str | None:
        download = self.download
        state = download.sources.get(source) if download is not None else None
        return state.endpoint if state is not None else None

    def _pump(self, download: Download, now: float) -> list[Command]:
        assert self.manifest is not None
        file_id = self.manifest.file_id
        commands: list[Command] = []
        self._steal(download)
        most_peer, most_origin = self.settings.lanes_per_source, self.origin_lanes
        for source_name, source in download.sources.items():
            if not source.queue or source.dead:
                continue
            if source.in_flight >= (most_origin if source_name == BROKER else most_peer):
                continue  # full whatever its rate: skip the arithmetic
            timing = self.timings.get(source.endpoint)
            lanes, batch = self._limits(source_name, timing)
            while source.in_flight < lanes:
                if download.take(source_name, batch) is None:
                    break
                commands.append(self._send(download, source.endpoint, now, file_id, timing))
        if download.in_endgame():
            # Stragglers: runs in flight for twice their source's usual reply time (at least a
            # quarter of the request timeout).
            stragglers = [
                (r.source, r.run)
                for r in self.requests.values()
                if now - r.sent_at >= self._patience(r.source)
            ]
            for source_name, source in list(download.sources.items()) if stragglers else ():
                if download.take_endgame(source_name, stragglers) is None:
                    continue
                self.endgame_requests += 1
                commands.append(
                    self._send(download, source.endpoint, now, file_id, self.timings.get(source.endpoint))
                )
        return commands

    def _pace(self, download: Download) -> float:
        """Bytes per second now: the measured rates of the sources in use, added up."""
        pace = 0.0
        for source in download.sources.values():
            if source.queue or source.requests:
                timing = self.timings.get(source.endpoint)
                if timing is not None and timing.rate_bps:
                    pace += timing.rate_bps
        return pace

    @property
    def _segment_bytes(self) -> int:
        # 16 KiB on the wire (protocol 1); the simulator's coarse mode uses larger segments.
        return self.manifest.segment_size if self.manifest is not None else SEGMENT_SIZE

    def _request_target(self, now: float) -> float:
        """The request duration of the moment: what is left at the present pace (the measured
        rates of the sources in use, added up) over REQUESTS_PER_DOWNLOAD, within the bounds."""
        settings, download = self.settings, self.download
        if download is None:
            return settings.request_target_s
        pace = self._pace(download)
        if not pace:
            return settings.request_target_s
        left_s = (download.segment_count - download.done) * self._segment_bytes / pace
        return min(
            max(left_s / REQUESTS_PER_DOWNLOAD, settings.request_target_s), settings.request_target_max_s
        )

    def _steal(self, download: Download) -> None:
        """Work stealing: a peer with room for requests and nothing queued takes queued work it
        holds from a source far slower than itself (its measured rate STEAL_FACTOR times
        lower) whose backlog is more than STEAL_BACKLOG_S at that rate. So one slow source
        costs little and never holds up the tail. Sources of similar speed keep their work:
        in a relay tree, a parent with nothing queued for this download is still busy relaying
        to others, and loading it more would slow its own children."""
        sources = download.sources
        # Cheap test first: this runs at every tick, and most ticks have no idle source.
        if not any(not src.queue and name != BROKER and not src.dead for name, src in sources.items()):
            return
        rates: dict[str, float] = {}
        for name, src in sources.items():
            timing = self.timings.get(src.endpoint)
            if timing is not None and timing.rate_bps:
                rates[name] = timing.rate_bps
        victims: list[tuple[float, str]] = []
        for name, src in sources.items():
            if src.queue and not src.dead and name in rates:
                pending = sum(r.nbytes for r in src.requests)
                backlog_s = (src.queued_count * self._segment_bytes + pending) / rates[name]
                if backlog_s > STEAL_BACKLOG_S:
                    victims.append((rates[name], name))
        if not victims:
            return
        victims.sort()  # the slowest first
        for thief, src in sources.items():
            if thief == BROKER or src.dead or src.queue or thief not in rates:
                continue
            lanes, batch = self._limits(thief, self.timings.get(src.endpoint))
            if src.in_flight >= lanes:
                continue
            slower = [name for rate, name in victims if rate * STEAL_FACTOR < rates[thief] and name != thief]
            if slower:
                download.steal(thief, slower, lanes * batch)

    def _limits(self, source: str, timing: SourceTiming | None) -> tuple[int, int]:
        """(requests in flight, segments per request) for a source, from its delivery rate: a
        request takes about `request_target_s` and the bytes in flight about `queue_target_s` of it,
        so a slow or crowded source is never promised more than it can deliver soon, and work
        not yet asked for stays free to go to whichever source frees up first."""
        most = self.origin_lanes if source == BROKER else self.settings.lanes_per_source
        batch_max = self.settings.batch_segments
        rate = timing.rate_bps if timing is not None else None
        segment = self._segment_bytes
        if rate is None:  # probe: the rate is unknown
            return min(most, 2), max(1, min(INITIAL_BATCH_BYTES // segment, batch_max))
        # With `lanes` requests of duration d in flight on a path of round trip r, a source
        # delivers lanes x (1 - r / d) of its rate at most: requests last twice the round trip
        # at least, or a long path starves them (the rate they measure shrinks them further:
        # at 100 ms, downloads on 100 Mbit/s links settled at one 16 KiB segment per request
        # and 2.5 Mbit/s). Not a source's own reply times: they hold its queue and the relay
        # parent's wait for what it is fetching, which call for shorter requests, not longer.
        round_trip = self.round_trip_s
        target = max(self._target_s, 2 * round_trip)
        batch = max(1, min(batch_max, int(rate * target) // segment))
        queue_s = max(self.settings.queue_target_s, 2 * target) + round_trip
        lanes = max(1, min(most, math.ceil(rate * queue_s / (batch * segment))))
        return lanes, batch

    def _send(
        self, download: Download, endpoint: str, now: float, file_id: bytes, timing: SourceTiming | None
    ) -> SendRequest:
        request = download.last_request
        assert request is not None and self.manifest is not None
        request.id = self._next_request_id
        self._next_request_id += 1
        request.sent_at = now
        request.nbytes = self.manifest.run_length(request.first, request.count)
        source = download.sources[request.source]
        ahead = sum(r.nbytes for r in source.requests)  # this one included: it was just added
        request.deadline = now + self._timeout_for(request.source, timing, ahead)
        self.requests[request.id] = request
        return SendRequest(request, endpoint, file_id)

    def _timeout_for(self, source: str, timing: SourceTiming | None, nbytes: int) -> float:
        """How long `nbytes` (a request and those queued before it) may take from this source:
        the time its measured rate needs, with room for its variation, never below the floor.
        The origin is the last resort and often the busiest source: giving up on a slow reply
        only makes it send the same run twice, so its floor is four times the peers'."""
        floor = self.settings.request_timeout_s * (ORIGIN_PATIENCE if source == BROKER else 1)
        if timing is None:
            return floor
        timeout = timing.timeout(floor)
        if timing.rate_bps:
            timeout = max(timeout, DELIVERY_SLACK * nbytes / timing.rate_bps)
        return min(timeout, MAX_REQUEST_TIMEOUT_S)

    def _extend_deadlines(self, source: str, timing: SourceTiming, now: float) -> None:
        """A reply came from `source`: it is alive and delivering. Requests still queued there
        get the time their bytes need from now, so a busy but healthy source is never mistaken
        for a dead one (only a source that stops delivering times out)."""
        download = self.download
        state = download.sources.get(source) if download is not None else None
        if state is None:
            return
        ahead = 0
        for request in state.requests:
            ahead += request.nbytes
            request.deadline = max(request.deadline, now + self._timeout_for(source, timing, ahead))

    def _patience(self, source: str) -> float:
        endpoint = self._endpoint(source)
        timing = self.timings.get(endpoint) if endpoint else None
        floor = self.settings.request_timeout_s
        return timing.patience(floor) if timing is not None else floor / 4

    def _time_out(self, request: Request, now: float) -> list[Command]:
        download = self.download
        assert download is not None
        del self.requests[request.id]
        download.end_request(request)
        download.on_failed(request.source, *request.run, timed_out=True)
        self.request_timeouts += 1
        return [
            AbandonRequest(request.id),
            RequestTimedOut(request.source, request.run, now - request.sent_at),
        ]

    # ---- announcing, finishing, failing

    def _flush(self, now: float, final: bool = False) -> list[Command]:
        self._timers.last_flush = now
        runs = tuple(self._unflushed.runs())
        self._unflushed = SegmentSet()
        if (not runs and not final) or self.manifest is None:
            return []
        return [Announce(self.manifest.file_id, runs, final)]

    def _finish(self, now: float) -> list[Command]:
        self.state = TransferState.FINISHING
        commands = self._abandon_all()
        return commands + self._flush(now, final=True)

    def _abandon_all(self) -> list[Command]:
        download = self.download
        commands: list[Command] = []
        for request in list(self.requests.values()):
            if download is not None:
                download.end_request(request)
            commands.append(AbandonRequest(request.id))
        self.requests.clear()
        return commands

    def _fail(self, error: ZswarmError) -> list[Command]:
        if self.state in (TransferState.DONE, TransferState.FAILED):
            return []
        self.state = TransferState.FAILED
        self.error = error
        commands = self._abandon_all()
        runs = tuple(self._unflushed.runs())
        self._unflushed = SegmentSet()
        if runs and self.manifest is not None:
            commands.append(Announce(self.manifest.file_id, runs))
        commands.append(Failed(error))
        return commands

    def _bad(self, source: str, runs: list[Run], reason: BadReason) -> list[Command]:
        if source == BROKER or not runs or self.manifest is None:
            return []
        return [ReportBad(self.manifest.file_id, source, tuple(runs), reason)]


def _upcoming(deadlines: list[float], now: float) -> float | None:
    upcoming = [d for d in deadlines if d > now]
    return min(upcoming) if upcoming else None


def _span(runs: SegmentSet) -> Run:
    """The smallest single run containing every run of the set."""
    all_runs = runs.runs()
    first = all_runs[0][0]
    return first, all_runs[-1][0] + all_runs[-1][1] - first
