"""The acceptance scenario, with real processes started from YAML configs through the CLIs (the
launcher's process mode: it writes each YAML file and runs `python -m broker -c FILE --control` and
`python -m peer -c FILE control`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from common.manifest import SEGMENT_SIZE
from launcher import ProcessBroker, ProcessPeer, Swarm
from tests.helpers import write_random

pytestmark = pytest.mark.timeout(120)

A_SIZE = 3 * 1024 * 1024 + 4321  # 193 segments, the last one short
B_SIZE = 2 * 1024 * 1024 + 17  # 129 segments


def test_acceptance_scenario(tmp_path: Path, process_swarm: Swarm) -> None:
    share = tmp_path / "share"
    originals = {
        "a.bin": write_random(share / "a.bin", A_SIZE, seed=1),
        "sub/b.bin": write_random(share / "sub" / "b.bin", B_SIZE, seed=2),
    }
    broker = process_swarm.start_broker(
        share_dir="share",  # relative to the YAML file's folder
        manifest_dir="manifests",
        tracker_port=0,
        heartbeat_port=0,
        origin_port=0,
        heartbeat_interval_s=0.5,
    )
    assert isinstance(broker, ProcessBroker)
    written = yaml.safe_load((tmp_path / "broker.yaml").read_text())
    assert written["share_dir"] == "share" and broker.config_path == tmp_path / "broker.yaml"

    # 1. broker and three peers start; no peer holds anything.
    peers: list[ProcessPeer] = []
    for i in (1, 2, 3):
        peer = process_swarm.add_peer(
            f"peer{i}", broker=broker.tracker_endpoint, data_dir=f"data{i}", serve_port=0
        )
        assert isinstance(peer, ProcessPeer) and peer.config_path == tmp_path / f"peer{i}.yaml"
        peers.append(peer)
    p1, p2, p3 = peers
    for peer in peers:
        listing = peer.files()
        assert listing == []

    a_segments = (A_SIZE + SEGMENT_SIZE - 1) // SEGMENT_SIZE
    b_segments = (B_SIZE + SEGMENT_SIZE - 1) // SEGMENT_SIZE

    # 2. peer 1 gets A: every segment comes from the broker.
    result = p1.get("a.bin")
    assert result.sources == {"broker": a_segments}

    # 3. peer 2 gets A: every segment comes from peer 1.
    result = p2.get("a.bin")
    assert result.sources == {"peer1": a_segments}

    # 4. peer 1 gets B; some of its segments are then damaged or deleted on peer 1's disk.
    result = p1.get("sub/b.bin")
    assert result.sources == {"broker": b_segments}
    b_on_p1 = tmp_path / "data1" / "sub" / "b.bin"
    damaged = {3, 4, 50}
    with open(b_on_p1, "r+b") as f:
        for i in damaged:
            f.seek(i * SEGMENT_SIZE + 7)
            f.write(b"\xff" * 9)
        f.truncate((b_segments - 5) * SEGMENT_SIZE)  # the last 5 segments are gone
    lost = damaged | set(range(b_segments - 5, b_segments))

    # 5. peer 2 gets B: the damaged segments come from the broker, the rest from peer 1.
    result = p2.get("sub/b.bin")

    def segments_from(source: str) -> set[int]:
        return {i for first, count in result.source_runs.get(source, []) for i in range(first, first + count)}

    assert segments_from("broker") == lost
    assert segments_from("peer1") == set(range(b_segments)) - lost

    # 7. with peers 1 and 2 holding A, peer 3 gets A and its segments come from both.
    result = p3.get("a.bin")
    assert set(result.sources) == {"peer1", "peer2"}
    assert sum(result.sources.values()) == a_segments

    # 6. every downloaded file is byte-identical to the original.
    for data_dir, names in (("data1", ["a.bin"]), ("data2", ["a.bin", "sub/b.bin"]), ("data3", ["a.bin"])):
        for name in names:
            assert (tmp_path / data_dir / name).read_bytes() == originals[name], f"{data_dir}/{name}"
    # Nothing but finished files (and the hidden metadata folder) in a data folder.
    assert sorted(os.listdir(tmp_path / "data2")) == [".zswarm", "a.bin", "sub"]
