"""ServiceThread: one thread that owns its sockets, and the only way other threads reach it.

Other threads never touch a socket of a service. They hand it work with `call(fn)` (fn runs in the
service thread; the returned Future carries its result or exception) and wake it through a pipe
that the thread's poller watches next to its sockets. `start()` returns once the thread has bound
its sockets (and raises what it raised if it could not); `stop()` is idempotent, wakes the thread,
and joins it. The thread closes its own sockets with linger 0 on the way out.

Memory: what a hostile client made libzmq or this process buffer (a multipart message that never
ended, replies nobody read) is freed when its connection goes, but glibc keeps freed memory in
its arenas (libzmq's I/O threads have their own), so the process would stay that big. Every
service loop calls `trim_memory`, which hands free memory back to the kernel (glibc's
malloc_trim) at most every TRIM_INTERVAL_S for the whole process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import zmq

from common.errors import ClosedError, ConfigError
from common.threads import worker_thread

log = logging.getLogger(__name__)
T = TypeVar("T")

TRIM_INTERVAL_S = 5.0
_trim_lock = threading.Lock()
_next_trim = 0.0
_malloc_trim: Any = None  # glibc's malloc_trim, or False where there is none


def trim_memory(now: float, force: bool = False) -> bool:
    """Give free heap memory back to the kernel, at most every TRIM_INTERVAL_S per process
    (`force`: now). True when it trimmed. A no-op where the C library has no malloc_trim."""
    global _next_trim, _malloc_trim
    if (now < _next_trim and not force) or not _trim_lock.acquire(blocking=False):
        return False
    try:
        if now < _next_trim and not force:
            return False
        _next_trim = now + TRIM_INTERVAL_S
        if _malloc_trim is None:
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _malloc_trim = libc.malloc_trim
                _malloc_trim.argtypes = [ctypes.c_size_t]
            except (OSError, AttributeError):
                _malloc_trim = False
        if _malloc_trim is False:
            return False
        _malloc_trim(0)
        return True
    finally:
        _trim_lock.release()


class Wakeup:
    """A pipe that wakes a zmq poll from any thread (os.write is atomic and thread-safe)."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)

    def fileno(self) -> int:
        return self._read_fd

    def wake(self) -> None:
        try:
            os.write(self._write_fd, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (already woken) or closed (stopping): either way no one waits

    def drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


class ServiceThread:
    """Base for a socket-owning thread: subclasses implement `setup`, `run_once`, `teardown`."""

    def __init__(self, name: str, context: zmq.Context[Any]) -> None:
        self.name = name
        self.context = context
        self.wakeup = Wakeup()
        self.poller = zmq.Poller()
        self.poller.register(self.wakeup.fileno(), zmq.POLLIN)
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._startup_error: BaseException | None = None
        self._thread = worker_thread(self._main, name)
        self._started = False
        self.loop_errors = 0

    # ---- API side (any thread)

    def start(self, timeout: float = 10.0) -> None:
        self._started = True
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start within {timeout} s")
        if self._startup_error is not None:
            raise self._startup_error

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self.wakeup.wake()
        if self._started and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s did not stop within %.1f s", self.name, timeout)
        self.wakeup.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` in the service thread; the Future gets its result or its exception."""
        future: Future[T] = Future()
        if not self.alive:
            future.set_exception(ClosedError(f"{self.name} is not running"))
            return future
        self._calls.put((fn, future))
        self.wakeup.wake()
        return future

    # ---- service side

    def setup(self) -> None:
        """Create and bind sockets (in the service thread)."""

    def run_once(self, timeout_ms: int) -> None:
        """Poll once and handle what arrived."""
        raise NotImplementedError

    def next_timeout_ms(self, now: float) -> int:
        return 1000

    def teardown(self) -> None:
        """Close sockets (in the service thread)."""

    def _main(self) -> None:
        try:
            self.setup()
        except BaseException as exc:  # reported to start()'s caller
            self._startup_error = exc
            self._ready.set()
            self._safe_teardown()
            return
        self._ready.set()
        errors = RateLimitedLog(log, interval_s=10.0)
        try:
            while not self._stopping.is_set():
                self._run_calls()
                try:
                    self.run_once(self.next_timeout_ms(time.monotonic()))
                    trim_memory(time.monotonic())
                except (zmq.ContextTerminated, MemoryError):
                    raise
                except Exception:
                    # A bug met by one message must not stop the service for everyone else.
                    self.loop_errors += 1
                    errors.exception("%s: error in the loop (service continues)", self.name)
        except BaseException:
            log.exception("%s crashed", self.name)
        finally:
            self._stopping.set()
            self._fail_pending_calls()
            self._safe_teardown()

    def _run_calls(self) -> None:
        self.wakeup.drain()
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _fail_pending_calls(self) -> None:
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(ClosedError(f"{self.name} stopped"))

    def _safe_teardown(self) -> None:
        try:
            self.teardown()
        except Exception:
            log.exception("%s: error while closing", self.name)


def make_socket(context: zmq.Context[Any], kind: int, **options: Any) -> zmq.Socket[Any]:
    """A socket that never blocks shutdown (linger 0), with the given sockopts."""
    sock: zmq.Socket[Any] = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name.upper()), value)
    return sock


def bind(sock: zmq.Socket[Any], host: str, port: int) -> int:
    """Bind to tcp://host:port (port 0: any free port) and return the port bound."""
    address = endpoint(host, port) if port else endpoint(host, 0).rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot bind {address}: {exc.strerror}") from None
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return int(bound.rsplit(":", 1)[1])


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class RateLimitedLog:
    """Log a recurring problem at most once per interval, with the count of what was suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self._last = -1e18
        self._suppressed = 0

    def warning(self, msg: str, *args: Any) -> None:
        self._log(logging.WARNING, msg, args, exc_info=False)

    def exception(self, msg: str, *args: Any) -> None:
        self._log(logging.ERROR, msg, args, exc_info=True)

    def _log(self, level: int, msg: str, args: tuple[Any, ...], exc_info: bool) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            if self._suppressed:
                msg += f" ({self._suppressed} similar messages suppressed)"
            self.logger.log(level, msg, *args, exc_info=exc_info)
            self._last, self._suppressed = now, 0
        else:
            self._suppressed += 1
