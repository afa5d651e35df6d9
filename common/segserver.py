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
import time
from collections import deque
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
_BATCH = 64  # requests handled per wake-up before polling again


class SourceBusy(Exception):
    """A reader failed for a transient reason (no file descriptor free, no memory): the request
    is answered `busy` and nothing held is dropped."""


class SegmentReader(Protocol):
    def read_run(self, file_id: bytes, first: int, count: int) -> tuple[bytes, list[Run]] | None:
        """(present segments concatenated, missing runs), or None for an unknown file.

        Raises ValueError when the run lies outside the file.
        """


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
        self.published: Snapshot = self.metrics.snapshot()
        self._dirty = False
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

    def next_timeout_ms(self, now: float) -> int:
        if self._delayed:
            return max(0, min(1000, int((self._delayed[0][0] - now) * 1000) + 1))
        return 1000

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        sock = self._sock
        if sock is None:
            return
        if self._delayed:
            self._send_due(sock, time.monotonic())
        if sock not in events:
            return
        for _ in range(_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._handle(sock, frames)
        if self._dirty:
            self._dirty = False
            self.published = self.metrics.snapshot()

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
            reply = self._serve(request)
        except MalformedMessage as exc:
            self._malformed.inc()
            self._bad_log.warning("%s: malformed segment request: %s", self.name, exc)
            reply = Error(0, WireCode.MALFORMED, str(exc))
        self._send(sock, envelope, reply)

    def _serve(self, request: SegmentRequest) -> SegmentData | Error:
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
        payload, missing = found
        missing_count = sum(c for _, c in missing)
        if missing_count == request.count:
            self._refused.inc()
            return Error(0, WireCode.NOT_HELD, "none of these segments is held")
        self._segments.inc(request.count - missing_count)
        self._bytes.inc(len(payload))
        return SegmentData(request.file_id, request.first, request.count, tuple(missing), payload=payload)

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
