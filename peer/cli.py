"""zswarm-peer: run a peer from a YAML config.

    zswarm-peer -c peer.yaml              a prompt: get NAME, ls, remote, status, rescan, quit
    zswarm-peer -c peer.yaml get NAME     download one file and exit (progress bar on a terminal)
    zswarm-peer -c peer.yaml serve        serve what it holds until Ctrl-C / SIGTERM
    zswarm-peer -c peer.yaml control      JSON-lines commands on stdin, events on stdout

With --json, the prompt prints no prompt text and answers every command with one JSON line
(`{"ok": true, "cmd": ..., "result": ...}` or `{"ok": false, "cmd": ..., "error": ...}`), one
command at a time.

`control` is how programs (the launcher in launcher/, the tests, the benchmarks) drive a peer
process: several commands in flight at once, each answered by id, a get streaming its progress.
The protocol is described in common/cli.py; the ops are `PeerControl`'s below. A get's
cancellation is wired up before the next command is read (`PeerControl.admit_get`), so a `cancel`
sent right after a `get` always finds it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading
import time
from concurrent.futures import CancelledError, wait
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

from common.cli import (
    EXIT_FAILURE,
    Command,
    finish_control,
    run_guarded,
    serve_control,
    setup_logging,
    stop_event_on_signals,
)
from common.errors import TransferError, ZswarmError
from common.subscription import Closed
from peer.config import PeerConfig
from peer.driver import GetFuture
from peer.service import Peer
from peer.transfer import CancelledTransfer, GetResult, Progress

PROGRESS_EVERY_S = 0.1  # at most ten progress events a second per get
DEFAULT_GET_TIMEOUT_S = 3600.0

HELP = """commands:
  get NAME     download NAME from the swarm
  ls           files held here (complete and partial)
  remote       files the broker shares
  status       this peer's state and counters
  broker       the broker's statistics (live peers, origin counters, ...)
  rescan       verify the data folder again and re-register what verifies
  quit         leave (also Ctrl-D)"""


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


def _progress_bar(name: str) -> tuple[Any, Any]:
    from tqdm import tqdm

    bar = tqdm(total=0, unit="seg", desc=name, file=sys.stderr, leave=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.n = done
        bar.refresh()

    return bar, update


def run_get(peer: Peer, name: str, timeout: float) -> int:
    bar, update = _progress_bar(name) if sys.stderr.isatty() else (None, None)
    try:
        result = peer.get(name, timeout=timeout, progress=update)
    finally:
        if bar is not None:
            bar.close()
    print(describe_result(result), flush=True)
    return 0


def execute(peer: Peer, words: list[str]) -> Any:
    command, args = words[0].lower(), words[1:]
    if command == "get":
        if len(args) != 1:
            raise ValueError("usage: get NAME")
        return peer.get(args[0])
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
    if isinstance(result, str):
        return result
    return json.dumps(result, indent=2, default=str)


def run_prompt(peer: Peer, as_json: bool) -> int:
    interactive = sys.stdin.isatty() and not as_json
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history at the prompt)
        except ImportError:
            pass
        print(f"peer {peer.name} serving at {peer.serve_endpoint}; 'help' lists commands", flush=True)
    else:
        print(json.dumps({"event": "ready", "name": peer.name, "serve": peer.serve_endpoint}), flush=True)
    while True:
        try:
            line = input("zswarm> " if interactive else "")
        except EOFError:
            return 0
        try:
            words = shlex.split(line)
        except ValueError as exc:
            words, error = [], str(exc)
        else:
            error = ""
        if not words and not error:
            continue
        command = words[0].lower() if words else ""
        if command in ("quit", "exit"):
            return 0
        try:
            if error:
                raise ValueError(error)
            result = execute(peer, words)
        except (ZswarmError, ValueError, TimeoutError) as exc:
            if as_json:
                print(
                    json.dumps({"ok": False, "cmd": command, "error": str(exc), "type": type(exc).__name__}),
                    flush=True,
                )
            else:
                print(f"error: {exc}", flush=True)
            continue
        if as_json:
            payload = result_dict(result) if isinstance(result, GetResult) else result
            print(json.dumps({"ok": True, "cmd": command, "result": payload}, default=str), flush=True)
        else:
            print(render(command, result), flush=True)


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


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the clean stop must not be interrupted
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zswarm-peer", description="Run a zswarm peer.")
    parser.add_argument("-c", "--config", required=True, help="peer YAML config")
    parser.add_argument("--log-level", help="override the config's log_level")
    parser.add_argument("--json", action="store_true", help="answer prompt commands as JSON lines")
    sub = parser.add_subparsers(dest="command")
    get = sub.add_parser("get", help="download one file and exit")
    get.add_argument("name")
    get.add_argument("--timeout", type=float, default=3600.0, help="seconds before giving up")
    sub.add_parser("serve", help="serve until Ctrl-C or SIGTERM")
    sub.add_parser("control", help="JSON-lines commands on stdin, events on stdout (for programs)")
    args = parser.parse_args(argv)

    def body() -> int:
        config = PeerConfig.from_yaml(args.config)
        setup_logging(args.log_level or config.log_level)
        with Peer(config) as peer:
            if args.command == "get":
                try:
                    return run_get(peer, args.name, args.timeout)
                except ZswarmError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return EXIT_FAILURE
            if args.command == "control":
                return run_control(peer)
            if args.command == "serve":
                stop = stop_event_on_signals()
                print(
                    json.dumps({"event": "ready", "name": peer.name, "serve": peer.serve_endpoint}),
                    flush=True,
                )
                while not stop.wait(0.5):
                    pass
                return 0
            signal.signal(signal.SIGTERM, _interrupt)  # leave through close(): bye, clean stop
            status = run_prompt(peer, args.json)
            # Leaving now: a signal must not cut close() short before its bye is answered.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            return status

    return run_guarded(body)
