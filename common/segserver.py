"""SegmentServer: answers segment requests on a ROUTER that speaks the REQ/REP envelope.

Downloaders use REQ sockets (one request in flight each, several sockets per source); a ROUTER
here answers all of them from one thread, so a slow or vanished downloader never blocks the
others. A request names a run of consecutive segments; the reply carries every segment of the run
that the server holds *and has just verified*, concatenated in one payload frame, and lists the
rest as `missing`. Verification before serving is what keeps a damaged disk from spreading: the
reader (the broker's catalog or a peer's store) hashes every slice it sends.

Clients and their bounds
------------------------
Requests come from *clients*: the CURVE key of the connection in authenticated mode, else the
connection's IP address (ZeroMQ's Peer-Address), so that many connections from one host are one
client. What a client can make this server hold is bounded, in bytes and in requests:

- *Reply bytes.* A reply of 64 KiB or more is handed to libzmq without a copy and tracked until
  libzmq has written it out (`ReplyBudget`); a client's tracked bytes stay under CLIENT_REPLY_BYTES
  and everyone's under TOTAL_REPLY_BYTES, and a client has at most CLIENT_WINDOW replies in
  libzmq at once. libzmq's high-water mark counts messages (64 x 16 MiB would be 1 GiB per
  connection): these bound bytes, whatever the number of connections.
- *Waiting requests.* A request that cannot be served at once (its client is at its bounds, the
  upload limiter's link is busy, or a relay parent is still fetching the segments) waits as a
  request, a few hundred bytes, never as a reply: segments are read and verified when the reply
  can go. At most CLIENT_WAITING per client and MAX_WAITING in all; beyond that the answer is an
  `error` `busy` at once (retry later or elsewhere; nobody is blamed).
- *Fair share.* Waiting requests are served round-robin over clients, so eight lanes from one
  client get the same share of the upload as one lane from another (with an upload limit, the
  link is shared exactly; without one, the per-client window keeps a greedy client from filling
  libzmq's queues ahead of the others).

A client that never reads its replies thus holds at most CLIENT_REPLY_BYTES of this process's
memory, and gets `busy` for the rest.
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
from common.manifest import SEGMENT_SIZE
from common.metrics import Metrics, Snapshot
from common.protocol import Error, SegmentData, SegmentRequest
from common.ranges import Run
from common.service import RateLimitedLog, ServiceThread
from common.transport import ReplyBudget, Transport, client_identity

log = logging.getLogger(__name__)

MAX_REQUEST_FRAME = 4096  # a segment request header is ~60 bytes
# A request for segments the server is fetching itself (a relay-tree parent) waits at most this
# long for them, then is answered with what is there and `later` for the rest: well inside the
# downloader's shortest timeout (request_timeout_s, 2 s by default).
PARK_MAX_S = 1.0
MAX_PARKED = 4096  # kept for compatibility: parked requests count as waiting (MAX_WAITING)
MAX_WAITING = 4096  # requests waiting at once (parked or queued), all clients together
CLIENT_WAITING = 64  # ... per client
CLIENT_REPLY_BYTES = 32 * 1024 * 1024  # reply bytes in libzmq's queues per client
TOTAL_REPLY_BYTES = 256 * 1024 * 1024  # ... all clients together
CLIENT_WINDOW = 4  # replies in libzmq's queues per client
# While a client waits for its replies to drain, look this often; twice as long after each look
# that served nothing, up to BUDGET_POLL_MAX_S. libzmq does not say when a reply has left, so
# this is polled: at a steady 2 ms a relay on a 20 Mbit/s uplink woke 500 times a second to
# find, most times, nothing drained. A client held back still has its window of replies
# queued (CLIENT_WINDOW, a link period or more each), so looking later does not idle its link.
BUDGET_POLL_S = 0.002
BUDGET_POLL_MAX_S = 0.032
QUEUE_MAX_S = 10.0  # a request waiting longer is answered busy (its downloader gave up long ago)
SNDHWM = 16  # messages per connection: bytes are bounded by the budget, not by this
_BATCH = 64  # requests handled per wake-up before polling again
SERVED_MEMORY = 4096  # clients whose last service is remembered for the turn order


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

    def expecting(self, file_id: bytes) -> bool:
        """True when a file this node does not know may be one it is about to fetch: a get of
        its own has not learnt its manifest yet (a relay parent whose plan is on its way)."""


@dataclass
class _Waiting:
    client: str
    envelope: list[bytes]
    request: SegmentRequest
    deadline: float  # parked: answer by then with what is there
    arrived: float = 0.0


@dataclass
class _Paced:
    """A reply held on a capped link until `leaves_at`."""

    leaves_at: float
    client: str
    envelope: list[bytes]
    reply: SegmentData


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
        # Upload cap (0: none). Requests wait until the capped link would be free, like a slow
        # uplink, served round-robin over clients; requests keep being read meanwhile. A reply
        # leaves when its last byte would have crossed that link, never before: a downloader
        # then measures the link's rate from its first reply, as it would on a real slow uplink
        # (sent at once and paid for afterwards, a first reply looked as fast as loopback).
        self.upload_limit_bytes_s = upload_limit_bytes_s
        self._link_free_at = 0.0
        self._paced: deque[_Paced] = deque()  # replies on the capped link, oldest first
        self.budget = ReplyBudget(CLIENT_REPLY_BYTES, TOTAL_REPLY_BYTES, CLIENT_WINDOW)
        # Owned by this thread; others read `published`, a snapshot refreshed after each batch.
        self.metrics = Metrics()
        self._requests = self.metrics.counter("served_requests_total", "segment requests answered")
        self._segments = self.metrics.counter("served_segments_total", "segments served")
        self._bytes = self.metrics.counter("served_bytes_total", "payload bytes served")
        self._refused = self.metrics.counter("refused_requests_total", "requests answered with an error")
        self._malformed = self.metrics.counter("malformed_requests_total", "undecodable segment requests")
        self._busy = self.metrics.counter(
            "busy_requests_total", "requests answered busy: their client was at its bounds"
        )
        self._parked_gauge = self.metrics.gauge(
            "parked_requests", "requests waiting for segments being fetched"
        )
        self._waiting_gauge = self.metrics.gauge(
            "waiting_requests", "requests waiting for the link or for their client's replies to drain"
        )
        self._outstanding_gauge = self.metrics.gauge(
            "outstanding_reply_bytes", "reply bytes handed to libzmq and not yet written out"
        )
        self._later = self.metrics.counter(
            "later_segments_total", "segments answered `later` (still being fetched)"
        )
        self.published: Snapshot = self.metrics.snapshot()
        self._dirty = False
        self._parked: dict[bytes, list[_Waiting]] = {}
        self._parked_count = 0
        # Requests waiting to be served, per client, and the clients with any, in serving order.
        self._queues: dict[str, deque[_Waiting]] = {}
        self._turn: deque[str] = deque()
        self._queued_count = 0
        self._per_client: dict[str, int] = {}  # waiting requests (queued and parked) per client
        # When each client was last served (a serving sequence number), for the turn order.
        self._served_seq: dict[str, int] = {}
        self._seq = 0
        self._budget_poll_s = BUDGET_POLL_S
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
            sndhwm=SNDHWM,
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

    # ---- the loop

    def next_timeout_ms(self, now: float) -> int:
        deadlines = [p.deadline for parked in self._parked.values() for p in parked[:1]]
        if self._paced:
            deadlines.append(self._paced[0].leaves_at)
        if self._queued_count:
            if self.upload_limit_bytes_s > 0 and self._link_free_at > now:
                deadlines.append(self._link_free_at)
            else:
                deadlines.append(now + self._budget_poll_s)  # waiting for replies to drain
        if self.budget.tracked:
            deadlines.append(now + 0.1)  # drained replies free their client's budget
        if deadlines:
            return max(0, min(1000, int((min(deadlines) - now) * 1000) + 1))
        return 1000

    def run_once(self, timeout_ms: int) -> None:
        events = dict(self.poller.poll(timeout_ms))
        sock = self._sock
        if sock is None:
            return
        now = time.monotonic()
        if self._paced:
            self._send_paced(sock, now)
        if self._parked:
            self._release_parked(sock, now)
        if self._queued_count:
            served = self._seq
            self._pump(sock, now)
            if self._seq != served or not self._queued_count:
                self._budget_poll_s = BUDGET_POLL_S
            else:
                self._budget_poll_s = min(2 * self._budget_poll_s, BUDGET_POLL_MAX_S)
        if sock in events:
            for _ in range(_BATCH):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(sock, frames)
        if self.budget.tracked:
            self.budget.prune_all()
            self._outstanding_gauge.set(self.budget.total)
            self._dirty = True
        if self._dirty:
            self._dirty = False
            self._waiting_gauge.set(self._queued_count)
            self.published = self.metrics.snapshot()

    def _release_parked(self, sock: zmq.Socket[Any], now: float) -> None:
        """Parked requests whose segments arrived, or whose time is up, are queued to be served."""
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
                self._enqueue(p, fresh=False)  # served as it is then: never parked again
            if not parked:
                del self._parked[file_id]
            self._parked_gauge.set(self._parked_count)
            self._dirty = True
        if self._queued_count:
            self._pump(sock, now)

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        # REQ envelope: [routing id, empty delimiter, request frames...]
        self._dirty = True
        if len(frames) < 3 or frames[1].bytes != b"":
            self._malformed.inc()
            return  # not a REQ peer: nothing we can answer
        envelope = [frames[0].bytes, b""]
        try:
            request = cast(
                SegmentRequest, protocol.decode(frames[2:], MAX_REQUEST_FRAME, allowed=(SegmentRequest,))
            )
        except MalformedMessage as exc:
            self._malformed.inc()
            self._bad_log.warning("%s: malformed segment request: %s", self.name, exc)
            self._send(sock, "", envelope, Error(0, WireCode.MALFORMED, str(exc)))
            return
        client = client_identity(frames[0], self.transport.secure)
        waiting = self._per_client.get(client, 0)
        if waiting >= CLIENT_WAITING or self._queued_count + self._parked_count >= MAX_WAITING:
            self._busy.inc()
            self._refused.inc()
            self._send(sock, client, envelope, Error(0, WireCode.BUSY, "too many requests waiting; retry"))
            return
        item = _Waiting(client, envelope, request, 0.0, time.monotonic())
        if self._may_park(request):
            item.deadline = time.monotonic() + PARK_MAX_S
            self._parked.setdefault(request.file_id, []).append(item)
            self._parked_count += 1
            self._per_client[client] = waiting + 1
            self._parked_gauge.set(self._parked_count)
            return
        now = time.monotonic()
        if not waiting and self._may_serve(client, request, now):
            self._serve_and_send(sock, item, now, counted=False)
            return
        self._enqueue(item, fresh=True)

    def _may_park(self, request: SegmentRequest) -> bool:
        file_id = request.file_id
        if self.reader.fetching(file_id):
            return not self.reader.holds(file_id, request.first, request.count)
        # Children whose plans came first ask a relay parent whose own plan is still on its way:
        # refused, their requests went to the origin, 767 refusals in the first 0.7 s of a
        # 16-host run. Parked, they are served as the parent's segments arrive.
        return self.reader.expecting(file_id)

    def _enqueue(self, item: _Waiting, fresh: bool) -> None:
        """Queue a request to be served in its client's turn; `fresh`: not counted yet (a
        parked request was counted when it was parked)."""
        queue = self._queues.get(item.client)
        if queue is None:
            queue = self._queues[item.client] = deque()
            # Least recently served first. A client with one request in flight sends the next
            # only once its reply is back; on a capped link that is when the link frees, so
            # queued at the back it would wait behind a pipelining client every other turn.
            served = self._served_seq.get(item.client, -1)
            turn = self._turn
            place = next(
                (i for i, other in enumerate(turn) if self._served_seq.get(other, -1) > served), len(turn)
            )
            turn.insert(place, item.client)
        queue.append(item)
        self._queued_count += 1
        if fresh:
            self._per_client[item.client] = self._per_client.get(item.client, 0) + 1

    def _may_serve(self, client: str, request: SegmentRequest, now: float) -> bool:
        if self.upload_limit_bytes_s > 0 and self._link_free_at > now:
            return False
        return self.budget.allows(client, request.count * SEGMENT_SIZE)

    def _pump(self, sock: zmq.Socket[Any], now: float) -> None:
        """Serve waiting requests, one per client in turn, while the link and budgets allow."""
        self._expire_queued(sock, now)
        blocked = 0
        while self._turn and blocked < len(self._turn):
            if self.upload_limit_bytes_s > 0 and self._link_free_at > now:
                return
            client = self._turn[0]
            queue = self._queues[client]
            item = queue[0]
            if not self.budget.allows(client, item.request.count * SEGMENT_SIZE):
                self._turn.rotate(-1)  # this client's replies have not drained yet
                blocked += 1
                continue
            blocked = 0
            queue.popleft()
            self._queued_count -= 1
            self._turn.popleft()
            if queue:
                self._turn.append(client)
            else:
                del self._queues[client]
            self._serve_and_send(sock, item, now, counted=True)
            now = time.monotonic()

    def _expire_queued(self, sock: zmq.Socket[Any], now: float) -> None:
        """Answer `busy` to requests that waited QUEUE_MAX_S (a client whose replies never drain:
        it does not read), so that nothing waits for ever."""
        for client in list(self._turn):
            queue = self._queues[client]
            while queue and now - queue[0].arrived > QUEUE_MAX_S:
                item = queue.popleft()
                self._queued_count -= 1
                self._release_count(item.client)
                self._busy.inc()
                self._refused.inc()
                self._send(sock, client, item.envelope, Error(0, WireCode.BUSY, "waited too long; retry"))
            if not queue:
                del self._queues[client]
                self._turn.remove(client)

    def _release_count(self, client: str) -> None:
        left = self._per_client.get(client, 1) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)

    def _serve_and_send(self, sock: zmq.Socket[Any], item: _Waiting, now: float, counted: bool) -> None:
        if counted:
            self._release_count(item.client)
        self._dirty = True
        self._note_served(item.client)
        if self.upload_limit_bytes_s > 0:
            self._serve_paced(sock, item, now)
            return
        # The routing id goes first: if the client is gone (EHOSTUNREACH) or not reading (its
        # queue is full: EAGAIN), nothing is read from disk for it. Once that frame is queued,
        # the rest of the message is too (a ROUTER queues whole messages).
        try:
            sock.send(item.envelope[0], zmq.SNDMORE | zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self._bad_log.warning("%s: reply dropped before reading: %s", self.name, exc.strerror)
            return
        self._send(sock, item.client, item.envelope[1:], self._serve(item.request))

    def _note_served(self, client: str) -> None:
        self._seq += 1
        served = self._served_seq
        served[client] = self._seq
        if len(served) > SERVED_MEMORY:  # bounded: forget the clients served longest ago
            for name in sorted(served, key=served.__getitem__)[: len(served) - SERVED_MEMORY // 2]:
                del served[name]

    def _serve_paced(self, sock: zmq.Socket[Any], item: _Waiting, now: float) -> None:
        """On a capped link: read the reply now and hold it until its bytes would have crossed
        the link (an error, carrying no payload, leaves at once). The link is free again then,
        so at most one reply per link period is held: memory stays one reply's worth."""
        reply = self._serve(item.request)
        if not isinstance(reply, SegmentData) or not reply.payload:
            self._send(sock, item.client, item.envelope, reply)
            return
        size = len(reply.payload)
        start = max(now, self._link_free_at)
        self._link_free_at = start + size / self.upload_limit_bytes_s
        self._paced.append(_Paced(self._link_free_at, item.client, item.envelope, reply))

    def _send_paced(self, sock: zmq.Socket[Any], now: float) -> None:
        while self._paced and self._paced[0].leaves_at <= now:
            paced = self._paced.popleft()
            self._send(sock, paced.client, paced.envelope, paced.reply)
            self._dirty = True

    def _serve(self, request: SegmentRequest) -> SegmentData | Error:
        file_id = request.file_id
        fetching = self.reader.fetching(file_id)
        self._requests.inc()
        try:
            found = self.reader.read_run(request.file_id, request.first, request.count)
        except ValueError as exc:
            self._refused.inc()
            return Error(0, WireCode.BAD_REQUEST, str(exc))
        except SourceBusy:
            self._refused.inc()
            self._busy.inc()
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

    def _send(
        self, sock: zmq.Socket[Any], client: str, envelope: list[bytes], reply: SegmentData | Error
    ) -> None:
        frames: list[Any] = [*envelope, *protocol.encode(reply)]
        size = len(reply.payload) if isinstance(reply, SegmentData) else 0
        try:
            self.budget.send(sock, frames, client, size)
        except zmq.ZMQError as exc:
            # The downloader went away or is not reading: it will time out and ask elsewhere.
            self._bad_log.warning("%s: reply dropped: %s", self.name, exc.strerror)

    # ---- figures

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
            "busy": int(snap.get("busy_requests_total")),
            "waiting": int(snap.get("waiting_requests")),
            "outstanding_bytes": int(snap.get("outstanding_reply_bytes")),
        }
