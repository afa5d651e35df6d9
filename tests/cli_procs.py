"""The command-line tools as a user runs them: child processes on pipes (`Cli`) or on a terminal
(`PtyCli`, a pseudo-terminal, so that the prompt, readline and the progress bar behave as they do
for a person). Every wait has a deadline; `stop()` ends the child by its PID (SIGTERM, then
SIGKILL) and is idempotent, so the `processes` fixture of conftest can stop them in teardown."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def write_yaml(path: Path, fields: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False), encoding="utf-8")
    return path


def listening_socket() -> socket.socket:
    """A TCP socket listening on a free port of 127.0.0.1 (a port "in use")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


class _Child:
    proc: subprocess.Popen[bytes]
    label: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.label} still running after {timeout} s") from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL; idempotent. Returns the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
        self._cleanup()
        return self.proc.returncode

    def _cleanup(self) -> None:
        pass


class Cli(_Child):
    """`python ARGS` with stdin, stdout and stderr on pipes; output lines collected by threads."""

    def __init__(self, args: Sequence[str], cwd: Path | None = None, label: str | None = None) -> None:
        self.label = label or " ".join(args)
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env(),
        )
        self._cond = threading.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self._ended = 0
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, into: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                into.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._ended += 1
            self._cond.notify_all()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def wait_line(
        self, predicate: Callable[[str], bool], timeout: float = 20.0, stream: str = "out", what: str = ""
    ) -> str:
        """The first line of stdout (or stderr) that satisfies `predicate`."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines:
                    if predicate(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self._ended == 2:
                    raise AssertionError(
                        f"{self.label}: no {what or 'such line'} on std{stream} within {timeout} s: "
                        f"out={self.out[-10:]} err={self.err[-10:]}"
                    )
                self._cond.wait(min(left, 0.5))

    def ready(self, timeout: float = 30.0) -> dict[str, Any]:
        line = self.wait_line(lambda s: s.startswith('{"event": "ready"'), timeout, what="ready line")
        value: dict[str, Any] = json.loads(line)
        return value

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the exit and for the whole output; the exit status."""
        code = self.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return code

    def _cleanup(self) -> None:
        self.close_stdin()
        for reader in self._readers:
            reader.join(5.0)


class Screen:
    """What a terminal shows for some output: carriage returns overwrite, ESC [ K clears to the
    end of the line, other escape sequences are dropped. Lines are the finished ones; `current`
    is the line the cursor is on."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._line: list[str] = []
        self._cursor = 0
        self._escape = ""

    @property
    def current(self) -> str:
        return "".join(self._line)

    def feed(self, text: str) -> None:
        for ch in text:
            if self._escape:
                self._escape += ch
                if self._escape == "\x1b[" or (self._escape.startswith("\x1b[") and not ch.isalpha()):
                    continue
                if self._escape.startswith("\x1b[") and ch == "K":
                    del self._line[self._cursor :]
                self._escape = ""
            elif ch == "\x1b":
                self._escape = ch
            elif ch == "\r":
                self._cursor = 0
            elif ch == "\n":
                self.lines.append("".join(self._line).rstrip())
                self._line, self._cursor = [], 0
            elif ch == "\b":
                self._cursor = max(0, self._cursor - 1)
            elif ch == "\x07" or ord(ch) < 32:
                continue
            else:
                if self._cursor < len(self._line):
                    self._line[self._cursor] = ch
                else:
                    self._line.append(ch)
                self._cursor += 1


class PtyCli(_Child):
    """A command run on a pseudo-terminal (stdin, stdout and stderr all on it, 120 columns), as
    in a terminal window; `screen` is what the window shows."""

    def __init__(self, argv: Sequence[str], cwd: Path | None = None, label: str | None = None) -> None:
        self.label = label or " ".join(argv)
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        try:
            self.proc = subprocess.Popen(
                list(argv),
                stdin=slave,
                stdout=slave,
                stderr=slave,
                cwd=cwd,
                env=child_env(),
                start_new_session=True,  # the terminal is its controlling terminal, as in a window
            )
        finally:
            os.close(slave)
        self._master = master
        self._cond = threading.Condition()
        self.raw = ""
        self.screen = Screen()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._master], [], [], 0.2)
                if not ready:
                    if self.proc.poll() is not None and not self._drain_once():
                        break
                    continue
                data = os.read(self._master, 65536)
            except OSError:
                break  # EIO: the child side is closed
            if not data:
                break
            self._take(data)
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _drain_once(self) -> bool:
        ready, _, _ = select.select([self._master], [], [], 0)
        return bool(ready)

    def _take(self, data: bytes) -> None:
        text = data.decode("utf-8", "replace")
        with self._cond:
            self.raw += text
            self.screen.feed(text)
            self._cond.notify_all()

    def type_line(self, text: str) -> None:
        os.write(self._master, text.encode() + b"\r")

    def wait_for(self, predicate: Callable[[Screen], bool], timeout: float = 20.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.screen):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(
                        f"{self.label}: {what or 'condition'} not met within {timeout} s; "
                        f"screen: {self.screen.lines[-15:]} + {self.screen.current!r}"
                    )
                self._cond.wait(min(left, 0.5))

    def finish(self, timeout: float = 30.0) -> int:
        code = self.wait(timeout)
        self._reader.join(timeout)
        return code

    def _cleanup(self) -> None:
        self._reader.join(5.0)
        try:
            os.close(self._master)
        except OSError:
            pass
