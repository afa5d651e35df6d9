"""Authenticated mode (issue 9): CURVE on every socket, an allow-list folder of public keys, names
bound to keys. Real processes through the launcher, with keys made by common.keygen's functions.

- the acceptance scenario (tests/test_acceptance.py) passes with every node authenticated;
- a key not on the allow-list, or no key at all, gets no answer from any socket of the broker or
  of a peer (tracker, heartbeats, origin, a peer's segment server);
- a listed peer cannot act in another's name (register as it, heartbeat as it), and cannot send
  downloaders to another host: they authenticate each source with the key the broker gave;
- the config fields are checked like every other, with file:line:column.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils import z85

from broker import BrokerConfig
from common import protocol
from common.errors import ConfigError, WireCode
from common.manifest import SEGMENT_SIZE, hash_file
from common.protocol import (
    Error,
    Get,
    Heartbeat,
    Holding,
    Ping,
    Register,
    Registered,
    SegmentRequest,
    StatsRequest,
)
from common.security import KeyPair, apply_client, generate_keypair, load_public, load_secret
from launcher import ProcessBroker, ProcessPeer, Swarm
from peer import PeerConfig
from tests.helpers import wait_until, write_random
from tests.zmtp import RssWatch

pytestmark = pytest.mark.timeout(120)

A_SIZE = 3 * 1024 * 1024 + 4321  # 193 segments, the last one short
B_SIZE = 2 * 1024 * 1024 + 17  # 129 segments
QUIET_S = 1.0  # how long "no answer at all" is watched for


@dataclass
class Keys:
    root: Path
    allow: Path  # the allow-list folder: the public keys of the listed peers

    def secret(self, name: str) -> Path:
        return self.root / name / f"{name}.key_secret"

    def public(self, name: str) -> Path:
        return self.root / name / f"{name}.key"

    def pair(self, name: str) -> KeyPair:
        return load_secret(self.secret(name))

    def broker_fields(self) -> dict[str, Any]:
        return {"secret_key_file": str(self.secret("broker")), "allow_dir": str(self.allow)}

    def peer_fields(self, name: str) -> dict[str, Any]:
        return {
            "secret_key_file": str(self.secret(name)),
            "broker_public_key_file": str(self.public("broker")),
            "allow_dir": str(self.allow),
        }


def make_keys(tmp: Path, listed: list[str], unlisted: list[str]) -> Keys:
    """A key pair per name (zswarm-keygen's function); the listed peers' public keys copied into
    the allow-list folder, as an operator would."""
    keys = Keys(tmp / "keys", tmp / "allow")
    keys.allow.mkdir(parents=True)
    for name in ["broker", *listed, *unlisted]:
        public, secret = generate_keypair(keys.root / name, name)
        assert os.stat(secret).st_mode & 0o777 == 0o600
        if name in listed:
            shutil.copy(public, keys.allow / public.name)
    return keys


# ------------------------------------------------------------------------ the acceptance scenario


def test_acceptance_scenario_in_secure_mode(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["peer1", "peer2", "peer3"], [])
    with Swarm(tmp_path, "process", broker_fields={"heartbeat_interval_s": 0.5}) as swarm:
        share = tmp_path / "share"
        originals = {
            "a.bin": write_random(share / "a.bin", A_SIZE, seed=1),
            "sub/b.bin": write_random(share / "sub" / "b.bin", B_SIZE, seed=2),
        }
        broker = swarm.start_broker(share_dir="share", manifest_dir="manifests", **keys.broker_fields())
        peers = [
            swarm.add_peer(f"peer{i}", data_dir=f"data{i}", **keys.peer_fields(f"peer{i}")) for i in (1, 2, 3)
        ]
        p1, p2, p3 = peers
        assert all(peer.files() == [] for peer in peers)
        a_segments = (A_SIZE + SEGMENT_SIZE - 1) // SEGMENT_SIZE
        b_segments = (B_SIZE + SEGMENT_SIZE - 1) // SEGMENT_SIZE

        assert p1.get("a.bin").sources == {"broker": a_segments}
        assert p2.get("a.bin").sources == {"peer1": a_segments}
        assert p1.get("sub/b.bin").sources == {"broker": b_segments}
        damaged = {3, 4, 50}
        with open(tmp_path / "data1" / "sub" / "b.bin", "r+b") as f:
            for i in damaged:
                f.seek(i * SEGMENT_SIZE + 7)
                f.write(b"\xff" * 9)
            f.truncate((b_segments - 5) * SEGMENT_SIZE)
        lost = damaged | set(range(b_segments - 5, b_segments))
        result = p2.get("sub/b.bin")
        assert result.segments_from("broker") == lost
        assert result.segments_from("peer1") == set(range(b_segments)) - lost
        result = p3.get("a.bin")
        assert set(result.sources) == {"peer1", "peer2"} and sum(result.sources.values()) == a_segments
        for data_dir, names in (
            ("data1", ["a.bin"]),
            ("data2", ["a.bin", "sub/b.bin"]),
            ("data3", ["a.bin"]),
        ):
            for name in names:
                assert (tmp_path / data_dir / name).read_bytes() == originals[name], f"{data_dir}/{name}"
        # Heartbeats go out once per interval: a scenario shorter than that has sent none yet.
        stats = wait_until(
            lambda: (s := broker.stats())["requests"]["heartbeats"] > 0 and s,
            timeout=10.0,
            what="an authenticated heartbeat counted by the broker",
        )
        assert stats["requests"]["heartbeats_refused"] == 0
        assert stats["authentication"]["accepted"] >= 3 and stats["authentication"]["refused"] == 0


# ------------------------------------------------------------ who can reach what, and as whom


@dataclass
class World:
    swarm: Swarm
    keys: Keys
    broker: ProcessBroker
    peer1: ProcessPeer
    peer2: ProcessPeer
    data: dict[str, bytes]
    ids: dict[str, bytes]
    context: zmq.Context[Any]
    broker_key: bytes  # Z85


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("secure")
    keys = make_keys(tmp, ["peer1", "peer2", "peer3", "mallory"], ["eve"])
    swarm = Swarm(tmp, "process", broker_fields={"heartbeat_interval_s": 0.25, "heartbeat_liveness": 3})
    context: zmq.Context[Any] = zmq.Context()
    try:
        data = {
            f"f{i}.bin": write_random(swarm.share_dir / f"f{i}.bin", 64 * SEGMENT_SIZE, seed=60 + i)
            for i in range(4)
        }
        data["g.bin"] = write_random(swarm.share_dir / "g.bin", 64 * SEGMENT_SIZE, seed=69)  # no peer has it
        broker = swarm.start_broker(**keys.broker_fields())
        peer1 = swarm.add_peer("peer1", request_timeout_s=1.0, **keys.peer_fields("peer1"))
        peer2 = swarm.add_peer("peer2", request_timeout_s=1.0, **keys.peer_fields("peer2"))
        for name in data:
            if name != "g.bin":
                peer1.get(name, timeout=60)
        ids = {name: hash_file(swarm.share_dir / name, name).file_id for name in data}
        assert (
            isinstance(broker, ProcessBroker)
            and isinstance(peer1, ProcessPeer)
            and isinstance(peer2, ProcessPeer)
        )
        yield World(swarm, keys, broker, peer1, peer2, data, ids, context, load_public(keys.public("broker")))
    finally:
        swarm.close()
        context.destroy(linger=0)


def curve_socket(w: World, kind: int, endpoint: str, who: str | None, server_key: bytes) -> zmq.Socket[Any]:
    """A socket of the test's own, as `who` (a key pair made above; None: no CURVE at all)."""
    sock: zmq.Socket[Any] = w.context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if who is not None:
        apply_client(sock, w.keys.pair(who), server_key)
    sock.connect(endpoint)
    return sock


def answered(sockets: list[tuple[zmq.Socket[Any], list[bytes]]], quiet_s: float = QUIET_S) -> list[int]:
    """Send on each (never blocking: a refused connection leaves a socket with no peer), then
    watch them all for `quiet_s`; the indexes of those that got anything back."""
    deadline = time.monotonic() + quiet_s
    for sock, frames in sockets:
        while time.monotonic() < deadline:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                break
            except zmq.Again:
                time.sleep(0.02)
    poller = zmq.Poller()
    for sock, _ in sockets:
        poller.register(sock, zmq.POLLIN)
    got: set[int] = set()
    while (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000) + 1):
            got.add(next(i for i, (s, _) in enumerate(sockets) if s is sock))
            sock.recv_multipart()
    return sorted(got)


@pytest.mark.parametrize("who", ["eve", None], ids=["unlisted-key", "no-key"])
def test_an_unlisted_client_gets_no_answer_from_any_socket(world: World, who: str | None) -> None:
    watch = RssWatch(world.broker.pid)
    refused_before = world.broker.stats()["authentication"]["refused"]
    ping = protocol.encode(Ping(1))
    seg = protocol.encode(SegmentRequest(world.ids["f0.bin"], 0, 1))
    peer1_key = z85.encode(hash_key(world, "peer1"))
    sockets = [
        (curve_socket(world, zmq.DEALER, world.broker.tracker, who, world.broker_key), ping),
        (curve_socket(world, zmq.REQ, world.broker.origin, who, world.broker_key), seg),
        (curve_socket(world, zmq.REQ, world.peer1.serve, who, peer1_key), seg),
    ]
    pub = curve_socket(world, zmq.PUB, world.broker.heartbeat, who, world.broker_key)
    try:
        assert answered(sockets) == [], "tracker, origin, peer: none may answer"
        before = world.broker.stats()["requests"]
        for seq in range(1, 20):  # spoofed and malformed heartbeats: none even reaches the tracker
            pub.send_multipart(protocol.encode(Heartbeat("peer1", b"\x00" * 16, seq)), zmq.NOBLOCK)
            pub.send(b"garbage", zmq.NOBLOCK)
            time.sleep(0.02)
        after = world.broker.stats()["requests"]
        for key in ("heartbeats_refused", "heartbeats_unknown", "malformed_heartbeats", "malformed"):
            assert after[key] == before[key], key
        if who is not None:  # a NULL client is refused by the mechanism, before ZAP is asked
            assert world.broker.stats()["authentication"]["refused"] > refused_before
    finally:
        for sock, _ in sockets:
            sock.close(linger=0)
        pub.close(linger=0)
    assert watch.now_growth_mib() < 50
    result = world.peer2.get("f1.bin" if who else "f2.bin", timeout=60)
    assert result.path.read_bytes() == world.data["f1.bin" if who else "f2.bin"]
    assert "peer1" in result.sources


def hash_key(w: World, name: str) -> bytes:
    """The raw public key of a node."""
    return bytes(z85.decode(load_public(w.keys.public(name))))


def test_a_listed_peer_cannot_act_in_anothers_name(world: World) -> None:
    dealer = curve_socket(world, zmq.DEALER, world.broker.tracker, "mallory", world.broker_key)
    pub = curve_socket(world, zmq.PUB, world.broker.heartbeat, "mallory", world.broker_key)
    try:
        # Its key is filed as "mallory": that is the one name it may register.
        dealer.send_multipart(protocol.encode(Register(1, "peer1", "tcp://127.0.0.1:9", ())))
        assert dealer.poll(5000)
        reply = protocol.decode(dealer.recv_multipart())
        assert isinstance(reply, Error) and reply.code == WireCode.FORBIDDEN, reply
        dealer.send_multipart(protocol.encode(Register(2, "peer3", "tcp://127.0.0.1:9", ())))
        assert dealer.poll(5000)
        assert protocol.decode(dealer.recv_multipart()).code == WireCode.FORBIDDEN  # type: ignore[attr-defined]
        dealer.send_multipart(protocol.encode(Register(3, "mallory", "tcp://127.0.0.1:9", ())))
        assert dealer.poll(5000)
        mine = protocol.decode(dealer.recv_multipart())
        assert isinstance(mine, Registered)
        # Heartbeats in peer1's name, with mallory's key (and its own token): refused.
        before = world.broker.stats()["requests"]["heartbeats_refused"]

        def refused() -> bool:
            pub.send_multipart(protocol.encode(Heartbeat("peer1", mine.token, int(time.monotonic() * 1000))))
            return bool(world.broker.stats()["requests"]["heartbeats_refused"] > before)

        wait_until(refused, timeout=10, interval=0.05, what="the heartbeat in another's name to be refused")
        stats = world.broker.stats()
        assert stats["requests"]["registers_refused"] >= 2
        assert stats["peers"]["peer1"]["endpoint"] == world.peer1.serve
    finally:
        dealer.close(linger=0)
        pub.close(linger=0)
    result = world.peer2.get("f3.bin", timeout=60)
    assert result.path.read_bytes() == world.data["f3.bin"] and "peer1" in result.sources


def test_downloaders_authenticate_each_source_by_its_key(world: World) -> None:
    """mallory registers with peer1's endpoint as its own and claims a file only the broker has.
    Without CURVE the downloaders would be sent to peer1 under mallory's name; here they connect
    as CURVE clients of mallory's key, which peer1's server does not have: the handshake fails,
    nothing reaches peer1, and the download completes from the broker."""
    dealer = curve_socket(world, zmq.DEALER, world.broker.tracker, "mallory", world.broker_key)
    try:
        fid = world.ids["g.bin"]
        dealer.send_multipart(
            protocol.encode(Register(1, "mallory", world.peer1.serve, (Holding(fid, ((0, 64),)),)))
        )
        assert dealer.poll(5000) and isinstance(protocol.decode(dealer.recv_multipart()), Registered)
        # Each source comes with its key (mallory asks for a file it does not claim to hold).
        dealer.send_multipart(protocol.encode(Get(2, "f1.bin", None)))
        assert dealer.poll(5000)
        plan = protocol.decode(dealer.recv_multipart())
        keys = {s.name: s.public_key for s in plan.sources}  # type: ignore[attr-defined]
        assert keys.get("broker") == hash_key(world, "broker")
        assert keys.get("peer1") == hash_key(world, "peer1")
        served = world.peer1.metrics()["served_requests_total"]
        result = world.peer2.get("g.bin", timeout=60)
        assert result.path.read_bytes() == world.data["g.bin"]
        assert result.sources == {"broker": 64}
        assert world.peer2.metrics()["segment_requests_total"].get("mallory", 0) >= 1  # it was sent there
        assert world.peer1.metrics()["served_requests_total"] == served  # nothing reached peer1
        dealer.send_multipart(protocol.encode(StatsRequest(3)))
        assert dealer.poll(5000)
    finally:
        dealer.close(linger=0)


# ------------------------------------------------------------------------------------ configs


def test_security_config_fields_are_checked_with_their_place(tmp_path: Path) -> None:
    keys = make_keys(tmp_path, ["p1"], [])
    loose = tmp_path / "loose.key_secret"
    shutil.copy(keys.secret("p1"), loose)
    os.chmod(loose, 0o644)
    x = tmp_path / "b.yaml"
    x.write_text(f"share_dir: s\nmanifest_dir: m\nsecret_key_file: {loose}\nallow_dir: {keys.allow}\n")
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_yaml(x)
    assert str(info.value).startswith(f"{x}:3:18: secret_key_file: ") and "chmod 600" in str(info.value)
    x.write_text(f"share_dir: s\nmanifest_dir: m\nsecret_key_file: {keys.secret('broker')}\n")
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_yaml(x)
    assert "allow_dir: required with secret_key_file" in str(info.value)
    x.write_text(f"share_dir: s\nmanifest_dir: m\nallow_dir: {tmp_path / 'nowhere'}\n")
    with pytest.raises(ConfigError) as info:
        BrokerConfig.from_yaml(x)
    assert str(info.value).startswith(f"{x}:3:12: allow_dir: ")
    # Relative paths are relative to the config file's folder, like every path field.
    x.write_text(
        "share_dir: s\nmanifest_dir: m\nsecret_key_file: keys/broker/broker.key_secret\nallow_dir: allow\n"
    )
    config = BrokerConfig.from_yaml(x)
    assert config.secure and Path(config.allow_dir or "") == keys.allow
    y = tmp_path / "p.yaml"
    y.write_text(
        f"name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: d\nsecret_key_file: {keys.secret('p1')}\n"
        f"broker_public_key_file: {keys.secret('broker')}\nallow_dir: {keys.allow}\n"
    )
    with pytest.raises(ConfigError) as info:
        PeerConfig.from_yaml(y)
    assert str(info.value).startswith(f"{y}:5:25: broker_public_key_file: ") and "secret key" in str(
        info.value
    )
    y.write_text(
        f"name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: d\nsecret_key_file: {keys.secret('p1')}\n"
    )
    with pytest.raises(ConfigError) as info:
        PeerConfig.from_yaml(y)
    lines = str(info.value).splitlines()
    assert any("broker_public_key_file: required" in line for line in lines)
    assert any("allow_dir: required" in line for line in lines)


def test_zswarm_keygen_is_a_script_of_the_project() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert 'zswarm-keygen = "common.keygen:main"' in pyproject
