"""Fixtures: brokers and peers in this process (real sockets on 127.0.0.1, ports from port 0),
and processes started through the command-line tools. All of them start through the launcher
(launcher/): `start_broker` / `start_peer` are a thread-mode `Swarm` handing out the real `Broker`
and `Peer` objects; `process_swarm` is a process-mode `Swarm`. Everything started here is stopped
in teardown (peers before brokers); a test that leaves a zswarm thread running fails."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import zmq

from broker import Broker
from launcher import Swarm
from peer import Peer
from tests.helpers import wait_until


def _zswarm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("zswarm-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(_zswarm_threads())
    yield
    leaked = wait_until(
        lambda: [t for t in _zswarm_threads() if t not in before] == [] or None,
        timeout=5.0,
        what="zswarm threads to stop",
    )
    assert leaked


@pytest.fixture
def share(tmp_path: Path) -> Path:
    folder = tmp_path / "share"
    folder.mkdir()
    return folder


@pytest.fixture
def thread_swarm(tmp_path: Path, share: Path) -> Iterator[Swarm]:
    """A thread-mode swarm in tmp_path: the share folder is `share`, a peer's data `tmp_path/NAME`."""
    swarm = Swarm(
        tmp_path,
        "thread",
        broker_fields={
            "share_dir": str(share),
            "manifest_dir": str(tmp_path / "manifests"),
            "heartbeat_interval_s": 0.5,  # expiry 1.75 s: no spurious eviction on a loaded machine
        },
    )
    yield swarm
    swarm.close()


@pytest.fixture
def process_swarm(tmp_path: Path) -> Iterator[Swarm]:
    """A process-mode swarm in tmp_path (configs, logs and data folders all there); heartbeats
    every 0.5 s as in `thread_swarm`."""
    swarm = Swarm(tmp_path, "process", broker_fields={"heartbeat_interval_s": 0.5})
    yield swarm
    swarm.close()


@pytest.fixture
def start_broker(thread_swarm: Swarm) -> Callable[..., Broker]:
    def start(**overrides: Any) -> Broker:
        handle = thread_swarm.start_broker(**overrides)
        return handle.broker  # type: ignore[attr-defined,no-any-return]  # a ThreadBroker

    return start


@pytest.fixture
def start_peer(thread_swarm: Swarm) -> Callable[..., Peer]:
    def start(name: str, broker: Broker | str, register: bool = True, **overrides: Any) -> Peer:
        endpoint = broker if isinstance(broker, str) else broker.tracker_endpoint
        handle = thread_swarm.add_peer(name, register=register, broker=endpoint, **overrides)
        return handle.peer  # type: ignore[attr-defined,no-any-return]  # a ThreadPeer

    return start


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Stoppable(Protocol):
    def stop(self, timeout: float = ...) -> int | None: ...


@pytest.fixture
def processes() -> Iterator[list[Stoppable]]:
    """Processes (launcher handles, or anything with stop()) a test starts by hand go in this
    list; teardown stops each, newest first, by PID."""
    procs: list[Stoppable] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()
