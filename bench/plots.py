"""Figures from bench/results/*.json into docs/ (PNG). Needs matplotlib (`pip install -e '.[bench]'`).

    python -m bench.plots

docs/bench-swarm.png     wall time, broker upload (file copies) and CPU-s/GiB against N, swarm and
                         origin-only, every run as a dot and the median as a line
docs/bench-transfer.png  one source -> one downloader: MiB/s of the raw baselines and each zswarm case,
                         and the batch x lanes grids
docs/bench-broker.png    tracker requests/s against the echo loop, and GET round trips
Only what the result files hold is drawn: a missing file skips its figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench._util import RESULTS, ROOT, median

DOCS = ROOT / "docs"


def load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def caption(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    return (
        f"{env.get('when', '')[:16]}  commit {env.get('commit', '?')}"
        f"{'+local changes' if env.get('core_modified_since_commit') else ''}  "
        f"{env.get('cpus', '?')} CPUs  python {env.get('python', '?')}  pyzmq {env.get('pyzmq', '?')}"
    )


def swarm_figure(plt: Any, data: dict[str, Any], out: Path) -> Path:
    runs = [r for r in data["runs"] if not r.get("failed")]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    sizes = sorted({r["n"] for r in runs})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    panels = [
        ("wall_s", "wall time until all done (s)"),
        ("broker_upload_copies", "broker upload (file copies)"),
        ("cpu_s_per_gib", "CPU-seconds per GiB delivered"),
    ]
    colors = {"swarm": "tab:blue", "origin-only": "tab:orange"}
    for ax, (key, title) in zip(axes, panels, strict=True):
        for mode in modes:
            xs, ys = [], []
            for n in sizes:
                values = [r[key] for r in runs if r["mode"] == mode and r["n"] == n]
                if values:
                    ax.scatter([n] * len(values), values, color=colors.get(mode), alpha=0.35, s=18)
                    xs.append(n)
                    ys.append(median(values))
            ax.plot(xs, ys, marker="o", color=colors.get(mode), label=mode)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("N downloading peers")
        ax.set_xticks(sizes)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    size_mib = data["size_bytes"] // (1 << 20)
    fig.suptitle(f"swarm: N peers get the same {size_mib} MiB file at once (dots: runs, line: median)")
    fig.text(0.01, 0.01, caption(data), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def transfer_figure(plt: Any, data: dict[str, Any], out: Path) -> Path:
    labels: list[str] = []
    values: list[float] = []
    colors: list[str] = []
    for kind in ("raw", "raw+verify"):
        speeds = [r["mib_s"] for r in data["raw"] if r["kind"] == kind]
        if speeds:
            labels.append(f"{kind} PUSH/PULL")
            values.append(median(speeds))
            colors.append("tab:gray")
    groups: dict[tuple[str, str], list[float]] = {}
    for r in data.get("defaults", []) + data.get("variants", []):
        groups.setdefault((r["case"], r["source"]), []).append(r["mib_s"])
    for (case, kind), speeds in groups.items():
        labels.append(f"{case}\nfrom {kind}")
        values.append(median(speeds))
        colors.append("tab:blue" if kind == "broker" else "tab:green")
    grid = data.get("grid", [])
    kinds = [k for k in ("broker", "seed") if any(r["source"] == k for r in grid)]
    fig, axes = plt.subplots(
        1,
        1 + len(kinds),
        figsize=(6 + 4 * len(kinds), 5.2),
        gridspec_kw={"width_ratios": [2.2] + [1] * len(kinds)},
    )
    axes = axes if len(kinds) else [axes]
    ax = axes[0]
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f}", va="center", fontsize=7)
    ax.set_xlabel("MiB/s (median)")
    ax.set_title(
        "one source -> one downloader (gray: baselines, blue: from broker, green: from a peer)", fontsize=9
    )
    for ax, kind in zip(axes[1:], kinds, strict=True):
        cells = [r for r in grid if r["source"] == kind]
        batches = sorted({r["batch"] for r in cells})
        lanes = sorted({r["lanes"] for r in cells})
        matrix = [
            [max([r["mib_s"] for r in cells if r["batch"] == b and r["lanes"] == ln]) for ln in lanes]
            for b in batches
        ]
        im = ax.imshow(matrix, cmap="viridis", aspect="auto")
        for i in range(len(batches)):
            for j in range(len(lanes)):
                ax.text(j, i, f"{matrix[i][j]:.0f}", ha="center", va="center", color="white", fontsize=9)
        ax.set_xticks(range(len(lanes)))
        ax.set_xticklabels([str(ln) for ln in lanes])
        ax.set_yticks(range(len(batches)))
        ax.set_yticklabels([f"{b} (block {max(64, b)})" for b in batches])
        ax.set_xlabel("origin_lanes" if kind == "broker" else "lanes_per_source")
        ax.set_ylabel("batch_segments")
        ax.set_title(f"grid from {kind}, best MiB/s of the runs", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.7)
    size_mib = data["size_bytes"] // (1 << 20)
    fig.suptitle(f"{size_mib} MiB over loopback")
    fig.text(0.01, 0.01, caption(data), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def broker_figure(plt: Any, data: dict[str, Any], out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    names, rates = [], []
    for target, label in (("echo", "raw ROUTER echo"), ("broker", "zswarm tracker")):
        values = [r["req_s"] for r in data["load"] if r["target"] == target]
        if values:
            names.append(label)
            rates.append(median(values))
            ax.scatter([len(names) - 1] * len(values), values, color="black", s=12, zorder=3)
    extra = load("broker-noget")
    if extra is not None:  # the same clients without GETs in the mix, if that run was made
        for target, label in (("echo", "echo, no GETs"), ("broker", "tracker, no GETs")):
            values = [r["req_s"] for r in extra["load"] if r["target"] == target]
            if values:
                names.append(label)
                rates.append(median(values))
                ax.scatter([len(names) - 1] * len(values), values, color="black", s=12, zorder=3)
    ax.bar(range(len(rates)), rates, color=["tab:gray", "tab:blue", "silver", "lightsteelblue"][: len(rates)])
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=7, rotation=15)
    ax.set_ylabel("requests/s")
    args = data.get("args", {})
    ax.set_title(
        f"{args.get('clients')} clients x {args.get('inflight')} in flight, mix {args.get('mix')}", fontsize=9
    )
    ax = axes[1]
    rows = data.get("latency", [])
    labels = [
        f"{r['case'].replace(' holders', '')}\n{'with' if r['with_digests'] else 'no'} digests" for r in rows
    ]
    p50 = [r["rtt_ms_p50"] for r in rows]
    p95 = [r["rtt_ms_p95"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], p50, width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p95, width=0.4, label="p95")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7, rotation=15)
    ax.set_ylabel("GET round trip (ms)")
    ax.set_title(f"GET of a {data.get('big_gib', 1):g} GiB file", fontsize=9)
    ax.legend()
    fig.text(0.01, 0.01, caption(data), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(DOCS), help="folder for the PNGs (default docs/)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, figure in (("swarm", swarm_figure), ("transfer", transfer_figure), ("broker", broker_figure)):
        data = load(name)
        if data is None:
            print(f"no bench/results/{name}.json: skipped")
            continue
        made.append(figure(plt, data, out / f"bench-{name}.png"))
    for path in made:
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
