"""What both command-line tools share: logging, one-line fatal errors, signals, and the control
channel through which scripts and the launcher (launcher/) drive a broker or peer process.

Control protocol
----------------
`zswarm-peer -c peer.yaml control` and `zswarm-broker -c broker.yaml --control` speak JSON lines:
one JSON object per line, UTF-8, on stdin (commands) and stdout (events). Logs go to stderr. It is
for programs; people keep the prompt (and its `--json` answers).

1. The process prints one line when ready, before reading anything:

       {"event": "ready", "name": "p1", "serve": "tcp://127.0.0.1:40123"}              (peer)
       {"event": "ready", "tracker": ..., "heartbeat": ..., "origin": ..., "files": 2}  (broker)

2. Each command is an object with an `id` (any JSON value, echoed back; unique among the commands
   in flight is the client's business), an `op` and the op's arguments:

       {"id": 7, "op": "get", "name": "movie.bin", "timeout": 60}

3. Every event about a command carries its `id`. A command ends with exactly one `result` or
   `error` event; a `get` sends `progress` events before it (at most about ten a second, each the
   newest state; a slow reader skips states, never falls behind):

       {"id": 7, "event": "progress", "name": "movie.bin", "state": "fetching", "done": 310,
        "segments": 1025, "bytes_done": 5079040, "size": 16778450, "rate_bps": 81234567.0}
       {"id": 7, "event": "result", "result": {"name": "movie.bin", "path": ..., "size": ...,
        "file_id": "ab12...", "seconds": 0.41, "sources": {"broker": 1025},
        "source_runs": {"broker": [[0, 1025]]}}}
       {"id": 8, "event": "error", "type": "NotFound", "message": "no such file: x (not_found)",
        "code": "not_found", "detail": "no such file: x"}

   `type` is the exception's class name (the classes of common/errors.py, `CancelledTransfer` for a
   cancelled get, `BadCommand` for a line that is not a command, `TimeoutError`, ...); `code` and
   `detail` come with the `RemoteError` family, so that a client can rebuild the same exception.

4. Commands run concurrently, each in its own thread: a `status` is answered while a `get` runs.
   Output lines never interleave (one lock, one write per line).

Peer ops: `get` (name, timeout), `cancel` (name: every get of that name in flight; result
{"cancelled": N}), `status`, `files`, `remote`, `broker_stats`, `rescan`, `metrics` (flat),
`wait_registered` (timeout: true once registered, false at the timeout), `quit`.
Broker ops: `stats`, `rescan`, `metrics`, `quit`.

`quit` is answered (`{"id": N, "event": "result", "result": "bye"}`), then the process leaves as
it does on Ctrl-C: a peer says bye to the broker, every thread stops, commands still running end
with an error, and a last line `{"event": "stopped"}` precedes exit status 0. End of stdin,
SIGTERM and SIGINT do the same without the answer.

Theory of operation: a reader thread reads stdin with `os.read` (no Python file object, so no
buffer lock a daemon thread could hold at interpreter exit), splits lines and starts a thread per
command; the main thread only waits for the stop event that `quit`, end of input and the signals
set, then closes the node. Events are written with `os.write` under a lock; if stdout is gone (the
client died), that is taken as a quit.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from common.errors import ConfigError, RemoteError, ZswarmError

EXIT_CONFIG = 2
EXIT_FAILURE = 1

log = logging.getLogger(__name__)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def run_guarded(body: Callable[[], int]) -> int:
    """Run a CLI body: config problems exit 2, other zswarm errors exit 1, each in one line."""
    try:
        return body()
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except ZswarmError as exc:
        return fail(str(exc), EXIT_FAILURE)
    except FileNotFoundError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        return 130


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for long-running commands."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


# --------------------------------------------------------------------------------- JSON values


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


def to_json(value: Any) -> str:
    """One line of JSON (bytes as hex, paths as strings, enums as their values)."""
    return json.dumps(value, default=_json_default)


def jsonable(value: Any) -> Any:
    """`value` as it reads after a trip through `to_json`: what a control client receives."""
    return json.loads(to_json(value))


def error_event(exc: BaseException) -> dict[str, Any]:
    """The fields of an `error` event for an exception (without the id)."""
    event: dict[str, Any] = {"event": "error", "type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, RemoteError):
        event["code"] = str(exc.code)
        event["detail"] = exc.message
    return event


# --------------------------------------------------------------------------------- control channel


class BadCommand(ValueError):
    """A line that is not a command this process knows."""


@dataclass
class Command:
    """One command read from the control channel; `emit` sends an event tagged with its id."""

    id: Any
    op: str
    args: dict[str, Any]
    server: ControlServer
    state: dict[str, Any] = field(default_factory=dict)  # for the op's own bookkeeping

    def emit(self, event: str, **fields: Any) -> None:
        self.server.send({"id": self.id, "event": event, **fields})

    def arg(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """An argument of the given JSON type; BadCommand when it is missing or of another type."""
        if key not in self.args:
            if default is ...:
                raise BadCommand(f"{self.op}: missing argument {key!r}")
            return default
        value = self.args[key]
        # JSON true is a Python int too: a bool is accepted only where a bool is asked for.
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise BadCommand(f"{self.op}: argument {key!r} has the wrong type ({value!r})")
        return value


Op = Callable[[Command], Any]  # runs in the command's thread; returns the result (JSON-able)


class ControlServer:
    """Serves the control protocol above: `start()` the reader, then wait on `stop`."""

    def __init__(
        self,
        ops: Mapping[str, Op],
        stop: threading.Event,
        admit: Mapping[str, Callable[[Command], None]] | None = None,
        read_fd: int = 0,
        write_fd: int = 1,
    ) -> None:
        # admit[op] runs in the reader thread before the op's own thread starts: what must be in
        # place before the next command is read (a get must be cancellable by the next line).
        self.ops = dict(ops)
        self.admit = dict(admit or {})
        self.stop = stop
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._write_lock = threading.Lock()
        self._broken = False
        self._threads: list[threading.Thread] = []
        self._threads_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="control-reader", daemon=True)

    # ---- output

    def send(self, event: Mapping[str, Any]) -> None:
        data = (to_json(event) + "\n").encode()
        with self._write_lock:
            if self._broken:
                return
            try:
                while data:
                    written = os.write(self._write_fd, data)
                    data = data[written:]
            except OSError:
                # The client is gone (EPIPE): nobody can ask anything any more, so leave.
                self._broken = True
                self.stop.set()

    # ---- input

    def start(self) -> None:
        self._reader.start()

    def _read_loop(self) -> None:
        buffer = b""
        while not self.stop.is_set():
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break  # end of input: the client closed its end, which means quit
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip() and not self._dispatch(line):
                    return  # quit
        self.stop.set()

    def _dispatch(self, line: bytes) -> bool:
        """Start one command; False when it was `quit`."""
        try:
            raw = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.send({"id": None, **error_event(BadCommand(f"not JSON: {exc}"))})
            return True
        ident = raw.get("id") if isinstance(raw, dict) else None
        op = raw.get("op") if isinstance(raw, dict) else None
        if not isinstance(op, str):
            self.send({"id": ident, **error_event(BadCommand("a command is an object with an 'op'"))})
            return True
        args = {k: v for k, v in raw.items() if k not in ("id", "op")}
        command = Command(ident, op, args, self)
        if op == "quit":
            command.emit("result", result="bye")
            self.stop.set()
            return False
        handler = self.ops.get(op)
        if handler is None:
            known = ", ".join(sorted([*self.ops, "quit"]))
            command.emit(**error_event(BadCommand(f"unknown op {op!r} (known: {known})")))
            return True
        try:
            admit = self.admit.get(op)
            if admit is not None:
                admit(command)
        except Exception as exc:
            command.emit(**error_event(exc))
            return True
        thread = threading.Thread(
            target=self._run, args=(handler, command), name=f"control-{op}-{ident}", daemon=True
        )
        with self._threads_lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()
        return True

    def _run(self, handler: Op, command: Command) -> None:
        try:
            result = handler(command)
        except CancelledError:  # a future cancelled under the op (its own cancel op, or close)
            command.emit("error", type="CancelledError", message=f"{command.op}: cancelled")
        except Exception as exc:
            if not isinstance(exc, ZswarmError | BadCommand | TimeoutError | ValueError):
                log.exception("control op %s failed", command.op)
            command.emit(**error_event(exc))
        else:
            command.emit("result", result=result)

    def join(self, timeout: float) -> None:
        """Wait (up to `timeout` in all) for the commands still running to send their last event."""
        deadline = time.monotonic() + timeout
        with self._threads_lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def serve_control(
    ops: Mapping[str, Op],
    ready: Mapping[str, Any],
    stop: threading.Event,
    admit: Mapping[str, Callable[[Command], None]] | None = None,
) -> ControlServer:
    """Print the ready line and serve commands until `stop` is set (quit, end of input, a signal).
    Returns the server: the caller closes its node, then `finish`es it."""
    server = ControlServer(ops, stop, admit)
    server.send(ready)
    server.start()
    while not stop.wait(0.5):
        pass
    return server


def finish_control(server: ControlServer, join_timeout: float = 5.0) -> int:
    """After the node closed: let running commands answer (they fail: the node is closed), then
    the last line."""
    server.join(join_timeout)
    server.send({"event": "stopped"})
    return 0
