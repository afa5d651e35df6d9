"""The demo swarm: a broker and three peers from configs/, running the acceptance scenario.

    make demo        (or: python examples/demo.py)

It starts every process from the bundled YAML configs through the real command-line tools (the
launcher's process mode, launcher/: `python -m broker -c configs/broker.yaml --control` and
`python -m peer -c configs/peerN.yaml control`), makes sample files in the broker's share folder if
they are absent, and prints where each download's segments came from. Every peer starts empty (its
data folder is cleared first). It stops by itself, peers first, every process by its PID.

Before it touches anything, it checks that the configs' fixed ports are free: with a broker of
these configs already running, it says so in one line and exits with status 1, leaving every
folder as it was.
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker.config import BrokerConfig  # noqa: E402
from common.errors import ConfigError, ZswarmError  # noqa: E402
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
        print(f"made sample file {shown(path)} ({size} bytes)")


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


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port): a bind as the broker's would fail (with
    SO_REUSEADDR, as ZeroMQ binds, so connections lingering in TIME_WAIT do not count)."""
    if port == 0:
        return False
    host = "" if host in ("*", "0.0.0.0") else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def busy_ports(broker_cfg: BrokerConfig, peer_cfgs: list[PeerConfig]) -> str | None:
    """The first fixed port of the configs that is in use, as one line; None when all are free."""
    for port in (broker_cfg.tracker_port, broker_cfg.heartbeat_port, broker_cfg.origin_port):
        if port_in_use(broker_cfg.bind_host, port):
            return f"port {port} is in use: is a broker already running?"
    for cfg in peer_cfgs:
        if port_in_use(cfg.bind_host, cfg.serve_port):
            return f"port {cfg.serve_port} is in use: is {cfg.name} already running?"
    return None


def same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=ROOT / "configs")
    args = parser.parse_args()
    broker_cfg_path = args.configs / "broker.yaml"
    peer_cfg_paths = [args.configs / f"peer{i}.yaml" for i in (1, 2, 3)]
    try:
        broker_cfg = BrokerConfig.from_yaml(broker_cfg_path)
        peer_cfgs = [PeerConfig.from_yaml(p) for p in peer_cfg_paths]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Before touching anything (the peers' folders are cleared below): a demo already running,
    # or any broker on these ports, makes this one fail, so say so now.
    busy = busy_ports(broker_cfg, peer_cfgs)
    if busy:
        print(f"error: {busy}", file=sys.stderr)
        return 1
    try:
        return run(broker_cfg_path, peer_cfg_paths, broker_cfg, peer_cfgs)
    except ZswarmError as exc:  # LauncherError, a failed get: one line, the logs have the rest
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(
    broker_cfg_path: Path, peer_cfg_paths: list[Path], broker_cfg: BrokerConfig, peer_cfgs: list[PeerConfig]
) -> int:
    share = Path(broker_cfg.share_dir)
    run_dir = share.parent  # demo-run/ for the bundled configs
    share.mkdir(parents=True, exist_ok=True)
    make_samples(share)
    for cfg in peer_cfgs:
        shutil.rmtree(cfg.data_dir, ignore_errors=True)
    logs = run_dir / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # this run's logs only (the launcher appends)
    started = time.monotonic()
    with Swarm(run_dir, "process", log_dir=logs) as swarm:
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
        print(f"demo finished in {time.monotonic() - started:.1f} s (logs in {shown(logs)})")
        return 0 if identical else 1


def shown(path: Path) -> str:
    """`path` relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
