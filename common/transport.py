"""Transport: the one place where a node's ZeroMQ sockets are made, bound and connected.

Every socket of a broker or a peer comes from its node's `Transport`: it owns the node's private
context (never `zmq.Context.instance()`, which Jupyter's kernel shares), sets linger 0 on every
socket so that nothing blocks shutdown, applies the options each role needs, turns bind failures
into one-line `ConfigError`s that name the config key and the port, and ends the context with a
bound on the wait. Security (CURVE keys, the ZAP authenticator) is switched on here, for every
socket at once, so no role can forget it: with a `TransportSecurity`, every server socket is a
CURVE server whose clients the node's one `Authenticator` checks against the allow-list, and every
client socket a CURVE client of the key it is given (the broker's, by default).

Server sockets also get what untrusted clients call for: a short handshake deadline (a connection
that never finishes its greeting is dropped after HANDSHAKE_MS), ZMTP heartbeats (a dead or
silent connection is dropped after HEARTBEAT_TIMEOUT_MS), and TCP keepalive. `ReplyBudget` bounds
the reply bytes a client can leave in libzmq's queues (high-water marks count messages, not
bytes); `client_identity` names the client a received frame came from.

Connections. libzmq accepts every TCP connection and buffers what it sends with no limit but a
frame's size (MAXMSGSIZE): a multipart message that never ends grows in its queues with every
byte sent, and the application cannot see it (an incomplete message is invisible until its last
frame). So every server socket is watched (`ConnectionWatch`, one thread per node, through
libzmq's socket monitor): connections open are a metric (`open_connections{socket}`), a socket
past its share of the file-descriptor limit (`max_connections`) drops new connections, and a
connection that sends more bytes than its socket's inbound budget allows (a token bucket over
the kernel's per-connection byte count, TCP_INFO) is cut (`shutdown()`: libzmq then closes it and
frees what it buffered; `trim_memory` hands that back to the kernel). A zswarm client sends
little to a server (requests of tens of bytes, heartbeats, a register of at most 1 MiB), so the
budgets cost legitimate clients nothing.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from common.errors import ConfigError
from common.metrics import Metrics, Snapshot
from common.security import (
    AllowList,
    Authenticator,
    KeyPair,
    apply_client,
    apply_server,
    load_public,
    load_secret,
    peer_identity,
)
from common.service import trim_memory
from common.threads import worker_thread

log = logging.getLogger(__name__)


HANDSHAKE_MS = 5000  # a connection must finish its ZMTP (and CURVE) handshake within this
HEARTBEAT_IVL_MS = 5000  # server sockets ping every connection this often...
HEARTBEAT_TIMEOUT_MS = 20000  # ...and drop one that sent nothing (not even a pong) for this long
TRACK_FROM_BYTES = 64 * 1024  # replies this big are sent without a copy and tracked
CHECK_S = 0.25  # how often the watcher reads every connection's byte count...
# ...and how often it looks at the process's memory: a jump means "check now". Each wake-up of
# a thread costs ~0.13 ms of CPU on the development VM: at 100 Hz the watch alone kept an idle
# node at ~2.5% of a core (every peer of a swarm pays it); at 50 Hz a flood buffers about twice
# as much before its cut (tests/test_hostile.py: still well inside the bound).
PROBE_S = 0.02
PROBE_JUMP_BYTES = 8 * 1024 * 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_statm: tuple[int, int] | None = None  # (pid, fd of /proc/<pid>/statm), opened once per process


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there). The file stays open and is
    re-read with pread: the connection watch reads it 50 times a second, and an open() and
    close() each time cost as much as the rest of its wake-up."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():  # a forked child reads its own
            _statm = (os.getpid(), os.open(f"/proc/{os.getpid()}/statm", os.O_RDONLY | os.O_CLOEXEC))
        return int(os.pread(_statm[1], 128, 0).split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


_TCP_INFO_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received in Linux's struct tcp_info


@dataclass(frozen=True)
class InboundLimits:
    """What one connection to a server socket may send: `burst` bytes at once, `rate` bytes/s
    sustained (a token bucket); past it the connection is cut."""

    burst: int
    rate: float


# Per kind of server: a downloader's lane sends ~60-byte requests, one per reply of 16 KiB or
# more; a peer's tracker connection sends small requests and now and then a register (<= 1 MiB)
# or a big have (<= 768 KiB); a heartbeat publisher, one ~80-byte beat a second.
SEGMENT_INBOUND = InboundLimits(burst=256 * 1024, rate=128 * 1024)
TRACKER_INBOUND = InboundLimits(burst=1536 * 1024, rate=1024 * 1024)
HEARTBEAT_INBOUND = InboundLimits(burst=64 * 1024, rate=8 * 1024)


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass(frozen=True)
class TransportSecurity:
    """A node's CURVE material: its keys, the allow-list its servers accept clients from (None
    for a node with no server sockets), and the public key (Z85) its clients connect to unless
    told another (a peer: the broker's)."""

    keys: KeyPair
    allow_list: AllowList | None = None
    server_key: bytes | None = None


def security_from_config(config: Any) -> TransportSecurity | None:
    """The CURVE material a node's config names (None when it names none): `secret_key_file`
    (required), `allow_dir` (a node with server sockets), `broker_public_key_file` (a peer)."""
    secret_file = getattr(config, "secret_key_file", None)
    if not secret_file:
        return None
    keys = load_secret(secret_file)
    allow_dir = getattr(config, "allow_dir", None)
    broker_key_file = getattr(config, "broker_public_key_file", None)
    return TransportSecurity(
        keys,
        AllowList(allow_dir) if allow_dir else None,
        load_public(broker_key_file) if broker_key_file else None,
    )


def client_identity(frame: zmq.Frame, secure: bool) -> str:
    """Who sent a frame received with copy=False: `key:<Z85>` (the CURVE key ZAP vouched for) in
    authenticated mode, else `ip:<address>` (every connection from one host is one client)."""
    if secure:
        user = peer_identity(frame)
        if user:
            return f"key:{user}"
    try:
        address = frame.get("Peer-Address")
    except zmq.ZMQError:
        return ""
    return f"ip:{address}" if address else ""


class ReplyBudget:
    """Reply bytes each client has in libzmq's queues, not yet written out to its connection.

    A reply of TRACK_FROM_BYTES or more is sent without a copy and tracked (libzmq tells when it
    has written it out); smaller ones are copied and not counted (the socket's high-water mark
    bounds how many wait). `allows` says whether one more reply of a size fits the client's share
    (`per_client` bytes, `window` replies) and everyone's (`total` bytes); a client with nothing
    queued always gets one reply if the total allows it."""

    def __init__(self, per_client: int, total: int, window: int = 0) -> None:
        self.per_client, self.total_cap, self.window = per_client, total, window
        self._items: dict[str, list[tuple[zmq.MessageTracker, int]]] = {}
        self._bytes: dict[str, int] = {}
        self.total = 0

    @property
    def tracked(self) -> int:
        """Clients with replies still queued."""
        return len(self._items)

    def outstanding(self, client: str) -> int:
        self._prune(client)
        return self._bytes.get(client, 0)

    def _prune(self, client: str) -> None:
        items = self._items.get(client)
        if not items:
            return
        keep = [item for item in items if not item[0].done]
        if len(keep) == len(items):
            return
        freed = sum(n for t, n in items if t.done)
        self.total -= freed
        if keep:
            self._items[client] = keep
            self._bytes[client] -= freed
        else:
            del self._items[client]
            del self._bytes[client]

    def prune_all(self) -> None:
        for client in list(self._items):
            self._prune(client)

    def allows(self, client: str, nbytes: int) -> bool:
        self._prune(client)
        items = self._items.get(client)
        if items:
            if self.window and len(items) >= self.window:
                return False
            if self._bytes[client] + nbytes > self.per_client:
                return False
        if self.total + nbytes > self.total_cap:
            self.prune_all()
            return self.total + nbytes <= self.total_cap or not self.total
        return True

    def send(self, sock: zmq.Socket[Any], frames: list[Any], client: str, nbytes: int) -> None:
        """Send a reply without blocking (ZMQError if it cannot be queued), tracking big ones."""
        if nbytes < TRACK_FROM_BYTES or not client:
            # copy=True: one memcpy of a small frame is cheaper than zero-copy's release thread.
            sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
            return
        tracker = sock.send_multipart(frames, zmq.NOBLOCK, copy=False, track=True)
        if tracker is None or tracker.done:
            return
        self._items.setdefault(client, []).append((tracker, nbytes))
        self._bytes[client] = self._bytes.get(client, 0) + nbytes
        self.total += nbytes


@dataclass
class _Conn:
    fd: int
    label: str
    port: int
    limits: InboundLimits
    tokens: float
    seen_bytes: int = 0
    seen_at: float = 0.0


@dataclass
class _Watched:
    label: str
    port: int
    limits: InboundLimits
    max_connections: int
    monitor: zmq.Socket[Any]
    open: dict[int, _Conn] = field(default_factory=dict)


@contextmanager
def _accepted(fd: int, port: int) -> Iterator[socket.socket | None]:
    """The accepted connection `fd` of the server on `port`, borrowed (never closed here), or None
    if `fd` is not one any more (it may have been closed and reused since the monitor's event)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        yield None
        return
    try:
        try:
            mine = sock.getsockname()[1] == port
        except (OSError, IndexError, TypeError):
            mine = False
        yield sock if mine else None
    finally:
        sock.detach()


def _cut(fd: int, port: int) -> bool:
    """shutdown() an accepted connection of the server on `port`, if `fd` still is one. libzmq
    sees the end and closes it itself."""
    with _accepted(fd, port) as sock:
        if sock is None:
            return False
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            return False
        return True


def _bytes_received(fd: int, port: int) -> int | None:
    """The kernel's count of bytes received on an accepted connection of `port` (None: not one)."""
    with _accepted(fd, port) as sock:
        if sock is None:
            return None
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return None
        if len(info) < _TCP_INFO_BYTES_RECEIVED + 8:
            return None
        value: int = struct.unpack_from("Q", info, _TCP_INFO_BYTES_RECEIVED)[0]
        return value


class ConnectionWatch:
    """The connections of a node's server sockets: counted, capped, and cut when they send more
    than their socket's inbound budget. One thread; sockets are added with `watch` (any thread)."""

    def __init__(self, name: str, context: zmq.Context[Any]) -> None:
        self.name = name
        self.context = context
        self.metrics = Metrics()
        self._open_gauge = self.metrics.gauge(
            "open_connections", "connections open, by server socket", ("socket",)
        )
        self._cut_counter = self.metrics.counter(
            "connections_cut_total",
            "connections closed by the node: over the socket's connection cap, or sending too much",
            ("socket", "reason"),
        )
        self.published: Snapshot = self.metrics.snapshot()
        self._pending: list[_Watched] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = worker_thread(self._main, f"zswarm-conns-{name}")
        self._started = False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def watch(self, address: str, label: str, port: int, limits: InboundLimits, max_connections: int) -> None:
        """Follow the monitor bound at `address` (zmq_socket_monitor) of the server on `port`.
        The monitor's reader is connected here, at once (no event is missed), and handed to the
        watch thread under the lock (a full memory barrier: a socket may change threads so)."""
        mon: zmq.Socket[Any] = self.context.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(address)
        with self._lock:
            self._pending.append(_Watched(label, port, limits, max_connections, mon))

    def counts(self) -> dict[str, int]:
        snap = self.published
        return {labels[0]: int(v) for labels, v in snap.values.get("open_connections", {}).items()}

    def _main(self) -> None:
        watched: dict[zmq.Socket[Any], _Watched] = {}
        poller = zmq.Poller()
        next_check = time.monotonic() + CHECK_S
        checked_rss = resident_bytes()
        try:
            while not self._stop.is_set():
                with self._lock:
                    pending, self._pending = self._pending, []
                for w in pending:
                    poller.register(w.monitor, zmq.POLLIN)
                    watched[w.monitor] = w
                events = dict(poller.poll(int(PROBE_S * 1000))) if watched else {}
                if not watched:
                    self._stop.wait(0.05)
                for mon in events:
                    self._drain(watched[mon])
                now = time.monotonic()
                rss = resident_bytes()
                # Between checks, memory growing fast (a flood being buffered) brings one forward.
                if now >= next_check or rss - checked_rss >= PROBE_JUMP_BYTES:
                    next_check = now + CHECK_S
                    cut = sum([self._check(w, now) for w in watched.values()])
                    if cut:
                        trim_memory(time.monotonic(), force=True)  # what it buffered is free now
                    checked_rss = resident_bytes()
                    self.published = self.metrics.snapshot()
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("%s: connection watch failed (connections are no longer watched)", self.name)
        finally:
            with self._lock:
                left, self._pending = self._pending, []
            for mon in [*watched, *(w.monitor for w in left)]:
                mon.close(linger=0)

    def _drain(self, w: _Watched) -> None:
        while True:
            try:
                message = w.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(message)
            except Exception:
                continue
            kind, fd = event["event"], int(event["value"])
            if kind == zmq.EVENT_ACCEPTED:
                if len(w.open) >= w.max_connections:
                    if _cut(fd, w.port):
                        self._cut_counter.inc(labels=(w.label, "cap"))
                    continue
                w.open[fd] = _Conn(
                    fd, w.label, w.port, w.limits, float(w.limits.burst), seen_at=time.monotonic()
                )
                first = _bytes_received(fd, w.port)
                w.open[fd].seen_bytes = first or 0
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                w.open.pop(fd, None)
            self._open_gauge.set(len(w.open), labels=(w.label,))

    def _check(self, w: _Watched, now: float) -> int:
        """Read every connection's byte count; cut those over budget. Returns how many."""
        cut = 0
        for fd, conn in list(w.open.items()):
            received = _bytes_received(fd, w.port)
            if received is None:
                del w.open[fd]  # closed (its event is on the way) or the fd is something else now
                continue
            elapsed = now - conn.seen_at
            conn.tokens = min(float(conn.limits.burst), conn.tokens + elapsed * conn.limits.rate)
            conn.tokens -= received - conn.seen_bytes
            conn.seen_bytes, conn.seen_at = received, now
            if conn.tokens < 0:
                if _cut(fd, w.port):
                    cut += 1
                    self._cut_counter.inc(labels=(w.label, "inbound"))
                    log.warning("%s: cut a connection to %s that sent too much", self.name, w.label)
                del w.open[fd]
        self._open_gauge.set(len(w.open), labels=(w.label,))
        return cut


_monitor_ids = itertools.count(1)


class Transport:
    def __init__(self, name: str, security: TransportSecurity | None = None) -> None:
        self.name = name
        self.security = security
        self.context: zmq.Context[Any] = zmq.Context()
        self._connected: dict[zmq.Socket[Any], list[str]] = {}
        self._lock = threading.Lock()  # sockets are made by several threads of one node
        self._authenticator: Authenticator | None = None
        self.watch: ConnectionWatch | None = None
        self.max_connections = 1024  # per server socket; start() sets it from the fd limit

    def start(self, fd_limit: int = 0) -> None:
        """Start the node's connection watch (and ZAP handler): before any server socket."""
        if fd_limit > 0:
            # A quarter of the descriptors per server socket (a node has up to three), the rest
            # for files, lanes and libzmq's own.
            self.max_connections = max(64, fd_limit // 4)
        if self.watch is None:
            self.watch = ConnectionWatch(self.name, self.context)
            self.watch.start()
        self.start_security()

    @property
    def secure(self) -> bool:
        return self.security is not None

    def start_security(self) -> None:
        """Start the node's ZAP handler (authenticated mode, a node with server sockets): before
        any server socket binds, since a CURVE server with no handler refuses everyone."""
        if self.security is None or self.security.allow_list is None or self._authenticator is not None:
            return
        self._authenticator = Authenticator(
            self.context, self.security.allow_list, name=f"zswarm-zap-{self.name}"
        )
        self._authenticator.start()

    @property
    def authenticator(self) -> Authenticator | None:
        return self._authenticator

    # ---- making sockets

    def socket(self, kind: int, **options: Any) -> zmq.Socket[Any]:
        """A socket that never blocks shutdown (linger 0), with the given sockopts."""
        sock: zmq.Socket[Any] = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        return sock

    def client(
        self, kind: int, address: str, server_key: bytes | None = None, **options: Any
    ) -> zmq.Socket[Any]:
        """A socket connected to `address`; authenticated, a CURVE client of `server_key` (raw
        or Z85; default: the node's server key)."""
        sock = self.socket(kind, **options)
        try:
            self.connect(sock, address, server_key)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def server(
        self,
        kind: int,
        host: str,
        port: int,
        key: str = "port",
        inbound: InboundLimits | None = None,
        **options: Any,
    ) -> tuple[zmq.Socket[Any], int]:
        """A bound socket and the port it got (port 0: any free port). `key` names the config
        field the port came from, for the error a user sees when it is taken; `inbound`: what
        one connection may send (SEGMENT_INBOUND by default), watched by the ConnectionWatch."""
        options.setdefault("handshake_ivl", HANDSHAKE_MS)
        options.setdefault("heartbeat_ivl", HEARTBEAT_IVL_MS)
        options.setdefault("heartbeat_timeout", HEARTBEAT_TIMEOUT_MS)
        options.setdefault("tcp_keepalive", 1)
        sock = self.socket(kind, **options)
        try:
            if self.security is not None:
                if self._authenticator is None:
                    raise ConfigError(f"{self.name}: a server socket needs the allow-list (allow_dir)")
                apply_server(sock, self.security.keys)
            bound = bind(sock, host, port, key)
            if self.watch is not None:
                address = f"inproc://zswarm-monitor-{self.name}-{next(_monitor_ids)}"
                sock.monitor(address, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
                label = key.removesuffix("_port")
                self.watch.watch(address, label, bound, inbound or SEGMENT_INBOUND, self.max_connections)
            return sock, bound
        except BaseException:
            sock.close(linger=0)
            raise

    def connect(self, sock: zmq.Socket[Any], address: str, server_key: bytes | None = None) -> None:
        """Connect; authenticated, as a CURVE client of `server_key` (default: the node's)."""
        if self.security is not None:
            key = server_key if server_key is not None else self.security.server_key
            if key is None:
                raise ConfigError(f"{self.name}: no public key known for {address}: cannot authenticate it")
            apply_client(sock, self.security.keys, key)
        sock.connect(address)
        with self._lock:
            self._connected.setdefault(sock, []).append(address)

    def connected(self, sock: zmq.Socket[Any]) -> list[str]:
        """Endpoints this socket was connected to (and forgets them: the caller disconnects)."""
        with self._lock:
            return self._connected.pop(sock, [])

    # ---- ending

    def close(self, timeout_s: float = 5.0) -> None:
        """End the context. Every socket should be closed by its thread by now; if a thread is
        stuck with one open, `term` would wait for ever: give up after `timeout_s` and say so."""
        context = self.context
        if self.watch is not None:
            self.watch.stop(timeout_s)
        if self._authenticator is not None:
            self._authenticator.stop(timeout_s)
            self._authenticator = None
        if context.closed:
            return
        done = threading.Event()

        def term() -> None:
            context.term()
            done.set()

        ender = worker_thread(term, f"zswarm-term-{self.name}")
        ender.start()
        if not done.wait(timeout_s):
            log.error("%s: sockets still open after %.1f s; leaving the context behind", self.name, timeout_s)


def bind(sock: zmq.Socket[Any], host: str, port: int, key: str = "port") -> int:
    """Bind to tcp://host:port (port 0: any free port) and return the port bound."""
    address = endpoint(host, port) if port else endpoint(host, 0).rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{key}: port {port} on {host} is in use: is another zswarm already running?"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ConfigError(f"bind_host: {host} is not an address of this machine") from None
        raise ConfigError(f"{key}: cannot bind {address}: {exc.strerror}") from None
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(bound.rsplit(":", 1)[1])
