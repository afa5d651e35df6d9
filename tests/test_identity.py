"""Identity without CURVE (issue 9): the attacks of the issue's "Identity" paragraph, each played by
a real socket against a live broker process (the launcher's process mode), with real peer
processes as victims. After each: the broker is alive, a legitimate peer downloads
byte-identically, the broker's memory grew by less than 50 MiB, and the attacker got a sensible
answer (an error, an `ok` that changed nothing, or silence where silence is the defence).

What protects the peers: a registration returns a secret token that every heartbeat must carry
with a growing sequence number; every other request is tied to the connection that registered
(the ROUTER routing id), so a live name cannot be registered, said bye for or announced for from
another connection; a `bad_source` report counts only for runs planned from that source to that
reporter, one reporter alone cannot bench anyone, and a refusal makes the accused re-verify and
announce again."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from common import protocol
from common.errors import WireCode
from common.manifest import SEGMENT_SIZE, hash_file
from common.protocol import (
    BadSource,
    Bye,
    Error,
    FileInfo,
    Get,
    Have,
    Heartbeat,
    Holding,
    Lost,
    Ok,
    Register,
    Registered,
)
from launcher import ProcessBroker, ProcessPeer, Swarm
from tests.helpers import RawClient, wait_until, write_random
from tests.zmtp import RssWatch

pytestmark = pytest.mark.timeout(120)

MiB = 1024 * 1024
BOUND_MIB = 50.0
INTERVAL_S = 0.25
LIVENESS = 3
EXPIRY_S = INTERVAL_S * (LIVENESS + 0.5)
SIZE = 64 * SEGMENT_SIZE  # one planning block: a plan sends all of it to one source


@dataclass
class World:
    swarm: Swarm
    broker: ProcessBroker
    victim: ProcessPeer  # holds f0..f7
    downloader: ProcessPeer
    data: dict[str, bytes]
    ids: dict[str, bytes]
    context: zmq.Context[Any]
    watch: RssWatch
    next_file: int = 0

    def fresh(self) -> str:
        """A file the victim holds and the downloader does not."""
        name = f"f{self.next_file}.bin"
        self.next_file += 1
        return name

    def stats(self) -> dict[str, Any]:
        return self.broker.stats()

    def client(self) -> RawClient:
        return RawClient(self.context, self.broker.tracker)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("identity")
    swarm = Swarm(
        tmp,
        "process",
        broker_fields={"heartbeat_interval_s": INTERVAL_S, "heartbeat_liveness": LIVENESS},
        peer_fields={"request_timeout_s": 1.0},
    )
    context: zmq.Context[Any] = zmq.Context()
    try:
        data = {f"f{i}.bin": write_random(swarm.share_dir / f"f{i}.bin", SIZE, seed=40 + i) for i in range(8)}
        data["g.bin"] = write_random(swarm.share_dir / "g.bin", SIZE, seed=49)  # no peer holds it
        broker = swarm.start_broker()
        victim = swarm.add_peer("victim")
        for name in data:
            if name != "g.bin":
                victim.get(name, timeout=60)
        downloader = swarm.add_peer("downloader")
        ids = {name: hash_file(swarm.share_dir / name, name).file_id for name in data}
        assert isinstance(broker, ProcessBroker) and isinstance(victim, ProcessPeer)
        assert isinstance(downloader, ProcessPeer)
        yield World(swarm, broker, victim, downloader, data, ids, context, RssWatch(broker.pid))
    finally:
        swarm.close()
        context.destroy(linger=0)


@pytest.fixture
def attacker(world: World) -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def connect(world: World, clients: list[RawClient]) -> RawClient:
    client = world.client()
    clients.append(client)
    return client


def legit_download(world: World, from_victim: bool = True) -> None:
    assert world.broker.alive and world.victim.alive
    name = world.fresh()
    result = world.downloader.get(name, timeout=60)
    assert result.path.read_bytes() == world.data[name]
    if from_victim:
        assert "victim" in result.sources, result.sources
    world.watch.sample()
    print(f"[rss] broker peak growth since the module started: {world.watch.growth_mib:.1f} MiB")
    assert world.watch.growth_mib < BOUND_MIB


def segments_of(world: World, name: str) -> int:
    peers = world.stats()["peers"]
    return int(peers[name]["segments"]) if name in peers else -1


# ----------------------------------------------------------------------------- heartbeats


def test_a_dead_peer_cannot_be_kept_alive_with_its_name(world: World, tmp_path: Path) -> None:
    """Before: `hb` carried only a name, so anyone could keep a dead peer on every plan. Now a
    heartbeat needs the registration's secret token: the spoofed ones are refused and counted,
    and the dead peer is evicted on time."""
    ghost = world.swarm.add_peer("ghost")
    assert isinstance(ghost, ProcessPeer)
    pub = world.context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(world.broker.heartbeat)
    try:
        refused_before = world.stats()["requests"]["heartbeats_refused"]
        ghost.signal(signal.SIGKILL)
        ghost.wait(10)
        killed = time.monotonic()
        seq = 10**6
        while "ghost" in world.stats()["live_peers"]:
            for token in (os.urandom(16), b"\x00" * 16):
                seq += 1
                pub.send_multipart(protocol.encode(Heartbeat("ghost", token, seq)))
            time.sleep(INTERVAL_S / 5)
            assert time.monotonic() - killed < EXPIRY_S + 3.0, "the spoofed heartbeats kept it alive"
        assert world.stats()["requests"]["heartbeats_refused"] > refused_before
    finally:
        pub.close(linger=0)
        ghost.stop()
    legit_download(world)


def test_replayed_heartbeats_are_refused(world: World, attacker: list[RawClient]) -> None:
    """A heartbeat seen on the wire, sent again (or an older one): its sequence number does not
    grow, so it is refused; the peer whose beats they were is evicted once its real beats stop."""
    client = connect(world, attacker)
    reply = client.request(Register(1, "replayer", "tcp://127.0.0.1:9", ()))
    assert isinstance(reply, Registered) and len(reply.token) == 16
    pub = world.context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(world.broker.heartbeat)
    try:
        beat = protocol.encode(Heartbeat("replayer", reply.token, 5))
        # PUB/SUB loses what is sent before the subscription: until one beat counted, send more.
        seq = 5
        wait_until(
            lambda: (
                pub.send_multipart(protocol.encode(Heartbeat("replayer", reply.token, seq)))
                or world.stats()["requests"]["heartbeats"] > 0
            ),
            what="a heartbeat to arrive",
        )
        before = world.stats()["requests"]["heartbeats_refused"]
        last_valid = time.monotonic()
        while "replayer" in world.stats()["live_peers"]:
            pub.send_multipart(beat)  # the same beat, again and again
            pub.send_multipart(protocol.encode(Heartbeat("replayer", reply.token, 1)))  # an older one
            time.sleep(INTERVAL_S / 5)
            assert time.monotonic() - last_valid < EXPIRY_S + 3.0, "replayed heartbeats kept it alive"
        assert world.stats()["requests"]["heartbeats_refused"] > before
    finally:
        pub.close(linger=0)
    legit_download(world)


# ------------------------------------------------------------------------- names and requests


def test_a_live_name_cannot_be_taken_nor_said_bye_for(world: World, attacker: list[RawClient]) -> None:
    """Before: `register` under a live name replaced that peer (then a `bye` dropped it). Now the
    name stays with the connection that holds it: the attacker gets `name_taken`, and its `bye`
    (or `have`, `lost`, `bad_source`) speaks for nobody."""
    endpoint = world.victim.serve
    client = connect(world, attacker)
    reply = client.request(Register(1, "victim", "tcp://127.0.0.1:9", ()))
    assert isinstance(reply, Error) and reply.code == WireCode.NAME_TAKEN
    fid = world.ids["f7.bin"]
    for request in (
        Have(2, fid, ((0, 1),)),
        Lost(3, fid, ((0, 64),)),
        BadSource(4, fid, "victim", ((0, 64),), "checksum"),
    ):
        reply = client.request(request)
        assert isinstance(reply, Error) and reply.code == WireCode.NOT_REGISTERED, reply
    assert isinstance(client.request(Bye(5)), Ok)  # always ok: it just concerns nobody
    stats = world.stats()
    assert "victim" in stats["live_peers"] and stats["peers"]["victim"]["endpoint"] == endpoint
    assert stats["peers"]["victim"]["segments"] == 8 * 64
    legit_download(world)


def test_reports_count_only_for_runs_planned_to_the_reporter(world: World, attacker: list[RawClient]) -> None:
    """Before: one `bad_source ... refused` naming all of a peer's runs stripped its holdings for
    good. Now a report about runs never planned from that source to that reporter is ignored
    (`ok`, counted); a refusal of planned runs drops the claim on those only, and the accused
    re-verifies and announces them again (its next pong asks it to), so the loss lasts seconds."""
    name = "f6.bin"
    fid = world.ids[name]
    client = connect(world, attacker)
    assert isinstance(client.request(Register(1, "mallory", "tcp://127.0.0.1:9", ())), Registered)
    ignored = world.stats()["requests"]["bad_reports_ignored"]
    reply = client.request(BadSource(2, fid, "victim", ((0, 64),), "refused"))
    assert isinstance(reply, Ok)
    assert world.stats()["requests"]["bad_reports_ignored"] == ignored + 1
    assert segments_of(world, "victim") == 8 * 64  # nothing happened to the victim
    # With a plan: the report counts, for what was planned from the victim to mallory.
    plan = client.request(Get(3, name, None))
    assert isinstance(plan, FileInfo)
    names = [s.name for s in plan.sources]
    planned = [(f, c) for f, c, i in plan.plan if names[i] == "victim"]
    assert planned, plan.plan
    assert isinstance(client.request(BadSource(4, fid, "victim", tuple(planned), "refused")), Ok)
    stripped = sum(c for _, c in planned)
    assert segments_of(world, "victim") == 8 * 64 - stripped
    # ... and the victim announces them again by itself within a ping period or two.
    wait_until(lambda: segments_of(world, "victim") == 8 * 64, timeout=10, what="the victim's re-announce")
    legit_download(world)


def test_one_reporter_cannot_bench_a_peer(world: World, attacker: list[RawClient]) -> None:
    """Before: three reports from anyone benched a peer for 30 s. Now one reporter's strikes
    count for at most strike_limit - 1: however many it sends, the victim is not benched."""
    name = "f5.bin"
    fid = world.ids[name]
    client = connect(world, attacker)
    assert isinstance(client.request(Register(1, "slanderer", "tcp://127.0.0.1:9", ())), Registered)
    plan = client.request(Get(2, name, None))
    assert isinstance(plan, FileInfo)
    names = [s.name for s in plan.sources]
    planned = [(f, c) for f, c, i in plan.plan if names[i] == "victim"]
    assert planned
    for rid in range(3, 13):
        reply = client.request(BadSource(rid, fid, "victim", ((planned[0][0], 1),), "checksum"))
        assert isinstance(reply, Ok)
    stats = world.stats()
    assert stats["peers"]["victim"]["benched_s"] == 0
    wait_until(lambda: segments_of(world, "victim") == 8 * 64, timeout=10, what="the victim's re-announce")
    legit_download(world)


def test_a_claim_to_be_elsewhere_costs_downloaders_little(
    world: World, attacker: list[RawClient], tmp_path: Path
) -> None:
    """A registered peer can name any host:port as its endpoint and claim everything (without
    CURVE nothing proves who listens there). The downloaders sent there get no valid reply,
    report it, and finish from the others; the claim is dropped for what was planned. (With
    CURVE, a downloader authenticates the source by the key the broker gave: tests/test_secure.py.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []

    def accept() -> None:
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        name = "g.bin"  # only the broker has it: the plan sends the downloader to the claimant
        fid = world.ids[name]
        client = connect(world, attacker)
        third_party = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        reply = client.request(Register(1, "redirector", third_party, (Holding(fid, ((0, 64),)),)))
        assert isinstance(reply, Registered)
        result = world.downloader.get(name, timeout=60)
        assert result.path.read_bytes() == world.data[name]
        assert result.sources == {"broker": 64}
        assert world.downloader.metrics()["segment_requests_total"].get("redirector", 0) >= 1
        assert 1 <= len(accepted) <= 8  # sent there: a few lanes tried, then the source given up
    finally:
        listener.close()
        thread.join(2)
        for conn in accepted:
            conn.close()
    world.watch.sample()
    assert world.watch.growth_mib < BOUND_MIB
