"""Broker and peer processes driven from Python: for the demo, the tests and load scripts.

`BrokerProcess` runs `python -m broker -c CONFIG` and reads the endpoints from its ready line.
`PeerProcess` runs `python -m peer -c CONFIG --json` and sends prompt commands on stdin, reading
one JSON line per command. A reader thread per process moves stdout lines into a queue (so every
read has a deadline); it ends when the process closes stdout. stderr goes to a log file, never to
a pipe that could fill up. `stop()` asks politely (quit / SIGTERM), then kills, always by PID.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from common.errors import ZswarmError


class ProcessError(ZswarmError):
    """A driven process died, or did not answer in time."""


class DrivenProcess:
    """A Python child process (`python ARGS`) answering with JSON lines on stdout."""

    LEAVES_ON_EOF = False  # True: closing stdin is the polite way to ask it to leave

    def __init__(
        self, args: list[str], log_path: Path, prefix: list[str] | None = None, cwd: Path | None = None
    ) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, *args],  # prefix: e.g. ip netns exec HOST (it execs)
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=cwd,
            env=env,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_stdout, name=f"stdout-{self.pid}", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line on stdout (other lines are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessError(f"pid {self.pid}: no answer within {timeout} s (log: {self.log_path})")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise ProcessError(
                    f"pid {self.pid} exited with {self.proc.wait()} (log: {self.log_path}): {self.log_tail()}"
                )
            line = line.strip()
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()  # a prompt leaves on end of input, saying bye first
            except OSError:
                pass
            self.signal(signal.SIGCONT)  # a stopped process can neither read nor hear SIGTERM
            try:
                self.proc.wait(min(timeout, 2.0) if self.LEAVES_ON_EOF else 0.0)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class BrokerProcess(DrivenProcess):
    def __init__(
        self, config: Path, log_path: Path, ready_timeout: float = 60.0, prefix: list[str] | None = None
    ) -> None:
        super().__init__(["-m", "broker", "-c", str(config)], log_path, prefix)
        try:
            ready = self.read_json(ready_timeout)
        except ProcessError:
            self.stop()
            raise
        self.tracker: str = ready["tracker"]
        self.heartbeat: str = ready["heartbeat"]
        self.origin: str = ready["origin"]


class PeerProcess(DrivenProcess):
    LEAVES_ON_EOF = True

    def __init__(
        self, config: Path, log_path: Path, ready_timeout: float = 30.0, prefix: list[str] | None = None
    ) -> None:
        super().__init__(["-m", "peer", "-c", str(config), "--json"], log_path, prefix)
        try:
            ready = self.read_json(ready_timeout)
        except ProcessError:
            self.stop()
            raise
        self.name: str = ready["name"]
        self.serve: str = ready["serve"]
        self._command_lock = threading.Lock()

    def command(self, line: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send one prompt command and return its JSON answer ({"ok": ..., "result"/"error": ...})."""
        with self._command_lock:
            if self.proc.stdin is None or self.proc.poll() is not None:
                raise ProcessError(f"peer {self.name} (pid {self.pid}) is not running")
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return self.read_json(timeout)

    def get(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Download `name`; returns the result (sources, seconds, path...) or raises ProcessError."""
        answer = self.command(f"get {name}", timeout)
        if not answer.get("ok"):
            raise ProcessError(f"peer {self.name}: get {name} failed: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result
