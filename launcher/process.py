"""The process driver: child processes that answer with JSON lines, and the control-channel client.

Theory of operation
-------------------
`ChildProcess` starts `[*prefix, python, *args]` with stdin and stdout as pipes and stderr appended
to a log file (never a pipe, which could fill up and block the child). One reader thread per child
moves its stdout into this process: each line that is a JSON object goes to `_deliver`, the end of
the output to `_on_eof`. A plain child queues the objects for `read_json(timeout)`, so every read
has a deadline. Nothing depends on fork: the reader is a thread of this process, so the driver
works the same under the `spawn` start method, and behind a prefix such as `ip netns exec HOST`
(which execs the command: the PID is the Python child's own).

`ControlClient` is the client side of the control protocol (described in common/cli.py):
`request(op, **args)` writes one command line and returns a `Pending` at once; the reader thread
routes every event with an id to its Pending (progress into a subscription that keeps the newest
snapshot; the result or error as the final event). So any number of commands are in flight and
each waiter waits for its own answer only. When the child's output ends, every Pending still open
gets an error at once: nobody waits for a child that is gone. Errors come back as the exception
classes the child raised (`NotFound`, `TransferError`, `CancelledTransfer`...), rebuilt from the
event's `type`; an unknown type becomes `CommandFailed`.

Stopping is always by this child's PID: `stop()` wakes it (SIGCONT: a stopped process can act on
nothing), asks politely (`_ask_to_leave`: a quit command and end of input for a control client),
waits, then SIGTERM, waits, then SIGKILL. It is idempotent and every wait has a deadline.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from common import errors as _errors
from common.cli import BadCommand
from common.errors import ZswarmError
from common.subscription import Subscription

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0


class LauncherError(ZswarmError):
    """A child process died, did not answer in time, or could not be started."""


class LauncherTimeout(LauncherError, TimeoutError):
    """A wait of the launcher passed its deadline."""


class CommandFailed(ZswarmError):
    """A control command failed with an error type this side does not know (`.type`)."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type = type_name


def _error_types() -> dict[str, type[BaseException]]:
    from peer.transfer import CancelledTransfer

    types: dict[str, type[BaseException]] = {
        name: value
        for name, value in vars(_errors).items()
        if isinstance(value, type) and issubclass(value, ZswarmError)
    }
    types.update(
        CancelledTransfer=CancelledTransfer,
        CancelledError=CancelledTransfer,  # a future cancelled under a command: the same outcome
        BadCommand=BadCommand,
        LauncherError=LauncherError,
        TimeoutError=TimeoutError,
        ValueError=ValueError,
    )
    return types


def error_from_event(event: dict[str, Any]) -> BaseException:
    """The exception an `error` event stands for, of the class the child raised when known."""
    type_name = str(event.get("type", "Error"))
    message = str(event.get("message", ""))
    cls = _error_types().get(type_name)
    if cls is None:
        return CommandFailed(type_name, message)
    if issubclass(cls, _errors.RemoteError):
        return cls(str(event.get("code", "")), str(event.get("detail", message)))
    return cls(message)


class ChildProcess:
    """A Python child (`python ARGS`) answering with JSON lines on stdout."""

    LEAVES_ON_EOF = False  # True: closing its stdin is the polite way to ask it to leave

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        prefix: Sequence[str] | None = None,
        cwd: Path | None = None,
        label: str | None = None,
        python: str | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.prefix = list(prefix or [])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in _cleanup())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            self.proc = subprocess.Popen(
                [*self.prefix, python or sys.executable, *self.args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._log,
                cwd=cwd,
                env=env,
                text=True,
                encoding="utf-8",
                bufsize=1,
            )
        except BaseException:
            self._log.close()
            raise
        self.pid = self.proc.pid
        self.label = label or f"pid {self.pid}"
        self._stdin_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._cleaned = False
        self._lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._reader = threading.Thread(
            target=self._read_stdout, name=f"zswarm-launcher-{self.pid}", daemon=True
        )
        self._reader.start()

    # ---- output of the child

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    self._deliver(value)
        except (OSError, ValueError):
            pass  # stdout closed under the reader by _cleanup(): the child is gone anyway
        finally:
            self._on_eof()

    def _deliver(self, value: dict[str, Any]) -> None:
        self._lines.put(value)

    def _on_eof(self) -> None:
        self._lines.put(None)

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON object on stdout; LauncherError if the child ends or `timeout` passes."""
        try:
            value = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise LauncherTimeout(
                f"{self.label}: no answer within {timeout} s (log: {self.log_path})"
            ) from None
        if value is None:
            self._lines.put(None)  # every later read fails at once as well
            raise LauncherError(self._exited_message())
        return value

    def _exited_message(self) -> str:
        try:
            code: int | None = self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            code = None
        return f"{self.label} exited with {code} (log: {self.log_path}): {self.log_tail()}"

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    # ---- input of the child

    def send_line(self, line: str) -> None:
        with self._stdin_lock:
            stdin = self.proc.stdin
            if stdin is None or stdin.closed or self.proc.poll() is not None:
                raise LauncherError(f"{self.label} is not running")
            try:
                stdin.write(line + "\n")
                stdin.flush()
            except (OSError, ValueError) as exc:
                raise LauncherError(f"{self.label}: cannot write to it: {exc}") from None

    def close_stdin(self) -> None:
        with self._stdin_lock:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            except OSError:
                pass  # the child is gone: its end of the pipe already is

    # ---- lifecycle

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass  # it exited between the poll and the kill

    def wait(self, timeout: float) -> int:
        """Its exit status, once it exits; LauncherTimeout after `timeout`."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise LauncherTimeout(f"{self.label} still running after {timeout} s") from None

    def kill(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGKILL, as a crash would; returns the exit status (-9)."""
        with self._stop_lock:
            self.signal(signal.SIGKILL)
            self._reap(timeout)
            self._cleanup(timeout)
        return self.proc.returncode

    def _ask_to_leave(self) -> bool:
        """Ask the child to leave by itself; True when it is expected to."""
        self.close_stdin()
        return self.LEAVES_ON_EOF

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Ask politely, then SIGTERM, then SIGKILL (each with `timeout`); returns the exit status."""
        with self._stop_lock:
            if self.proc.poll() is None:
                self.signal(signal.SIGCONT)  # a stopped process can neither read nor hear SIGTERM
                polite = self._ask_to_leave()
                try:
                    self.proc.wait(timeout if polite else 0.0)
                except subprocess.TimeoutExpired:
                    if polite:
                        log.warning("%s did not leave within %s s: SIGTERM", self.label, timeout)
                    self.signal(signal.SIGTERM)
                    try:
                        self.proc.wait(timeout)
                    except subprocess.TimeoutExpired:
                        log.warning("%s ignored SIGTERM for %s s: SIGKILL", self.label, timeout)
                        self.signal(signal.SIGKILL)
                        self._reap(timeout)
            self._cleanup(timeout)
        return self.proc.returncode

    def _reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("%s survived SIGKILL for %s s (stuck in the kernel?)", self.label, timeout)

    def _cleanup(self, timeout: float) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self.close_stdin()
        # The reader ends at the end of the child's output; a grandchild that inherited the pipe
        # could keep it open, hence the bound. Its file is closed only once it ended: closing a
        # buffered file under a blocked reader can wait for the reader's lock forever.
        self._reader.join(timeout)
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


class Pending:
    """One control command in flight: its progress events and its final event."""

    def __init__(self, ident: int, op: str, label: str) -> None:
        self.id = ident
        self.op = op
        self.label = label
        self.progress: Subscription[dict[str, Any]] = Subscription()
        self.final: dict[str, Any] | None = None
        self._done = threading.Event()

    def _deliver(self, event: dict[str, Any]) -> bool:
        """Take an event for this command; True when it was the final one."""
        kind = event.get("event")
        if kind == "progress":
            self.progress.publish(event)
            return False
        if kind in ("result", "error"):
            self.final = event
            self._done.set()
            self.progress.close()
            return True
        return False

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float) -> Any:
        """The command's result; raises the error it ended with, or LauncherTimeout."""
        if not self._done.wait(timeout):
            raise LauncherTimeout(f"{self.label}: no answer to {self.op} within {timeout} s")
        final = self.final
        assert final is not None
        if final.get("event") == "error":
            raise error_from_event(final)
        return final.get("result")


class ControlClient(ChildProcess):
    """A broker or peer process speaking the control protocol; `ready` is its ready line."""

    LEAVES_ON_EOF = True

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        ready_timeout: float = 60.0,
        prefix: Sequence[str] | None = None,
        cwd: Path | None = None,
        label: str | None = None,
        python: str | None = None,
    ) -> None:
        # Set before the reader thread starts: it routes events from the first line on.
        self._pending: dict[int, Pending] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._ended = False
        super().__init__(args, log_path, prefix=prefix, cwd=cwd, label=label, python=python)
        try:
            self.ready = self.read_json(ready_timeout)
            if self.ready.get("event") != "ready":
                raise LauncherError(f"{self.label}: expected a ready line, got {self.ready}")
        except BaseException:
            self.stop(5.0)
            raise

    def _deliver(self, value: dict[str, Any]) -> None:
        if "id" not in value:
            super()._deliver(value)  # ready, stopped
            return
        with self._pending_lock:
            pending = self._pending.get(value["id"]) if isinstance(value["id"], int) else None
            if pending is not None and pending._deliver(value):
                del self._pending[pending.id]
        if pending is None:
            log.warning("%s: event for no command in flight: %s", self.label, value)

    def _on_eof(self) -> None:
        with self._pending_lock:
            self._ended = True
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            p._deliver(
                {
                    "event": "error",
                    "type": "LauncherError",
                    "message": f"{self.label} ended before answering {p.op} (log: {self.log_path})",
                }
            )
        super()._on_eof()

    def request(self, op: str, **args: Any) -> Pending:
        """Send one command; returns at once. `Pending.wait(timeout)` gives its answer."""
        with self._pending_lock:
            if self._ended:
                raise LauncherError(f"{self.label} is not running (log: {self.log_path})")
            pending = Pending(next(self._ids), op, self.label)
            self._pending[pending.id] = pending
        try:
            self.send_line(json.dumps({"id": pending.id, "op": op, **args}))
        except LauncherError:
            with self._pending_lock:
                self._pending.pop(pending.id, None)
            raise
        return pending

    def call(self, op: str, wait_s: float = 30.0, **args: Any) -> Any:
        """Send one command and wait (up to `wait_s`) for its result."""
        return self.request(op, **args).wait(wait_s)

    def _ask_to_leave(self) -> bool:
        try:
            self.request("quit")  # a peer says bye to the broker on the way out
        except LauncherError:
            pass  # it is already leaving
        self.close_stdin()  # and end of input means the same, should the line not get through
        return True
