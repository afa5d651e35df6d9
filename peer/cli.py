"""zswarm-peer: run a peer from a YAML config.

    zswarm-peer -c peer.yaml              a prompt: get NAME, ls, remote, status, rescan, quit
    zswarm-peer -c peer.yaml get NAME     download one file and exit (progress bar on a terminal)
    zswarm-peer -c peer.yaml serve        serve what it holds until Ctrl-C / SIGTERM
    zswarm-peer -c peer.yaml control      JSON-lines commands on stdin, events on stdout

At the prompt, `get` takes the rest of the line as the name (`get sub dir/x.bin`); a name may also
be quoted (`get 'sub dir/x.bin'`), which is the only way to give one that starts or ends with a
space. With --json, the prompt prints no prompt text and answers every command with one JSON line
(`{"ok": true, "cmd": ..., "result": ...}` or `{"ok": false, "cmd": ..., "error": ...}`), one
command at a time; a get's answer has its segments counted and as runs by source, the list of every
segment's source only with `get NAME --segments`. `--json get NAME` answers the same way.

Log lines never land on the prompt line or through the progress bar (common/cli.py, `Console`).
Exit status: 0 done (or stopped by quit, Ctrl-D, SIGTERM), 1 a download or command failed (a
one-shot get stopped by SIGTERM too: its file is not there), 2 a bad config, 130 after Ctrl-C.

`control` is how programs (the launcher in launcher/, the tests, the benchmarks) drive a peer
process: several commands in flight at once, each answered by id, a get streaming its progress.
The protocol is described in common/cli.py; the ops are `PeerControl`'s below. A get's
cancellation is wired up before the next command is read (`PeerControl.admit_get`), so a `cancel`
sent right after a `get` always finds it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from common.cli import (
    EXIT_FAILURE,
    EXIT_OK,
    Command,
    console,
    finish_control,
    run_guarded,
    say,
    serve_control,
    setup_logging,
    stop_event_on_signals,
)
from common.errors import BrokerUnavailable, TransferError, ZswarmError
from common.subscription import Closed
from common.threads import worker_thread
from peer.config import PeerConfig
from peer.driver import GetFuture
from peer.service import Peer
from peer.transfer import CancelledTransfer, GetResult, Progress, TransferState

PROGRESS_EVERY_S = 0.1  # at most ten progress events a second per get
DEFAULT_GET_TIMEOUT_S = 3600.0
PROMPT = "zswarm> "
SEGMENTS_FLAG = "--segments"
MiB = 1024 * 1024
BAR_DELAY_S = 0.5

HELP = """commands:
  get NAME     download NAME from the swarm; the rest of the line is the name, spaces and all
               (quotes work too: get 'sub dir/x.bin'); with --json, `get NAME --segments`
               adds every segment's source to the answer
  ls           files held here (complete and partial)
  remote       files the broker shares
  status       this peer's state and counters
  broker       the broker's statistics (live peers, origin counters, ...)
  rescan       verify the data folder again and re-register what verifies
  quit         leave (also Ctrl-D; Ctrl-C leaves with exit status 130)"""


def result_dict(result: GetResult, per_segment: bool = False) -> dict[str, Any]:
    """A get's result as JSON: counts and runs by source; the per-segment list only on request
    (it is one entry per 16 KiB: 19,200 for a 300 MiB file)."""
    data = asdict(result)
    data["path"] = str(result.path)
    data["seconds"] = round(result.seconds, 4)
    data["source_runs"] = {name: [list(run) for run in runs] for name, runs in result.source_runs.items()}
    if per_segment:
        data["segment_sources"] = result.segment_sources
    return data


def describe_result(result: GetResult) -> str:
    sources = ", ".join(f"{name}: {n}" for name, n in sorted(result.sources.items()))
    return (
        f"{result.name}: {result.size} bytes in {result.seconds:.2f} s -> {result.path}"
        f" (segments from {sources})"
    )


# --------------------------------------------------------------------------------- downloads


class ByteBar:
    """The progress bar of a download on a terminal: bytes, MiB/s and the time left (tqdm), fed
    from the download's progress subscription. Made at the first snapshot that knows the size;
    what was held before (a resume) counts as done but not into the rate. Shown only after
    BAR_DELAY_S more: a download that ends sooner prints its result line alone."""

    def __init__(self, name: str, first: Progress, file: Any = None) -> None:
        from tqdm import tqdm

        unit, scale = ("MiB", MiB) if first.size >= MiB else ("KiB", 1024)
        self.bar = tqdm(
            desc=name,
            total=first.size,
            initial=first.bytes_done,
            unit=unit,  # counted in bytes, shown in MiB: "9.5/28.6 MiB [00:01<00:02, 9.31MiB/s]"
            unit_scale=1 / scale,
            file=file if file is not None else sys.stderr,
            leave=True,
            dynamic_ncols=True,
            delay=BAR_DELAY_S,
            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} {unit} [{elapsed}<{remaining}, {rate_fmt}]",
        )

    def show(self, snap: Progress) -> None:
        bar = self.bar
        delta = snap.bytes_done - bar.n
        if delta > 0:
            bar.update(delta)
        elif delta < 0:  # segments found damaged and dropped
            bar.n = snap.bytes_done
            bar.refresh()

    def close(self) -> None:
        self.bar.close()


def follow_with_bar(future: GetFuture, name: str, timeout: float, file: Any = None) -> None:
    """Show a bar for the download until it ends (in this thread); log lines go above it."""
    bar: ByteBar | None = None
    subscription = future.progress()
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                snap = subscription.get(max(0.0, deadline - time.monotonic()))
            except (Closed, TimeoutError):
                break
            if bar is None:
                if not snap.size or snap.state in (TransferState.DONE, TransferState.FAILED):
                    continue  # the size is not known yet, or it ended before a bar was worth it
                bar = ByteBar(name, snap, file)
                console.set_bar(bar.bar)
            bar.show(snap)
    finally:
        console.set_bar(None)
        if bar is not None:
            bar.close()


def fetch(peer: Peer, name: str, timeout: float, bar: bool) -> GetResult:
    """Download `name`; with `bar`, a progress bar on stderr meanwhile."""
    future = peer.start_get(name, timeout)
    try:
        if bar:
            follow_with_bar(future, name, timeout + 5.0)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            raise TransferError(f"{name}: not finished within {timeout} s") from None
    except BaseException:
        future.cancel()  # Ctrl-C, SIGTERM: stop it now (the verified part is kept)
        raise


def explain(peer: Peer, exc: BaseException) -> str:
    """The message of a failed command; when the peer is not registered because the broker gives
    its name to another live peer, that is the message (the download only knows it timed out)."""
    if not isinstance(exc, BrokerUnavailable) or peer.registered:
        return str(exc)
    try:
        stats = peer.broker_stats(timeout=2.0)
    except (ZswarmError, TimeoutError):
        return str(exc)
    holder = stats.get("peers", {}).get(peer.name) if isinstance(stats.get("peers"), dict) else None
    if not isinstance(holder, dict) or holder.get("endpoint") == peer.serve_endpoint:
        return str(exc)
    return (
        f"not registered with the broker: the name {peer.name!r} is taken by another live peer"
        f" (serving at {holder.get('endpoint')}); give this one another name, or stop the other"
    )


def run_get(peer: Peer, name: str, timeout: float, as_json: bool, per_segment: bool) -> int:
    bar = sys.stderr.isatty() and not as_json
    try:
        result = fetch(peer, name, timeout, bar)
    except ZswarmError as exc:
        message = explain(peer, exc)
        if as_json:
            say(json_error("get", exc, message))
        else:
            say(f"error: {message}", sys.stderr)
        return EXIT_FAILURE
    if as_json:
        say(json_ok("get", result_dict(result, per_segment)))
    else:
        say(describe_result(result))
    return EXIT_OK


# --------------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class Line:
    """A prompt line: the command, its arguments, and `--segments` (get only)."""

    command: str
    args: list[str]
    segments: bool = False


_FIRST_WORD = re.compile(r"\s*(\S+)\s*(.*?)\s*$", re.DOTALL)


def parse_line(line: str) -> Line | None:
    """None for an empty line; ValueError for one that cannot be a command.

    `get` takes the rest of the line as the name (spaces kept), unless it starts with a quote:
    then it is one shell-quoted word. `--segments` may come first or last."""
    match = _FIRST_WORD.match(line)
    if match is None:
        return None
    command, rest = match.group(1).lower(), match.group(2)
    if command != "get":
        return Line(command, shlex.split(rest))
    segments = False
    if rest == SEGMENTS_FLAG:
        rest = ""
    elif rest.startswith(SEGMENTS_FLAG + " "):
        segments, rest = True, rest[len(SEGMENTS_FLAG) :].strip()
    elif rest.endswith(" " + SEGMENTS_FLAG):
        segments, rest = True, rest[: -len(SEGMENTS_FLAG)].strip()
    if rest[:1] in ("'", '"'):
        words = shlex.split(rest)
        if len(words) != 1:
            raise ValueError("usage: get NAME (the rest of the line, or one quoted name)")
        rest = words[0]
    if not rest:
        raise ValueError("usage: get NAME")
    return Line("get", [rest], segments)


def execute(peer: Peer, line: Line, bar: bool = False) -> Any:
    command = line.command
    if command == "get":
        return fetch(peer, line.args[0], DEFAULT_GET_TIMEOUT_S, bar)
    if command == "ls":
        return peer.files()
    if command == "remote":
        return [{"name": f.name, "size": f.size, "file_id": f.file_id.hex()} for f in peer.list_remote()]
    if command == "status":
        return peer.status()
    if command == "broker":
        return peer.broker_stats()
    if command == "rescan":
        return peer.rescan()
    if command in ("help", "?"):
        return HELP
    raise ValueError(f"unknown command {command!r} (try: help)")


def render(command: str, result: Any) -> str:
    if isinstance(result, GetResult):
        return describe_result(result)
    if command == "ls" and isinstance(result, list):
        lines = []
        for f in result:
            state = "complete" if f["complete"] else "{}/{} segments".format(f["held"], f["segments"])
            lines.append(f"{f['name']:<40} {f['size']:>12} bytes  {state}")
        return "\n".join(lines) or "(nothing held)"
    if command == "remote" and isinstance(result, list):
        return "\n".join(f"{f['name']:<40} {f['size']:>12} bytes" for f in result) or "(no files)"
    if command == "rescan" and isinstance(result, dict):
        lines = [f"{name:<40} {n:>12} segments verified" for name, n in sorted(result.items())]
        return "\n".join(lines) or "(nothing held)"
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2, default=str)


def json_ok(command: str, result: Any) -> str:
    return json.dumps({"ok": True, "cmd": command, "result": result}, default=str)


def json_error(command: str, exc: BaseException, message: str | None = None) -> str:
    error = str(exc) if message is None else message
    return json.dumps({"ok": False, "cmd": command, "error": error, "type": type(exc).__name__})


def read_line(interactive: bool) -> str:
    if not interactive:
        return input("")
    with console.at_prompt(PROMPT):  # log lines meanwhile go above the prompt, which is redrawn
        return input(PROMPT)


@contextmanager
def nudge_main_thread_on_signals() -> Iterator[None]:
    """Make a Ctrl-C at the prompt take effect at once, while the block runs.

    Python runs a signal's handler in the main thread when that thread next runs Python code or
    when a blocking call of it fails with EINTR. readline draws the prompt and then waits for a
    key in select(): a Ctrl-C that lands between the two interrupts nothing, and its handler
    waits for the next key press (seen as a prompt ignoring Ctrl-C in 1 run of 5 on a loaded
    machine). Here a thread woken by every signal (`signal.set_wakeup_fd`) sends the main thread
    SIGUSR1 a moment later; its empty handler interrupts the wait, and Python then runs the
    handler that was pending. On leaving, the wake-up pipe is closed and the thread ends."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    main = threading.main_thread().ident
    assert main is not None

    def loop() -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return  # the write end is closed: leaving
            if all(byte == signal.SIGUSR1 for byte in data):
                continue  # our own nudges come back here too
            time.sleep(NUDGE_DELAY_S)
            signal.pthread_kill(main, signal.SIGUSR1)

    nudger = worker_thread(loop, "signal-nudge")
    nudger.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        os.close(write_fd)
        nudger.join(NUDGE_DELAY_S + 5.0)
        os.close(read_fd)
        signal.signal(signal.SIGUSR1, previous)


NUDGE_DELAY_S = 0.05  # after a signal: the main thread has usually run its handler by then


def run_prompt(peer: Peer, as_json: bool) -> int:
    interactive = sys.stdin.isatty() and not as_json
    if not interactive:
        return prompt_loop(peer, as_json, interactive)
    with nudge_main_thread_on_signals():
        return prompt_loop(peer, as_json, interactive)


def prompt_loop(peer: Peer, as_json: bool, interactive: bool) -> int:
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history at the prompt)
        except ImportError:
            pass
        say(f"peer {peer.name} serving at {peer.serve_endpoint}; 'help' lists commands")
        # The first prompt waits for the registration (or its timeout): its log line, written
        # by another thread, must not race the prompt's first drawing.
        peer.wait_registered(peer.config.broker_timeout_s)
    else:
        say(json.dumps({"event": "ready", "name": peer.name, "serve": peer.serve_endpoint}))
    bar = interactive and sys.stderr.isatty()
    while True:
        try:
            text = read_line(interactive)
        except EOFError:
            if interactive:
                say()  # Ctrl-D leaves the cursor after the prompt
            return EXIT_OK
        command = ""
        try:
            line = parse_line(text)
            if line is None:
                continue
            command = line.command
            if command in ("quit", "exit"):
                return EXIT_OK
            result = execute(peer, line, bar)
        except (ZswarmError, ValueError, TimeoutError) as exc:
            message = explain(peer, exc)
            say(json_error(command, exc, message) if as_json else f"error: {message}")
            continue
        if as_json:
            payload = result_dict(result, line.segments) if isinstance(result, GetResult) else result
            say(json_ok(command, payload))
        else:
            say(render(command, result))


# --------------------------------------------------------------------------------- control


def progress_dict(snap: Progress) -> dict[str, Any]:
    return {
        "name": snap.name,
        "state": snap.state.value,
        "done": snap.done,
        "segments": snap.segments,
        "bytes_done": snap.bytes_done,
        "size": snap.size,
        "rate_bps": round(snap.rate_bps, 1),
    }


@dataclass(eq=False)
class _GetSlot:
    """A get of the control channel: its future once started, and whether a cancel came first."""

    name: str
    future: GetFuture | None = None
    cancelled: bool = False


class PeerControl:
    """The peer's control ops (see common/cli.py for the protocol)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._lock = threading.Lock()
        self._gets: dict[str, list[_GetSlot]] = {}

    def ops(self) -> dict[str, Any]:
        peer = self.peer
        return {
            "get": self.get,
            "cancel": self.cancel,
            "status": lambda cmd: peer.status(),
            "files": lambda cmd: peer.files(),
            "remote": lambda cmd: [
                {"name": f.name, "size": f.size, "file_id": f.file_id.hex()} for f in peer.list_remote()
            ],
            "broker_stats": lambda cmd: peer.broker_stats(),
            "rescan": lambda cmd: peer.rescan(),
            "metrics": lambda cmd: peer.metrics_snapshot().flat(),
            "wait_registered": lambda cmd: peer.wait_registered(
                float(cmd.arg("timeout", (int, float), 10.0))
            ),
        }

    def admit_get(self, cmd: Command) -> None:
        name = cmd.arg("name", str)
        cmd.arg("timeout", (int, float), DEFAULT_GET_TIMEOUT_S)  # checked now: nothing starts if wrong
        slot = _GetSlot(name)
        cmd.state["slot"] = slot
        with self._lock:
            self._gets.setdefault(name, []).append(slot)

    def get(self, cmd: Command) -> dict[str, Any]:
        slot: _GetSlot = cmd.state["slot"]
        timeout = float(cmd.arg("timeout", (int, float), DEFAULT_GET_TIMEOUT_S))
        try:
            future = self.peer.start_get(slot.name, timeout)
            with self._lock:
                slot.future = future
                cancel_now = slot.cancelled
            if cancel_now:
                future.cancel()
            self._stream_progress(cmd, future, timeout)
            try:
                result = future.result(timeout + 5.0)
            except CancelledError:
                raise CancelledTransfer(f"{slot.name}: cancelled") from None
            except TimeoutError:
                raise TransferError(f"{slot.name}: not finished within {timeout} s") from None
            return result_dict(result)
        finally:
            with self._lock:
                slots = self._gets.get(slot.name, [])
                if slot in slots:
                    slots.remove(slot)
                if not slots:
                    self._gets.pop(slot.name, None)

    @staticmethod
    def _stream_progress(cmd: Command, future: GetFuture, timeout: float) -> None:
        """Send the newest progress snapshot at most every PROGRESS_EVERY_S until the get ends
        (the subscription keeps only the newest, so nothing queues up meanwhile)."""
        subscription = future.progress()
        deadline = time.monotonic() + timeout + 5.0
        while not future.done() and time.monotonic() < deadline:
            try:
                snap = subscription.get(0.5)  # short: a cancelled future ends before its subscription
            except Closed:
                return
            except TimeoutError:
                continue
            cmd.emit("progress", **progress_dict(snap))
            wait([future], timeout=PROGRESS_EVERY_S)
        try:
            cmd.emit("progress", **progress_dict(subscription.get(0)))  # the final state, if unread
        except (Closed, TimeoutError):
            pass

    def cancel(self, cmd: Command) -> dict[str, int]:
        name = cmd.arg("name", str)
        with self._lock:
            slots = list(self._gets.get(name, []))
            for slot in slots:
                slot.cancelled = True
        for slot in slots:
            if slot.future is not None:
                slot.future.cancel()
        return {"cancelled": len(slots)}


def run_control(peer: Peer) -> int:
    stop = stop_event_on_signals()
    control = PeerControl(peer)
    server = serve_control(
        control.ops(),
        {"event": "ready", "name": peer.name, "serve": peer.serve_endpoint},
        stop,
        admit={"get": control.admit_get},
    )
    peer.close()  # bye to the broker; gets still running fail with "closed"
    return finish_control(server)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the peer leaves through close() (bye)."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    # Once: the clean stop that follows (bye to the broker) must not be cut short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zswarm-peer", description="Run a zswarm peer.")
    parser.add_argument("-c", "--config", required=True, help="peer YAML config")
    parser.add_argument("--log-level", help="override the config's log_level")
    parser.add_argument(
        "--json", action="store_true", help="answer prompt commands (and a one-shot get) as JSON lines"
    )
    sub = parser.add_subparsers(dest="command")
    get = sub.add_parser("get", help="download one file and exit")
    get.add_argument("name")
    get.add_argument("--timeout", type=float, default=DEFAULT_GET_TIMEOUT_S, help="seconds before giving up")
    get.add_argument(
        SEGMENTS_FLAG, action="store_true", help="with --json: every segment's source in the answer"
    )
    sub.add_parser("serve", help="serve until Ctrl-C or SIGTERM")
    sub.add_parser("control", help="JSON-lines commands on stdin, events on stdout (for programs)")
    args = parser.parse_args(argv)

    def run_mode(peer: Peer) -> int:
        if args.command == "get":
            return run_get(peer, args.name, args.timeout, args.json, args.segments)
        if args.command == "control":
            return run_control(peer)
        if args.command == "serve":
            stop = stop_event_on_signals()
            say(json.dumps({"event": "ready", "name": peer.name, "serve": peer.serve_endpoint}))
            while not stop.wait(0.5):
                pass
            return stop.exit_status()  # 130 after Ctrl-C, 0 after SIGTERM
        try:
            return run_prompt(peer, args.json)
        except KeyboardInterrupt:
            if sys.stdin.isatty() and not args.json:
                # Off the prompt line before the shell's prompt. Not through the console's lock:
                # the interrupt may have come while a thread held it.
                sys.stdout.write("\n")
                sys.stdout.flush()
            raise

    def body() -> int:
        config = PeerConfig.from_yaml(args.config)
        setup_logging(args.log_level or config.log_level)
        # Ctrl-C and SIGTERM leave through close() (bye, clean stop); serve and control replace
        # these with their stop events once the peer runs.
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        try:
            with Peer(config) as peer:
                status = run_mode(peer)
                # Leaving now: a signal must not cut close() short before its bye is answered.
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            return status
        except Terminated:
            if args.command == "get":
                say(f"error: {args.name}: stopped by SIGTERM before it finished", sys.stderr)
                return EXIT_FAILURE
            return EXIT_OK

    return run_guarded(body)
