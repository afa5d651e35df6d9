"""Test helpers: conditions with deadlines (never bare sleeps), sample files, raw sockets."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from common import protocol
from common.manifest import Manifest, hash_file
from common.protocol import Message
from peer.store import Store

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def write_random(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


class RawClient:
    """A DEALER speaking the tracker protocol by hand: for hostile-input and protocol tests."""

    def __init__(self, context: zmq.Context[Any], endpoint: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send_frames(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def request(self, msg: Message, timeout: float = 5.0) -> Message:
        self.sock.send_multipart(protocol.encode(msg))
        return self.recv(timeout)

    def recv(self, timeout: float = 5.0) -> Message:
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError("no reply from the broker")
        return protocol.decode(self.sock.recv_multipart())

    def close(self) -> None:
        self.sock.close(linger=0)


def seed_peer(data_dir: Path, source: Path, name: str) -> Manifest:
    """Give a peer a complete copy before it starts (as if it had downloaded it earlier)."""
    manifest = hash_file(source, name)
    Store(data_dir).save_manifest(manifest)
    target = data_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return manifest
