"""Fixtures: brokers and peers in this process (real sockets on 127.0.0.1, ports from port 0),
and processes started through the command-line tools. Everything started here is stopped in
teardown; a test that leaves a zswarm thread running fails."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import Broker, BrokerConfig
from common.processes import BrokerProcess, PeerProcess
from peer import Peer, PeerConfig
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
def start_broker(tmp_path: Path, share: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(**overrides: Any) -> Broker:
        fields: dict[str, Any] = dict(
            share_dir=str(share),
            manifest_dir=str(tmp_path / "manifests"),
            tracker_port=0,
            heartbeat_port=0,
            origin_port=0,
            heartbeat_interval_s=0.5,  # expiry 1.75 s: no spurious eviction on a loaded machine
        )
        fields.update(overrides)
        broker = Broker(BrokerConfig(**fields)).start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.close()


@pytest.fixture
def start_peer(tmp_path: Path) -> Iterator[Callable[..., Peer]]:
    started: list[Peer] = []

    def start(name: str, broker: Broker | str, register: bool = True, **overrides: Any) -> Peer:
        endpoint = broker if isinstance(broker, str) else broker.tracker_endpoint
        fields: dict[str, Any] = dict(name=name, broker=endpoint, data_dir=str(tmp_path / name))
        fields.update(overrides)
        peer = Peer(PeerConfig(**fields)).start()
        started.append(peer)
        if register:
            assert peer.wait_registered(10), f"{name} did not register"
        return peer

    yield start
    for peer in started:
        peer.close()


@pytest.fixture
def context() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def processes() -> Iterator[list[BrokerProcess | PeerProcess]]:
    """Processes a test starts go in this list; teardown stops each by PID."""
    procs: list[BrokerProcess | PeerProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop()
