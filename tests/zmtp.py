"""A ZMTP 3.0 peer by hand, over a plain TCP socket: the attacker of tests/test_hostile.py.

libzmq would frame, buffer, reconnect and read on the attacker's behalf; this does exactly what it
is told: a NULL-mechanism greeting and READY, then frames (with MORE set or not, long or short),
and it reads only when asked. So it can send a multipart message that never ends, requests it
never reads the replies of, or a frame bigger than the server allows.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

MORE = 0x01
LONG = 0x02
COMMAND = 0x04


def greeting() -> bytes:
    mechanism = b"NULL".ljust(20, b"\x00")
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + mechanism + b"\x00" + b"\x00" * 31


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) > 255:
        return bytes([flags | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([flags, len(body)]) + body


def ready(socket_type: str) -> bytes:
    name, value = b"Socket-Type", socket_type.encode()
    body = b"\x05READY" + bytes([len(name)]) + name + struct.pack(">I", len(value)) + value
    return frame(body, COMMAND)


def host_port(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    return host.strip("[]"), int(port)


class RawZmtp:
    """One ZMTP connection. `source`: the local address to connect from (127.0.0.2 is another
    client than 127.0.0.1 to a server that tells clients apart by address)."""

    def __init__(
        self, endpoint: str, socket_type: str = "DEALER", source: str | None = None, timeout: float = 5.0
    ) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # a reader that lags
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(host_port(endpoint))
        self._buf = b""
        self.sock.sendall(greeting())
        self._read_exact(64)  # the server's greeting
        self.sock.sendall(ready(socket_type))
        flags, _ = self.read_frame()  # the server's READY
        assert flags & COMMAND, "expected the server's READY command"

    # ---- sending

    def send_message(self, frames: list[bytes]) -> None:
        data = b"".join(frame(f, MORE if i < len(frames) - 1 else 0) for i, f in enumerate(frames))
        self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_more_frames(self, total_bytes: int, frame_size: int, deadline: float) -> int:
        """Frames of `frame_size` bytes, every one with MORE set: a message that never ends.
        Returns the bytes sent (stops at `total_bytes`, a closed connection or `deadline`)."""
        chunk = frame(os.urandom(frame_size), MORE) * max(1, (256 * 1024) // (frame_size + 9))
        sent = 0
        self.sock.settimeout(1.0)
        while sent < total_bytes and time.monotonic() < deadline:
            try:
                self.sock.sendall(chunk)
            except (TimeoutError, OSError):
                break
            sent += len(chunk)
        return sent

    # ---- reading

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            data = self.sock.recv(max(65536, n - len(self._buf)))
            if not data:
                raise ConnectionError("closed by the server")
            self._buf += data
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_frame(self) -> tuple[int, bytes]:
        flags = self._read_exact(1)[0]
        size = struct.unpack(">Q", self._read_exact(8))[0] if flags & LONG else self._read_exact(1)[0]
        return flags, self._read_exact(size)

    def read_message(self, timeout: float = 5.0) -> list[bytes]:
        """The next message (COMMAND frames such as PINGs skipped)."""
        self.sock.settimeout(timeout)
        frames: list[bytes] = []
        while True:
            flags, body = self.read_frame()
            if flags & COMMAND:
                continue
            frames.append(body)
            if not flags & MORE:
                return frames

    def messages(self, timeout: float) -> Iterator[list[bytes]]:
        """Messages until none arrives within `timeout` or the connection closes."""
        while True:
            try:
                yield self.read_message(timeout)
            except (TimeoutError, ConnectionError, OSError):
                return

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server closed the connection (reads EOF or a reset) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return True
            if not data:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            parts = line.split()
            return int(parts[3]), int(parts[4])
    raise AssertionError(f"no open-file limit for {pid}")


class RssWatch:
    """The peak VmRSS growth of a process over a baseline, sampled on demand."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.base = rss_kib(pid)
        self.peak = self.base

    def sample(self) -> int:
        now = rss_kib(self.pid)
        self.peak = max(self.peak, now)
        return now

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 1024

    def now_growth_mib(self) -> float:
        return (self.sample() - self.base) / 1024
