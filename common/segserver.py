"""SegmentServer: answers segment requests on a ROUTER that speaks the REQ/REP envelope.

Downloaders use REQ sockets (one request in flight each, several sockets per source); a ROUTER
here answers all of them from one thread, so a slow or vanished downloader never blocks the
others. A request names a run of consecutive segments; the reply carries every segment of the run
that the server holds *and has just verified*, concatenated in one payload frame, and lists the
rest as `missing`. Verification before serving is what keeps a damaged disk from spreading: the
reader (the broker's catalog or a peer's store) hashes every slice it sends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol, cast

import zmq

from common import protocol
from common.errors import MalformedMessage, WireCode
from common.metrics import Metrics, Snapshot
from common.protocol import Error, SegmentData, SegmentRequest
from common.ranges import Run
from common.service import RateLimitedLog, ServiceThread
from common.transport import Transport

log = logging.getLogger(__name__)

MAX_REQUEST_FRAME = 4096  # a segment request header is ~60 bytes
# A request for segments the server is fetching itself (a relay-tree parent) waits at most this
# long for them, then is answered with what is there and `later` for the rest: well inside the
# downloader's shortest timeout (request_timeout_s, 2 s by default).
PARK_MAX_S = 1.0
MAX_PARKED = 4096  # requests waiting at once, all clients together (a few hundred bytes each)
_BATCH = 64  # requests handled per wake-up before polling again


class SourceBusy(Exception):
    """A reader failed for a transient reason (no file descriptor free, no memory): the request
    is answered `busy` and nothing held is dropped."""


class SegmentReader(Protocol):
    def read_run(self, file_id: bytes, first: int, count: int) -> tuple[bytes, list[Run]] | None:
        """(present segments concatenated, missing runs), or None for an unknown file.

        Raises ValueError when the run lies outside the file, SourceBusy on a transient error.
        """

    def fetching(self, file_id: bytes) -> bool:
        """True while this node downloads the file itself: a relay parent, whose children may
        ask for segments before they arrive."""

    def holds(self, file_id: bytes, first: int, count: int) -> bool:
        """True when every segment of the run is held (no disk access)."""


@dataclass
class _Parked:
    envelope: list[bytes]
    request: SegmentRequest
    deadline: float


class SegmentServer(ServiceThread):
    def __init__(
        self,
        name: str,
        transport: Transport,
        reader: SegmentReader,
        host: str,
        port: int,
        upload_limit_bytes_s: float = 0.0,
        port_key: str = "serve_port",
    ) -> None:
        super().__init__(name, transport.context)
        self.transport = transport
        self.reader = reader
        self.host, self.port, self.port_key = host, port, port_key
        # Upload cap (0: none). Replies wait in `_delayed` until the capped link would be free,
        # like a slow uplink; requests keep being read meanwhile.
        self.upload_limit_bytes_s = upload_limit_bytes_s
        self._link_free_at = 0.0
        self._delayed: deque[tuple[float, list[Any]]] = deque()
        # Owned by this thread; others read `published`, a snapshot refreshed after each batch.
        self.metrics = Metrics()
        self._requests = self.metrics.counter("served_requests_total", "segment requests answered")
        self._segments = self.metrics.counter("served_segments_total", "segments served")
        self._bytes = self.metrics.counter("served_bytes_total", "payload bytes served")
        self._refused = self.metrics.counter("refused_requests_total", "requests answered with an error")
        self._malformed = self.metrics.counter("malformed_requests_total", "undecodable segment requests")
        self._parked_gauge = self.metrics.gauge(
            "parked_requests", "requests waiting for segments being fetched"
        )
        self._later = self.metrics.counter(
            "later_segments_total", "segments answered `later` (still being fetched)"
        )
        self.published: Snapshot = self.metrics.snapshot()
        self._dirty = False
        self._parked: dict[bytes, list[_Parked]] = {}
        self._parked_count = 0
        self._held_changed: set[bytes] = set()
        self._held_lock = threading.Lock()
        self._bad_log = RateLimitedLog(log)
        self._sock: zmq.Socket[Any] | None = None

    def setup(self) -> None:
        sock, self.port = self.transport.server(
            zmq.ROUTER,
            self.host,
            self.port,
            self.port_key,
            maxmsgsize=MAX_REQUEST_FRAME,
            router_mandatory=1,
            sndhwm=64,
            rcvhwm=1024,
        )
        self._sock = sock
        self.poller.register(sock, zmq.POLLIN)

    def teardown(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self.published = self.metrics.snapshot()

    def notify_held(self, file_id: bytes) -> None:
        """Segments of this file were just written (any thread): parked requests may be ready."""
        if not self._parked_count:
            return
        with self._held_lock:
            self._held_changed.add(file_id)
        self.wakeup.wake()

    def next_timeout_ms(self, now: float) -> int:
        deadlines = [self._delayed[0][0]] if self._delayed else []
        deadlines += [p.deadline for parked in self._parked.values() for p in parked[:1]]
        if deadlines:
            return max(0, min(1000, int((min(deadlines) - now) * 1000) + 1))
        return 1000

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        sock = self._sock
        if sock is None:
            return
        now = time.monotonic()
        if self._delayed:
            self._send_due(sock, now)
        if self._parked:
            self._release_parked(sock, now)
        if sock in events:
            for _ in range(_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._handle(sock, frames)
        if self._dirty:
            self._dirty = False
            self.published = self.metrics.snapshot()

    def _release_parked(self, sock: zmq.Socket[Any], now: float) -> None:
        """Answer parked requests whose segments arrived, or whose time is up."""
        with self._held_lock:
            changed, self._held_changed = self._held_changed, set()
        for file_id in list(self._parked):
            parked = self._parked[file_id]
            ready = [
                p
                for p in parked
                if p.deadline <= now
                or (file_id in changed and self.reader.holds(file_id, p.request.first, p.request.count))
            ]
            if not ready:
                continue
            for p in ready:
                parked.remove(p)
                self._parked_count -= 1
                reply = self._serve(p.request, may_park=False)
                assert reply is not None  # may_park=False: always an answer
                self._send(sock, p.envelope, reply)
            if not parked:
                del self._parked[file_id]
            self._parked_gauge.set(self._parked_count)
            self._dirty = True

    def _handle(self, sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        # REQ envelope: [routing id, empty delimiter, request frames...]
        self._dirty = True
        if len(frames) < 3 or frames[1] != b"":
            self._malformed.inc()
            return  # not a REQ peer: nothing we can answer
        envelope = frames[:2]
        try:
            request = cast(
                SegmentRequest, protocol.decode(frames[2:], MAX_REQUEST_FRAME, allowed=(SegmentRequest,))
            )
            reply = self._serve(request, may_park=True, envelope=envelope)
        except MalformedMessage as exc:
            self._malformed.inc()
            self._bad_log.warning("%s: malformed segment request: %s", self.name, exc)
            reply = Error(0, WireCode.MALFORMED, str(exc))
        if reply is not None:
            self._send(sock, envelope, reply)

    def _serve(
        self, request: SegmentRequest, may_park: bool, envelope: list[bytes] | None = None
    ) -> SegmentData | Error | None:
        """The reply to a request, or None when it was parked (a relay parent still fetching
        the segments holds the request until they arrive or PARK_MAX_S passes)."""
        file_id = request.file_id
        fetching = self.reader.fetching(file_id)
        if (
            may_park
            and fetching
            and envelope is not None
            and self._parked_count < MAX_PARKED
            and not self.reader.holds(file_id, request.first, request.count)
        ):
            self._parked.setdefault(file_id, []).append(
                _Parked(envelope, request, time.monotonic() + PARK_MAX_S)
            )
            self._parked_count += 1
            self._parked_gauge.set(self._parked_count)
            return None
        self._requests.inc()
        try:
            found = self.reader.read_run(request.file_id, request.first, request.count)
        except ValueError as exc:
            self._refused.inc()
            return Error(0, WireCode.BAD_REQUEST, str(exc))
        except SourceBusy:
            self._refused.inc()
            return Error(0, WireCode.BUSY, "busy; retry")
        except Exception:
            log.exception("%s: reading segments failed", self.name)
            self._refused.inc()
            return Error(0, WireCode.INTERNAL, "read failed")
        if found is None:
            self._refused.inc()
            return Error(0, WireCode.NOT_HELD, "file not held")
        payload, absent = found
        absent_count = sum(c for _, c in absent)
        # Segments a relay parent is still fetching are `later` (ask again), not refused.
        missing, later = ((), tuple(absent)) if fetching else (tuple(absent), ())
        if later:
            self._later.inc(absent_count)
        if absent_count == request.count and not later:
            self._refused.inc()
            return Error(0, WireCode.NOT_HELD, "none of these segments is held")
        self._segments.inc(request.count - absent_count)
        self._bytes.inc(len(payload))
        return SegmentData(request.file_id, request.first, request.count, missing, later, payload=payload)

    def _send(self, sock: zmq.Socket[Any], envelope: list[bytes], reply: SegmentData | Error) -> None:
        frames: list[Any] = [*envelope, *protocol.encode(reply)]
        if self.upload_limit_bytes_s > 0 and isinstance(reply, SegmentData):
            now = time.monotonic()
            send_at = max(now, self._link_free_at)
            self._link_free_at = send_at + len(reply.payload) / self.upload_limit_bytes_s
            if send_at > now or self._delayed:
                self._delayed.append((send_at, frames))
                return
        self._send_frames(sock, frames)

    def _send_due(self, sock: zmq.Socket[Any], now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            self._send_frames(sock, self._delayed.popleft()[1])

    def _send_frames(self, sock: zmq.Socket[Any], frames: list[Any]) -> None:
        try:
            # copy=True: one memcpy of <= 1 MiB is cheaper than zero-copy's buffer-release thread
            # (swarm of 8, 256 MiB: 1.89-2.11 CPU-s/GiB copied against 2.29-3.00 zero-copy).
            sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
        except zmq.ZMQError as exc:
            # The downloader went away or is not reading: it will time out and ask elsewhere.
            self._bad_log.warning("%s: reply dropped: %s", self.name, exc.strerror)

    @property
    def segments_served(self) -> int:
        return int(self.published.get("served_segments_total"))

    def counters(self) -> dict[str, int]:
        snap = self.published
        return {
            "requests": int(snap.get("served_requests_total")),
            "segments_served": int(snap.get("served_segments_total")),
            "bytes_served": int(snap.get("served_bytes_total")),
            "refused": int(snap.get("refused_requests_total")),
            "malformed": int(snap.get("malformed_requests_total")),
        }
