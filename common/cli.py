"""What both command-line tools share: logging (through `Console`, which keeps log lines off the
prompt line and out of a progress bar), one-line fatal errors, one exit-status rule, signals, and
the control channel through which scripts and the launcher (launcher/) drive a broker or peer
process.

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
Broker ops: `stats`, `rescan` (list the share folder now; the result is the names shared
afterwards; SIGHUP does the same without an answer, in either mode), `metrics`, `quit`.

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
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from common.errors import ConfigError, RemoteError, ZswarmError
from common.threads import worker_thread

# Exit status, the same rule for both tools (README, "Command line"): 0 when the program did what
# it was asked (a download finished; the prompt, `serve` or the broker stopped by quit, Ctrl-D or
# SIGTERM), 1 when a download or command failed, 2 for a bad config (or a port or data_dir in
# use), 130 (128 + SIGINT, as shells report it) after Ctrl-C, always after a clean stop (a peer
# says bye first). The control mode, which programs drive, ends with 0 however it is asked to.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- the terminal


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _line_buffer() -> str:
    """What the user has typed at the prompt so far (readline's buffer), if readline is in use."""
    readline = sys.modules.get("readline")
    if readline is None:
        return ""
    try:
        return str(readline.get_line_buffer())
    except Exception:
        return ""


LOCK_WAIT_S = 1.0  # how long a line waits for the console's lock before it is written anyway


class Console:
    """Keeps log lines apart from what the user looks at: the prompt line and the progress bar.

    While a progress bar is shown (`showing_bar`), log lines go through `tqdm.write`, which clears
    the bar, writes the line and draws the bar again below it. While the prompt waits for input
    (`at_prompt`) on a terminal, a log line clears the prompt line, is written, and the prompt is
    printed again with what was typed so far. Otherwise a log line is just written."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._bar: Any = None
        self._prompt: str | None = None

    def set_bar(self, bar: Any) -> None:
        """The tqdm bar now shown (None: none)."""
        with self._lock:
            self._bar = bar

    @contextmanager
    def showing_bar(self, bar: Any) -> Iterator[None]:
        self.set_bar(bar)
        try:
            yield
        finally:
            self.set_bar(None)

    @contextmanager
    def at_prompt(self, prompt: str) -> Iterator[None]:
        with self._lock:
            self._prompt = prompt
        try:
            yield
        finally:
            with self._lock:
                self._prompt = None

    @contextmanager
    def _held(self) -> Iterator[None]:
        """The lock, or after LOCK_WAIT_S without it, nothing: a Ctrl-C raised in the main thread
        between taking a lock and the `with` that releases it leaves it taken for good (a known
        CPython hazard), and a thread that logs must never hang on it (the peer's clean stop
        waits for that thread). Output may then interleave; it never stops."""
        taken = self._lock.acquire(timeout=LOCK_WAIT_S)
        try:
            yield
        finally:
            if taken:
                self._lock.release()

    def write_log(self, text: str, stream: Any) -> None:
        with self._held():
            bar, prompt = self._bar, self._prompt
            if bar is not None and _bar_drawn(bar):
                type(bar).write(text, file=stream)
            elif prompt is not None and _isatty(stream) and _isatty(sys.stdout):
                stream.write("\r\x1b[K" + text + "\n")  # clear the prompt line, then the log line
                stream.flush()
                sys.stdout.write(prompt + _line_buffer())  # the prompt again, as it was
                sys.stdout.flush()
            else:
                stream.write(text + "\n")
                stream.flush()

    def say(self, text: str, stream: Any = None) -> None:
        """Write one line for the user in one write, under the lock: a log line written by another
        thread cannot land inside it (with PYTHONUNBUFFERED, print() writes the text and the newline
        separately)."""
        out = sys.stdout if stream is None else stream
        with self._held():
            out.write(text + "\n")
            out.flush()


def _bar_drawn(bar: Any) -> bool:
    """Has tqdm drawn this bar yet? A bar made with `delay` stays hidden until the delay is over,
    but `tqdm.write` draws every bar again below the line it writes, hidden or not, and `close`
    then leaves such a bar on the screen (it clears only bars it drew itself): the result line
    would follow it on the same line. So lines go through `tqdm.write` only once the bar shows."""
    last = getattr(bar, "last_print_t", None)
    return last is not None and last >= bar.start_t + bar.delay


console = Console()


def say(text: str = "", stream: Any = None) -> None:
    """Print one line for the user (see `Console.say`)."""
    console.say(text, stream)


class ConsoleHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes through `console` (never onto the prompt or the bar)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            console.write_log(self.format(record), self.stream)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(level: str) -> None:
    handler = ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


# --------------------------------------------------------------------------------- errors, signals


def fail(message: str, status: int) -> int:
    say(f"error: {message}", sys.stderr)
    return status


def run_guarded(body: Callable[[], int]) -> int:
    """Run a CLI body: config problems exit 2, other zswarm errors exit 1, each in one line;
    Ctrl-C exits 130."""
    try:
        return body()
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except ZswarmError as exc:
        return fail(str(exc), EXIT_FAILURE)
    except FileNotFoundError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


class StopEvent(threading.Event):
    """Set by SIGTERM or SIGINT; `signum` is the first signal that set it (None: something else)."""

    signum: int | None = None

    def exit_status(self) -> int:
        """The exit status of a program that ran until this was set (see the rule above)."""
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_OK


def stop_event_on_signals() -> StopEvent:
    """An event set by SIGTERM or SIGINT, for long-running commands."""
    stop = StopEvent()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.signum is None:
            stop.signum = signum
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def on_sighup(action: Callable[[], Any], what: str) -> None:
    """Run `action` at each SIGHUP, in a thread of its own (the handler only wakes it: a signal
    handler must not block or log). SIGHUPs that come while it runs make it run once more."""
    wake = threading.Event()

    def loop() -> None:
        while True:
            wake.wait()
            wake.clear()
            log.info("SIGHUP: %s", what)
            try:
                action()
            except Exception as exc:
                log.warning("%s after SIGHUP failed: %s", what, exc)

    worker_thread(loop, f"sighup-{what}").start()

    def handler(signum: int, frame: FrameType | None) -> None:
        wake.set()

    signal.signal(signal.SIGHUP, handler)


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
        self._reader = worker_thread(self._read_loop, "control-reader")

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
        thread = worker_thread(self._run, f"control-{op}-{ident}", (handler, command))
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
