"""The demo swarm: a broker and three peers from configs/, running the acceptance scenario.

    make demo        (or: python examples/demo.py)

It starts every process from the bundled YAML configs through the real command-line tools (the
launcher's process mode, launcher/: `python -m broker -c configs/broker.yaml --control` and
`python -m peer -c configs/peerN.yaml control`), makes sample files in the broker's share folder if
they are absent, and prints where each download's segments came from. Every peer starts empty (its
data folder is cleared first). It stops by itself, peers first, every process by its PID.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.config import BrokerConfig  # noqa: E402
from common.manifest import SEGMENT_SIZE  # noqa: E402
from launcher import Result, Swarm  # noqa: E402
from peer.config import PeerConfig  # noqa: E402

SAMPLES = {"movie.bin": 16 * 1024 * 1024 + 1234, "docs/manual.bin": 4 * 1024 * 1024 + 77}


def make_samples(share: Path) -> None:
    for i, (name, size) in enumerate(SAMPLES.items()):
        path = share / name
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(random.Random(i).randbytes(size))
        print(f"made sample file {path.relative_to(ROOT)} ({size} bytes)")


def damage(path: Path, segments: list[int], truncate_to_segment: int) -> None:
    """Overwrite some segments with junk and cut the file short: lost and damaged data."""
    with open(path, "r+b") as f:
        for i in segments:
            f.seek(i * SEGMENT_SIZE)
            f.write(os.urandom(100))
        f.truncate(truncate_to_segment * SEGMENT_SIZE)


def show(step: str, who: str, result: Result) -> None:
    parts = ", ".join(f"{n} from {src}" for src, n in sorted(result.sources.items()))
    print(f"  {step:<46} {who}: {result.size:>9} bytes in {result.seconds:.3f} s  <- {parts}")


def same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=ROOT / "configs")
    args = parser.parse_args()
    broker_cfg_path = args.configs / "broker.yaml"
    peer_cfg_paths = [args.configs / f"peer{i}.yaml" for i in (1, 2, 3)]
    broker_cfg = BrokerConfig.from_yaml(broker_cfg_path)
    peer_cfgs = [PeerConfig.from_yaml(p) for p in peer_cfg_paths]
    share = Path(broker_cfg.share_dir)
    share.mkdir(parents=True, exist_ok=True)
    make_samples(share)
    for cfg in peer_cfgs:
        shutil.rmtree(cfg.data_dir, ignore_errors=True)
    logs = ROOT / "demo-run" / "logs"
    started = time.monotonic()
    with Swarm(ROOT / "demo-run", "process", log_dir=logs) as swarm:
        broker = swarm.start_broker(config=broker_cfg_path)  # the file as it is
        print(f"broker up: tracker {broker.tracker}, origin {broker.origin} (pid {broker.pid})")
        peers = []
        for path in peer_cfg_paths:
            peers.append(swarm.add_peer(path.stem, config=path))
            print(f"{peers[-1].name} up: serving at {peers[-1].serve_endpoint} (pid {peers[-1].pid})")
        p1, p2, p3 = peers
        a, b = list(SAMPLES)
        print("\nscenario (segments by source):")
        show("1. peer1 gets A (only the broker has it)", "peer1", p1.get(a))
        show("2. peer2 gets A (peer1 has it)", "peer2", p2.get(a))
        show("3. peer1 gets B", "peer1", p1.get(b))
        b_segments = (SAMPLES[b] + SEGMENT_SIZE - 1) // SEGMENT_SIZE
        damage(Path(peer_cfgs[0].data_dir) / b, [5, 6, 40], b_segments - 10)
        print(f"  4. damaged segments 5, 6, 40 and deleted the last 10 of peer1's copy of {b}")
        show("5. peer2 gets B (damaged parts from broker)", "peer2", p2.get(b))
        show("6. peer3 gets A (peer1 and peer2 have it)", "peer3", p3.get(a))
        identical = all(
            same_bytes(share / name, Path(cfg.data_dir) / name)
            for name, cfgs in ((a, peer_cfgs), (b, peer_cfgs[1:2]))
            for cfg in cfgs
        )
        print(f"\nevery downloaded copy byte-identical to the original: {'yes' if identical else 'NO'}")
        print(f"demo finished in {time.monotonic() - started:.1f} s (logs in {logs.relative_to(ROOT)})")
        return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
