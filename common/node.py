"""Node: the lifecycle that a broker and a peer share.

A node owns a `Transport` (its private ZeroMQ context), a few `ServiceThread`s that each own
their sockets, and a `Metrics` set. `start()` prepares what must exist before any socket (a scan,
a lock), starts the services in order and returns once every one is bound and running; if one
fails, everything already started is stopped and the error is raised. `close()` is idempotent:
it lets the subclass say goodbye (a peer's `bye`), stops the services in reverse order with a
bound on each join, and ends the context with a bound too, so that closing never hangs however a
thread misbehaved. `with Node(...) as n:` does both.

At start a node raises its file-descriptor soft limit to the hard limit: every connection, lane
and open file takes one, and a node that runs out answers `busy` (never dropping content) but
serves nobody meanwhile. In authenticated mode (`make_security`) the node's ZAP handler starts
before any service, so that no server socket is ever bound without it.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Protocol, Self

from common.errors import ClosedError
from common.metrics import Metrics
from common.transport import Transport, TransportSecurity, security_from_config

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (soft, hard) after."""
    try:
        import resource
    except ImportError:  # not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft, hard


class Service(Protocol):
    """A thread a node starts and stops (common.service.ServiceThread, or a plain worker)."""

    def start(self, timeout: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...


class Node:
    def __init__(self, name: str) -> None:
        self.node_name = name
        self.metrics = Metrics()
        self.transport: Transport | None = None
        self._services: list[Service] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    # ---- for subclasses

    def prepare(self) -> None:
        """Work before any socket exists (scanning files, taking a lock). May raise."""

    def make_security(self) -> TransportSecurity | None:
        """The node's CURVE keys and allow-list (None: plain NULL mechanism), from the fields of
        its `config` if it has one: `secret_key_file`, `allow_dir`, `broker_public_key_file`.
        May raise ConfigError."""
        return security_from_config(getattr(self, "config", None))

    def make_services(self, transport: Transport) -> list[Service]:
        """The services to start, in order (each is started before the next is made)."""
        raise NotImplementedError

    def after_start(self) -> None:
        """Called by start() once every service runs."""

    def before_stop(self) -> None:
        """Called by close() while the services still run (say goodbye)."""

    def after_stop(self) -> None:
        """Called by close() once every service stopped (release locks, close files)."""

    # ---- lifecycle

    def start(self) -> Self:
        with self._lock:
            if self._started:
                if self._closed:
                    raise ClosedError(f"{self.node_name} was closed; make a new one")
                return self
            self._started = True
        try:
            fd_limit, _ = raise_fd_limit()
            self.prepare()
            self.transport = Transport(self.node_name, self.make_security())
            self.transport.start(fd_limit)
            for service in self.make_services(self.transport):
                self._services.append(service)
                service.start()
            self.after_start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._services:
                self.before_stop()
        except Exception:
            log.exception("%s: error while leaving", self.node_name)
        for service in reversed(self._services):
            service.stop(STOP_TIMEOUT_S)
        if self.transport is not None:
            self.transport.close(STOP_TIMEOUT_S)
        try:
            self.after_stop()
        except Exception:
            log.exception("%s: error while closing", self.node_name)

    @property
    def running(self) -> bool:
        return self._started and not self._closed

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
