"""Transport: the one place where a node's ZeroMQ sockets are made, bound and connected.

Every socket of a broker or a peer comes from its node's `Transport`: it owns the node's private
context (never `zmq.Context.instance()`, which Jupyter's kernel shares), sets linger 0 on every
socket so that nothing blocks shutdown, applies the options each role needs, turns bind failures
into one-line `ConfigError`s that name the config key and the port, and ends the context with a
bound on the wait. Security (CURVE keys, the ZAP authenticator) is switched on here, for every
socket at once, so no role can forget it.
"""

from __future__ import annotations

import errno
import logging
import threading
from typing import Any

import zmq

from common.errors import ConfigError

log = logging.getLogger(__name__)


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Transport:
    def __init__(self, name: str) -> None:
        self.name = name
        self.context: zmq.Context[Any] = zmq.Context()
        self._connected: dict[zmq.Socket[Any], list[str]] = {}
        self._lock = threading.Lock()  # sockets are made by several threads of one node

    # ---- making sockets

    def socket(self, kind: int, **options: Any) -> zmq.Socket[Any]:
        """A socket that never blocks shutdown (linger 0), with the given sockopts."""
        sock: zmq.Socket[Any] = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name.upper()), value)
        return sock

    def client(self, kind: int, address: str, **options: Any) -> zmq.Socket[Any]:
        sock = self.socket(kind, **options)
        self.connect(sock, address)
        return sock

    def server(
        self, kind: int, host: str, port: int, key: str = "port", **options: Any
    ) -> tuple[zmq.Socket[Any], int]:
        """A bound socket and the port it got (port 0: any free port). `key` names the config
        field the port came from, for the error a user sees when it is taken."""
        sock = self.socket(kind, **options)
        try:
            return sock, bind(sock, host, port, key)
        except BaseException:
            sock.close(linger=0)
            raise

    def connect(self, sock: zmq.Socket[Any], address: str) -> None:
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
        if context.closed:
            return
        done = threading.Event()

        def term() -> None:
            context.term()
            done.set()

        ender = threading.Thread(target=term, name=f"zswarm-term-{self.name}", daemon=True)
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
