"""Predict swarm times with the in-memory swarm: `python -m sim`.

    python -m sim --peers 16 --size-mib 32 --up-mbit 20          one swarm
    python -m sim --peers 16,100,1000 --links uniform,mixed,asym  a curve (time / ideal against N)
    python -m sim ... --plot docs/sim-curve.png                   and a plot of it
    python -m sim --peers 16 --links mixed --up-mbit 20 --files 2 two files, one after the other

Every host's uplink is `--up-mbit` (the origin's too); `mixed`: the origin and every other peer
at `--fast-mbit`, the rest at `--up-mbit`; `asym`: every host `--up-mbit` up and `--down-mbit`
down. Peers start their `get` within 50 ms of each other (seeded, so runs repeat exactly).
Settings are the defaults of the real configs (BrokerConfig, PeerConfig): what runs here is what
users run. The ideal bound for a file of F bytes is max(F / u_origin, F / d_min,
N F / (u_origin + sum of the peers' u)). Results also go to bench/results/sim.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import platform
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.checkout import CORE, git_state
from sim.swarm import DEFAULT_LATENCY_S, SimPeer, SimSettings, SimSwarm

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
MIB = 1 << 20
# The collector's first generation, while a swarm runs: a simulated swarm allocates millions of
# short-lived containers (events, messages, requests) and few cycles; at CPython's default of
# 700 the collector took 12% of the time of 1,000 x 128 MiB (1 MiB segments), at 100,000 under 2%.
GC_GEN0 = 100_000


@contextlib.contextmanager
def _collect_less() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(GC_GEN0, before[1], before[2])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def run_one(
    n: int,
    links: str,
    size: int,
    up_mbit: float,
    fast_mbit: float,
    down_mbit: float,
    seed: int,
    segment_kib: int = 16,
    latency_ms: float = DEFAULT_LATENCY_S * 1000,
    files: int = 1,
) -> list[dict[str, Any]]:
    """One swarm: `n` downloaders get `files` files of `size` bytes one after another (each once
    the last has finished; the tracker keeps what it learnt of the peers). A row per file."""
    up = up_mbit * 1e6
    origin_up = fast_mbit * 1e6 if links == "mixed" else up
    down = down_mbit * 1e6 if links == "asym" else math.inf
    settings = SimSettings.defaults()
    if segment_kib != 16:
        settings = settings.coarse(segment_kib * 1024)
    sw = SimSwarm(settings, origin_up_bps=origin_up, seed=seed, latency_s=latency_ms / 1000)
    names = ["f.bin"] if files == 1 else [f"f{i}.bin" for i in range(1, files + 1)]
    manifests = [sw.add_file(name, size) for name in names]
    ups: list[float] = []
    peers = []
    for i in range(1, n + 1):
        peer_up = (fast_mbit * 1e6 if i % 2 else up) if links == "mixed" else up
        ups.append(peer_up)
        peers.append(sw.add_peer(f"p{i}", peer_up, down))
    sw.run(0.5)  # every peer registered
    rng = random.Random(seed)
    bits = size * 8
    ideal = max(bits / origin_up, bits / down if down != math.inf else 0.0, n * bits / (origin_up + sum(ups)))
    rows = []
    for index, (name, manifest) in enumerate(zip(names, manifests, strict=True), start=1):
        start = sw.clock.now
        for peer in peers:
            sw.clock.at(start + rng.uniform(0, 0.05), peer.start_download, name)
        events_before = sw.clock.events if index > 1 else 0  # the first file's count includes registering
        requests_before = _requests(peers)
        origin_before = sw.broker_host.payload_sent
        wall0 = time.perf_counter()
        with _collect_less():
            done = sw.run_until_done(name, peers, 3600.0)
        wall = time.perf_counter() - wall0
        times = [p.done_at.get(name, math.nan) for p in peers]
        finished = max(times) if done and not any(math.isnan(t) for t in times) else math.nan
        rows.append(
            {
                "n": n,
                "links": links,
                "size_mib": size / MIB,
                "up_mbit": up_mbit,
                "segment_kib": segment_kib,
                "latency_ms": latency_ms,
                "file": index,
                "seconds": round(finished, 3),
                "ideal_s": round(ideal, 3),
                "vs_ideal": round(finished / ideal, 3),
                "origin_copies": round((sw.broker_host.payload_sent - origin_before) / manifest.size, 3),
                "failed": sum(1 for p in peers if name in p.errors),
                "requests": int(_requests(peers) - requests_before),
                "events": sw.clock.events - events_before,
                "wall_s": round(wall, 2),
            }
        )
        if index < len(names):
            sw.run(sw.clock.now + 1.0)  # the finished downloads' last announcements settle
    return rows


def _requests(peers: list[SimPeer]) -> float:
    return float(sum(p.metrics.snapshot().total("segment_requests_total") for p in peers))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["links"], r["up_mbit"]) for r in rows}):
        series = sorted((r["n"], r["vs_ideal"]) for r in rows if (r["links"], r["up_mbit"]) == key)
        label = f"{key[0]}, {key[1]:g} Mbit/s" if key[0] != "mixed" else "mixed (half 100, half 20 Mbit/s)"
        ax.plot([n for n, _ in series], [v for _, v in series], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("downloaders N")
    ax.set_ylabel("time / ideal bound")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title("in-memory swarm: time against the ideal bound")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def code_measured() -> dict[str, Any]:
    """When, and which code: the commit and whether the cores (broker/, peer/, common/, sim/)
    differ from it, as the benchmarks record it."""
    commit, modified = git_state((*CORE, "sim"))
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "commit": commit,
        "core_modified_since_commit": modified,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--peers", default="16", help="downloaders N, comma-separated")
    ap.add_argument("--size-mib", type=float, default=32.0)
    ap.add_argument("--links", default="uniform", help="uniform, mixed, asym (comma-separated)")
    ap.add_argument(
        "--up-mbit", default="100", help="uplink Mbit/s, comma-separated (the slow one for mixed)"
    )
    ap.add_argument("--fast-mbit", type=float, default=100.0, help="mixed: the fast uplinks and the origin's")
    ap.add_argument("--down-mbit", type=float, default=100.0, help="asym: every downlink")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--segment-kib",
        type=int,
        default=16,
        help="coarse mode: simulate segments this large (a multiple of 16), for big files and swarms",
    )
    ap.add_argument(
        "--latency-ms",
        default="0.1",
        help="every host's one-way delay in ms, comma-separated (a round trip takes twice this)",
    )
    ap.add_argument(
        "--files",
        type=int,
        default=1,
        help="files got one after another in one swarm (a row each; the tracker keeps what it learnt)",
    )
    ap.add_argument("--plot", type=Path, help="draw time / ideal against N into this PNG")
    ap.add_argument("--results-name", default="sim", help="bench/results/<name>.json")
    args = ap.parse_args(argv)
    if args.files < 1:
        ap.error(f"--files {args.files}: at least 1")
    if args.segment_kib != 16:
        try:
            SimSettings.defaults().coarse(args.segment_kib * 1024)
        except ValueError as e:
            ap.error(f"--segment-kib {args.segment_kib}: {e}")
    measured = code_measured()
    logging.basicConfig(level=logging.ERROR)  # timeouts, evictions: the table says what matters
    size = int(args.size_mib * MIB)
    rows: list[dict[str, Any]] = []
    header = ("N", "links", "up", "lat ms", "time s", "ideal s", "x ideal", "origin", "wall s")
    print("{:>5} {:<8} {:>5} {:>6} {:>8} {:>8} {:>7} {:>6} {:>7}".format(*header))
    for links in args.links.split(","):
        for up_mbit in [float(x) for x in args.up_mbit.split(",")]:
            for latency_ms in [float(x) for x in args.latency_ms.split(",")]:
                for n in [int(x) for x in args.peers.split(",")]:
                    for row in run_one(
                        n,
                        links,
                        size,
                        up_mbit,
                        args.fast_mbit,
                        args.down_mbit,
                        args.seed,
                        args.segment_kib,
                        latency_ms,
                        args.files,
                    ):
                        rows.append(row)
                        print(
                            f"{n:>5} {links:<8} {up_mbit:>5g} {latency_ms:>6g} {row['seconds']:>8.2f} "
                            f"{row['ideal_s']:>8.2f} {row['vs_ideal']:>7.2f} {row['origin_copies']:>6.2f} "
                            f"{row['wall_s']:>7.1f}"
                            + (f"  file {row['file']}" if args.files > 1 else "")
                            + (f"  ({row['failed']} failed)" if row["failed"] else ""),
                            flush=True,
                        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{args.results_name}.json"
    out.write_text(
        json.dumps(
            {
                "benchmark": "sim",
                "args": {k: str(v) for k, v in vars(args).items()},
                "environment": {**measured, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
