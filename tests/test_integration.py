"""Broker and peers in this process, talking over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from broker import Broker
from common import protocol
from common.errors import BrokerUnavailable, NotFound, WireCode
from common.manifest import SEGMENT_SIZE, hash_file
from common.protocol import (
    Error,
    FileInfo,
    Get,
    Holding,
    Ok,
    Pong,
    Register,
    Registered,
    SegmentData,
    SegmentRequest,
)
from peer import Peer
from tests.helpers import RawClient, seed_peer, wait_until, write_random

pytestmark = pytest.mark.timeout(60)

StartBroker = Callable[..., Broker]
StartPeer = Callable[..., Peer]


def segments(size: int) -> int:
    return (size + SEGMENT_SIZE - 1) // SEGMENT_SIZE


def test_broker_then_peer_then_both(share: Path, start_broker: StartBroker, start_peer: StartPeer) -> None:
    data = write_random(share / "f.bin", 2 * 1024 * 1024 + 5, seed=3)
    n = segments(len(data))
    broker = start_broker()
    p1, p2, p3 = (start_peer(f"p{i}", broker) for i in (1, 2, 3))
    r1 = p1.get("f.bin", timeout=30)
    assert r1.sources == {"broker": n} and r1.size == len(data)
    assert r1.path.read_bytes() == data
    r2 = p2.get("f.bin", timeout=30)
    assert r2.sources == {"p1": n}
    r3 = p3.get("f.bin", timeout=30)
    assert set(r3.sources) == {"p1", "p2"}
    assert r3.path.read_bytes() == data
    assert r3.file_id == hash_file(share / "f.bin", "f.bin").file_id.hex()
    assert broker.stats()["origin"]["segments_served"] == n


def test_unknown_file_raises_not_found(share: Path, start_broker: StartBroker, start_peer: StartPeer) -> None:
    write_random(share / "x.bin", 10, seed=1)
    p1 = start_peer("p1", start_broker())
    with pytest.raises(NotFound, match=r"no-such\.bin"):
        p1.get("no-such.bin", timeout=10)


def test_start_get_returns_future_that_can_be_awaited(
    share: Path, start_broker: StartBroker, start_peer: StartPeer
) -> None:
    data = write_random(share / "f.bin", 300_000, seed=4)
    p1 = start_peer("p1", start_broker())
    progress: list[tuple[int, int]] = []

    async def fetch() -> Any:
        # A running event loop (as in Jupyter): progress is an async subscription, the future is
        # awaited, nothing blocks the loop.
        future = p1.start_get("f.bin", timeout=30)
        async for snap in future.progress():
            progress.append((snap.done, snap.segments))
        return await future

    result = asyncio.run(fetch())
    assert result.path.read_bytes() == data
    assert progress and progress[-1] == (segments(len(data)), segments(len(data)))


@pytest.mark.parametrize("size", [0, 1, SEGMENT_SIZE, SEGMENT_SIZE + 1])
def test_edge_sizes(share: Path, start_broker: StartBroker, start_peer: StartPeer, size: int) -> None:
    data = write_random(share / "deep" / "dir" / "e.bin", size, seed=size)
    broker = start_broker()
    p1, p2 = start_peer("p1", broker), start_peer("p2", broker)
    assert p1.get("deep/dir/e.bin", timeout=20).path.read_bytes() == data
    r2 = p2.get("deep/dir/e.bin", timeout=20)
    assert r2.path.read_bytes() == data
    assert r2.sources == ({"p1": segments(size)} if size else {})


def test_same_content_under_two_names_is_copied_locally(
    share: Path, start_broker: StartBroker, start_peer: StartPeer
) -> None:
    data = write_random(share / "one.bin", 100_000, seed=5)
    (share / "two.bin").write_bytes(data)
    p1 = start_peer("p1", start_broker())
    p1.get("one.bin", timeout=20)
    second = p1.get("two.bin", timeout=20)
    assert second.sources == {"local": segments(len(data))}
    assert second.path.name == "two.bin" and second.path.read_bytes() == data


def test_restarted_peer_registers_what_it_holds(
    share: Path, start_broker: StartBroker, start_peer: StartPeer, tmp_path: Path
) -> None:
    data = write_random(share / "f.bin", 500_000, seed=6)
    broker = start_broker()
    p1 = start_peer("p1", broker)
    p1.get("f.bin", timeout=20)
    p1.close()
    wait_until(lambda: "p1" not in broker.stats()["live_peers"], what="bye to take effect")
    again = start_peer("p1", broker, data_dir=str(tmp_path / "p1"))
    assert broker.stats()["peers"]["p1"]["segments"] == segments(len(data))
    assert again.files()[0]["complete"]
    r2 = start_peer("p2", broker).get("f.bin", timeout=20)
    assert r2.sources == {"p1": segments(len(data))}


def test_damaged_segment_is_not_served_and_reported_lost(
    share: Path, start_broker: StartBroker, start_peer: StartPeer, tmp_path: Path
) -> None:
    data = write_random(share / "f.bin", 40 * SEGMENT_SIZE, seed=7)
    broker = start_broker()
    p1 = start_peer("p1", broker)
    p1.get("f.bin", timeout=20)
    with open(tmp_path / "p1" / "f.bin", "r+b") as f:
        f.seek(10 * SEGMENT_SIZE)
        f.write(b"\0" * 100)
    r2 = start_peer("p2", broker).get("f.bin", timeout=20)
    assert r2.segment_sources[10] == "broker"
    assert r2.sources == {"broker": 1, "p1": 39}
    assert r2.path.read_bytes() == data
    # p1 told the broker it lost segment 10: it is no longer offered for it.
    wait_until(lambda: broker.stats()["peers"]["p1"]["segments"] == 39, what="lost report")


def test_rescan_registers_only_what_verifies(
    share: Path, start_broker: StartBroker, start_peer: StartPeer, tmp_path: Path
) -> None:
    write_random(share / "f.bin", 20 * SEGMENT_SIZE, seed=8)
    broker = start_broker()
    p1 = start_peer("p1", broker)
    p1.get("f.bin", timeout=20)
    (tmp_path / "p1" / "f.bin").unlink()
    held = p1.rescan()
    assert held == {} or set(held.values()) == {0}
    wait_until(lambda: broker.stats()["peers"]["p1"]["segments"] == 0, what="re-registration")
    r2 = start_peer("p2", broker).get("f.bin", timeout=20)
    assert r2.sources == {"broker": 20}
    # And p1 can fetch it again.
    assert p1.get("f.bin", timeout=20).sources == {"p2": 20}


def test_bye_removes_peer_at_once(share: Path, start_broker: StartBroker, start_peer: StartPeer) -> None:
    write_random(share / "f.bin", 10, seed=9)
    broker = start_broker(heartbeat_interval_s=5.0)  # eviction would take 15 s: only bye can do it
    p1 = start_peer("p1", broker)
    assert "p1" in broker.stats()["live_peers"]
    started = time.monotonic()
    p1.close()
    assert time.monotonic() - started < 2.0
    assert "p1" not in broker.stats()["live_peers"]


def test_silent_peer_is_evicted_and_no_longer_a_source(
    share: Path, start_broker: StartBroker, context: zmq.Context[Any]
) -> None:
    write_random(share / "f.bin", 5 * SEGMENT_SIZE, seed=10)
    broker = start_broker(heartbeat_interval_s=0.1, heartbeat_liveness=3)
    file_id = hash_file(share / "f.bin", "f.bin").file_id
    ghost = RawClient(context, broker.tracker_endpoint)
    asker = RawClient(context, broker.tracker_endpoint)
    try:
        # A peer that registers holding everything, then never sends a heartbeat.
        reply = ghost.request(Register(1, "ghost", "tcp://127.0.0.1:9", (Holding(file_id, ((0, 5),)),)))
        registered_at = time.monotonic()
        assert isinstance(reply, Registered)
        plan = asker.request(Get(1, "f.bin", None))
        assert isinstance(plan, FileInfo) and [s.name for s in plan.sources] == ["ghost", "broker"]
        wait_until(lambda: "ghost" not in broker.stats()["live_peers"], timeout=5, what="eviction")
        evicted_after = time.monotonic() - registered_at
        assert evicted_after >= 0.3 - 0.05  # never before interval x liveness
        plan = asker.request(Get(2, "f.bin", None))
        assert isinstance(plan, FileInfo) and [s.name for s in plan.sources] == ["broker"]
        # The evicted peer is told so when it next speaks, and may register again.
        pong = ghost.request(protocol.Ping(3))
        assert isinstance(pong, Pong) and not pong.known
    finally:
        ghost.close()
        asker.close()


def test_heartbeats_keep_a_peer_alive(share: Path, start_broker: StartBroker, start_peer: StartPeer) -> None:
    write_random(share / "f.bin", 10, seed=11)
    broker = start_broker(heartbeat_interval_s=0.2, heartbeat_liveness=3)
    start_peer("p1", broker)
    deadline = time.monotonic() + 2.0  # ten heartbeat intervals, almost three expiry periods
    while time.monotonic() < deadline:
        assert "p1" in broker.stats()["live_peers"]
        time.sleep(0.05)
    assert broker.stats()["evicted"] == 0


@pytest.mark.parametrize(
    "frames",
    [
        [b"not msgpack \xc1"],
        [b"\x93\x01\x02\x03"],  # an array, not a map
        [protocol.encode(Get(5, "f.bin", None))[0], b"extra frame"],
        [b"\x82\xa2op\xa3get\xa3rid\x05"],  # missing keys
        [b"\x83\xa2op\xa4ping\xa3rid\x05\xa3rid\x06"],  # duplicate key
        [b"\x82\xa2op\xa4ping\xa3rid\xc3"],  # bool where an int belongs
        [b"\x82\xa2op\xa4nope\xa3rid\x01"],  # unknown op
        [protocol.encode(Ok(1))[0]],  # a reply is not a request
    ],
)
def test_malformed_requests_get_an_error_and_the_loop_goes_on(
    share: Path, start_broker: StartBroker, context: zmq.Context[Any], frames: list[bytes]
) -> None:
    write_random(share / "f.bin", 10, seed=12)
    broker = start_broker()
    client = RawClient(context, broker.tracker_endpoint)
    try:
        client.send_frames(frames)
        reply = client.recv()
        assert isinstance(reply, Error) and reply.code == WireCode.MALFORMED
        good = client.request(Get(7, "f.bin", None))
        assert isinstance(good, FileInfo) and good.rid == 7
        assert broker.stats()["requests"]["malformed"] == 1
    finally:
        client.close()


def test_have_before_register_is_refused(
    share: Path, start_broker: StartBroker, context: zmq.Context[Any]
) -> None:
    write_random(share / "f.bin", 10, seed=13)
    broker = start_broker()
    client = RawClient(context, broker.tracker_endpoint)
    try:
        reply = client.request(protocol.Have(9, b"\1" * 32, ((0, 1),)))
        assert isinstance(reply, Error) and reply.code == WireCode.NOT_REGISTERED and reply.rid == 9
    finally:
        client.close()


def _req(context: zmq.Context[Any], endpoint: str, frames: list[bytes]) -> list[bytes]:
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply from the segment server"
        return sock.recv_multipart()
    finally:
        sock.close(linger=0)


def test_a_capped_link_delivers_each_reply_at_its_pace(
    share: Path, start_broker: StartBroker, context: zmq.Context[Any]
) -> None:
    # A reply leaves a capped server when its bytes would have crossed the link, the first one
    # too: a downloader measures the link's real rate from its first reply (sent at once and
    # paid for afterwards, the first reply of a 0.1 MiB/s peer looked as fast as loopback, and
    # the downloader piled seconds of work on it). A lower bound on time: no machine is too slow.
    data = write_random(share / "f.bin", 32 * SEGMENT_SIZE, seed=15)
    broker = start_broker(upload_limit_mib_s=1.0)
    file_id = hash_file(share / "f.bin", "f.bin").file_id
    pace_s = 16 * SEGMENT_SIZE / (1024 * 1024)  # 0.25 s per 16-segment reply
    started = time.monotonic()
    first = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(file_id, 0, 16)))
    )
    first_at = time.monotonic() - started
    second = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(file_id, 16, 16)))
    )
    second_at = time.monotonic() - started
    assert isinstance(first, SegmentData) and isinstance(second, SegmentData)
    assert bytes(first.payload) + bytes(second.payload) == data
    assert first_at >= pace_s and second_at >= 2 * pace_s, (first_at, second_at)
    # An error carries no payload and is not held back.
    refused = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(b"\7" * 32, 0, 1)))
    )
    assert isinstance(refused, Error) and refused.code == WireCode.NOT_HELD


def test_a_parent_whose_plan_is_on_its_way_holds_requests_for_the_file_it_will_fetch(
    share: Path, start_broker: StartBroker, start_peer: Callable[..., Peer], context: zmq.Context[Any]
) -> None:
    # Children whose plans came first ask their relay parent before its own plan is back: it
    # does not know the file yet. It refused (767 refusals in the first 0.7 s of a 16-host run,
    # their segments went to the origin); now, while a get of its own waits for its manifest,
    # it holds such a request and serves it as the segments arrive.
    data = write_random(share / "f.bin", 8 * SEGMENT_SIZE, seed=16)
    broker = start_broker()
    parent = start_peer("parent", broker)
    manifest = hash_file(share / "f.bin", "f.bin")
    request = protocol.encode(SegmentRequest(manifest.file_id, 0, 4))
    refused = protocol.decode(_req(context, parent.serve_endpoint, request))
    assert isinstance(refused, Error) and refused.code == WireCode.NOT_HELD  # no get: refused
    store = parent.store
    store.expect("f.bin")  # what starting a get does, before its plan is back
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(parent.serve_endpoint)
    try:
        sock.send_multipart(request)
        assert not sock.poll(300), "answered before the parent knew the file"
        store.begin(manifest)  # the plan came: the parent fetches the file
        store.unexpect("f.bin")  # as the agent does once the manifest is known
        fd = store.open_for_write(manifest.file_id)
        try:
            store.write_run(fd, manifest.file_id, 0, memoryview(data[: 4 * SEGMENT_SIZE]))
        finally:
            os.close(fd)
        assert sock.poll(5000), "the parked request was not served"
        reply = protocol.decode(sock.recv_multipart())
        assert isinstance(reply, SegmentData) and bytes(reply.payload) == data[: 4 * SEGMENT_SIZE]
    finally:
        sock.close(linger=0)
    store.stop_fetching(manifest.file_id)
    # Expecting ends with the get; an unknown file's request waits at most PARK_MAX_S then.
    store.expect("g.bin")
    store.unexpect("g.bin")
    other = protocol.decode(
        _req(context, parent.serve_endpoint, protocol.encode(SegmentRequest(b"\7" * 32, 0, 1)))
    )
    assert isinstance(other, Error) and other.code == WireCode.NOT_HELD


def test_origin_serves_runs_and_refuses_bad_requests(
    share: Path, start_broker: StartBroker, context: zmq.Context[Any]
) -> None:
    data = write_random(share / "f.bin", 10 * SEGMENT_SIZE + 3, seed=14)
    broker = start_broker()
    file_id = hash_file(share / "f.bin", "f.bin").file_id
    reply = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(file_id, 8, 3)))
    )
    assert isinstance(reply, SegmentData) and reply.missing == ()
    assert bytes(reply.payload) == data[8 * SEGMENT_SIZE :]
    beyond = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(file_id, 9, 3)))
    )
    assert isinstance(beyond, Error) and beyond.code == WireCode.BAD_REQUEST
    unknown = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(b"\7" * 32, 0, 1)))
    )
    assert isinstance(unknown, Error) and unknown.code == WireCode.NOT_HELD
    garbage = protocol.decode(_req(context, broker.origin_endpoint, [b"\xc1garbage"]))
    assert isinstance(garbage, Error) and garbage.code == WireCode.MALFORMED
    again = protocol.decode(
        _req(context, broker.origin_endpoint, protocol.encode(SegmentRequest(file_id, 0, 1)))
    )
    assert isinstance(again, SegmentData) and bytes(again.payload) == data[:SEGMENT_SIZE]


class LyingServer:
    """A segment server that serves altered bytes for every segment: a hostile or broken peer."""

    def __init__(self, context: zmq.Context[Any], data: bytes) -> None:
        self.data = data
        self.sock = context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lying-server")

    def __enter__(self) -> LyingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.sock.poll(50):
                    continue
                envelope_and_request = self.sock.recv_multipart()
                request = protocol.decode(envelope_and_request[2:])
                assert isinstance(request, SegmentRequest)
                start = request.first * SEGMENT_SIZE
                payload = bytearray(self.data[start : start + request.count * SEGMENT_SIZE])
                for offset in range(0, len(payload), SEGMENT_SIZE):
                    payload[offset] ^= 0xFF  # every segment has a wrong byte
                reply = SegmentData(request.file_id, request.first, request.count, (), payload=bytes(payload))
                self.sock.send_multipart(envelope_and_request[:2] + protocol.encode(reply))
                self.served += 1
        finally:
            self.sock.close(linger=0)


@pytest.fixture
def lying_server(context: zmq.Context[Any], share: Path) -> Iterator[LyingServer]:
    data = write_random(share / "f.bin", 8 * SEGMENT_SIZE, seed=15)
    with LyingServer(context, data) as server:
        yield server


def test_bytes_that_fail_verification_are_discarded_and_the_liar_reported(
    share: Path,
    start_broker: StartBroker,
    start_peer: StartPeer,
    context: zmq.Context[Any],
    lying_server: LyingServer,
) -> None:
    broker = start_broker(strike_limit=1)
    file_id = hash_file(share / "f.bin", "f.bin").file_id
    liar = RawClient(context, broker.tracker_endpoint)
    try:
        reply = liar.request(Register(1, "liar", lying_server.endpoint, (Holding(file_id, ((0, 8),)),)))
        assert isinstance(reply, Registered)
        result = start_peer("p1", broker).get("f.bin", timeout=20)
        assert lying_server.served >= 1
        assert result.path.read_bytes() == (share / "f.bin").read_bytes()
        assert result.sources == {"broker": 8}
        stats = broker.stats()
        assert stats["requests"]["bad_source"] >= 1
        assert stats["peers"]["liar"]["benched_s"] > 0
        assert "checksum" in stats["peers"]["liar"]["bench_reason"]
        plan = RawClient(context, broker.tracker_endpoint)
        try:
            later = plan.request(Get(2, "f.bin", None))
            assert isinstance(later, FileInfo) and "liar" not in [s.name for s in later.sources]
        finally:
            plan.close()
    finally:
        liar.close()


def test_manifests_are_reused_on_restart_and_rebuilt_when_changed(
    share: Path, tmp_path: Path, start_broker: StartBroker
) -> None:
    write_random(share / "a.bin", 50_000, seed=16)
    write_random(share / "b.bin", 50_000, seed=17)
    first = start_broker()
    assert (first.catalog.built, first.catalog.reused) == (2, 0)
    first_id = first.catalog.by_name("b.bin").manifest.file_id  # type: ignore[union-attr]
    first.close()
    write_random(share / "b.bin", 50_000, seed=18)  # changed content, new mtime
    second = start_broker()
    assert (second.catalog.built, second.catalog.reused) == (1, 1)
    assert second.catalog.by_name("b.bin").manifest.file_id != first_id  # type: ignore[union-attr]
    assert sorted(p.name for p in (tmp_path / "manifests").iterdir()) == ["a.bin.manifest", "b.bin.manifest"]


def test_get_without_a_broker_fails_clearly(tmp_path: Path, start_peer: StartPeer) -> None:
    # Nothing listens there: the peer cannot register, and a get says so instead of hanging.
    peer = start_peer("p1", "tcp://127.0.0.1:9", register=False, broker_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="not registered"):
        peer.get("f.bin", timeout=30)
    assert time.monotonic() - started < 5


def test_origin_only_policy_serves_everything_from_the_broker(
    share: Path, start_broker: StartBroker, start_peer: StartPeer
) -> None:
    data = write_random(share / "f.bin", 20 * SEGMENT_SIZE, seed=40)
    broker = start_broker(plan_policy="origin_only")
    start_peer("p1", broker).get("f.bin", timeout=20)
    r2 = start_peer("p2", broker).get("f.bin", timeout=20)
    assert r2.sources == {"broker": 20}  # p1 holds it, but the policy says origin only
    assert r2.path.read_bytes() == data


def test_a_slow_source_costs_little(
    share: Path, start_broker: StartBroker, start_peer: StartPeer, tmp_path: Path
) -> None:
    data = write_random(share / "f.bin", 2 * 1024 * 1024, seed=41)  # two 64-segment blocks
    broker = start_broker()
    # Two holders of the whole file from before they started (plain holders, not downloaders in
    # the file's relay trees: the plan gives each of them one block), one of them on a 0.1 MiB/s
    # uplink (its block takes it 10 s).
    for name in ("fast", "slow"):
        seed_peer(tmp_path / name, share / "f.bin", "f.bin")
    start_peer("fast", broker)
    start_peer("slow", broker, upload_limit_mib_s=0.1)
    downloader = start_peer("dl", broker)
    result = downloader.get("f.bin", timeout=30)
    assert result.path.read_bytes() == data
    # What the slow one had not delivered moved to the fast one (the next plan, a steal, a
    # timeout or an endgame copy): it sent its first probes and a few single segments at most,
    # not the 64 of its block.
    assert result.sources.get("slow", 0) <= 16
