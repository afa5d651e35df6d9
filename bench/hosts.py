"""Swarms on emulated hosts: zswarm, libtorrent and nginx + curl side by side, same topology, same run.

    sudo .venv/bin/python -m bench.hosts                                  # 32 MiB, 100 and 20 Mbit/s,
                                                                          # N = 1,4,8,12,16, 3 runs each
    sudo .venv/bin/python -m bench.hosts --peers 1,4 --repeat 1 --rates 100   # quick
    sudo .venv/bin/python -m bench.hosts --peers 16 --rates 20 --mixed --asym
    .venv/bin/python -m bench.hosts --plot                                # timeline PNG from the JSON

Topology (bench/netns.py): every host is a network namespace with one veth into a bridge; every
host's uplink is its egress, shaped with `tc qdisc add dev eth0 root tbf rate R burst 50000 latency
50ms`. Host 0 is the origin (zswarm's broker, libtorrent's seeder with the tracker, nginx), hosts
1..N the downloaders. Link settings: `--rates 100,20` (every uplink at R Mbit/s, downlinks
unshaped), `--mixed` (origin at 100, the peers alternately 20 and 100 Mbit/s up), `--asym` (every
host 20 Mbit/s up, 100 Mbit/s down, the downlink shaped on the bridge port), `--uncapped` (nothing
shaped: what each system costs in CPU per GiB when only the machine limits it; no ideal bound, so
no "x ideal"). For each setting and N
one topology is built and the systems are run on it alternated, `--repeat` rounds, the order
rotated each round so that none always goes first.

Systems (`--systems`, default all that are installed or installable):
- zswarm: the broker in host 0 and N peers (launcher process handles: the CLIs, driven over
  their control channel), DEFAULT
  configs (only log_level WARNING; `--broker-set/--peer-set KEY=VALUE` to change any field); every
  peer registered, then all N `get` at once; timed from the first get to the last answer.
  `zswarm-origin` (not in the default list) is the same with `plan_policy: origin_only`;
  `zswarm-warm` (not in the default list) first has the same swarm get another file of the same
  size, untimed, as a long-lived swarm would have (the broker keeps what it learnt of the
  uplinks), then times the file as `zswarm` does.
- libtorrent: 2.0.8 from Debian, 256 KiB pieces, TCP only (see bench/anchors.py);
- nginx: nginx + N curls (see bench/anchors.py).

Figures per (setting, N, system): median wall time and every run's; x ideal, with the ideal
bound for a swarm max(F/u_origin, F/d_min, N*F/(u_origin + sum of the peers' u)) (for equal links
F/u: one copy through one uplink; nginx needs N copies through one uplink, its own bound is in the
JSON as `server_ideal_s`); the origin's upload in file copies, payload (as the system counts it:
zswarm's origin bytes_served, libtorrent's total_payload_upload, the bytes the curls got) and wire
(bytes host 0's veth really sent in the window, headers and retransmissions included); the share
of all uplinks used; CPU-seconds of the system's processes per GiB delivered; the machine's busy
fraction during the run (from /proc/stat: above 90% a run measures the 2 cores, not the swarm, and
is flagged `!`), and the cores busy with anything else (`other`: the machine is shared). Every run's
per-host byte timeline (10 Hz, KiB sent and received since the start) is kept in
bench/results/hosts.json; `--plot` draws one run per system as a PNG. Needs root, `ip`
and `tc`; otherwise it says why and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import anchors
from bench._util import RESULTS, ROOT, GiB, environment, make_file, overrides, write_yaml
from bench.netns import ByteSampler, HostSpec, Shaping, Topology, Window, why_not_netns
from launcher.handles import ProcessBroker, ProcessPeer, Result

ALL_SYSTEMS = ("zswarm", "libtorrent", "nginx")
BUSY_FLAG = 0.90  # machine busy fraction above which a run measures the machine


@dataclass(frozen=True)
class LinkSetting:
    name: str
    describe: str
    hosts: Callable[[int], list[HostSpec]]  # N -> the N + 1 hosts (host 0 the origin)


def uniform(rate: float | None) -> Callable[[int], list[HostSpec]]:
    return lambda n: [HostSpec(rate)] * (n + 1)


def link_settings(args: argparse.Namespace) -> list[LinkSetting]:
    out: list[LinkSetting] = []
    for rate in [float(r) for r in args.rates.split(",") if r.strip()] if args.rates else []:
        out.append(LinkSetting(f"{rate:g}mbit", f"every uplink {rate:g} Mbit/s", uniform(rate)))
    if args.uncapped:
        # What a system costs per byte when only the machine limits it (no bound to compare to).
        out.append(LinkSetting("uncapped", "no link shaped", uniform(None)))
    if args.mixed:
        out.append(
            LinkSetting(
                "mixed",
                "origin 100 Mbit/s up; peers alternately 20 and 100 Mbit/s up",
                lambda n: [HostSpec(100.0 if i % 2 == 0 else 20.0) for i in range(n + 1)],
            )
        )
    if args.asym:
        out.append(
            LinkSetting(
                "asym",
                "every host 20 Mbit/s up, 100 Mbit/s down",
                lambda n: [HostSpec(20.0, 100.0)] * (n + 1),
            )
        )
    return out


def _uplinks_bps(hosts: list[HostSpec]) -> list[float] | None:
    """Every host's uplink in bit/s; None when one is unshaped (no bound is known)."""
    ups = [h.up_mbit for h in hosts]
    return None if any(u is None for u in ups) else [u * 1e6 for u in ups if u is not None]


def ideal_seconds(hosts: list[HostSpec], size: int) -> float | None:
    """Lower bound for a perfect swarm: the origin must send one copy, the slowest downlink must take
    one, and the N copies must pass through the sum of all uplinks. None for unshaped uplinks."""
    ups = _uplinks_bps(hosts)
    if ups is None:
        return None
    bits = size * 8
    n = len(hosts) - 1
    downs = [h.down_mbit for h in hosts[1:] if h.down_mbit is not None]
    bound = max(bits / ups[0], n * bits / sum(ups))
    return max(bound, bits / (min(downs) * 1e6)) if downs else bound


def server_ideal_seconds(hosts: list[HostSpec], size: int) -> float | None:
    """Lower bound for a plain server: all N copies through the origin's uplink."""
    ups = _uplinks_bps(hosts)
    if ups is None:
        return None
    n = len(hosts) - 1
    downs = [h.down_mbit for h in hosts[1:] if h.down_mbit is not None]
    bound = n * size * 8 / ups[0]
    return max(bound, size * 8 / (min(downs) * 1e6)) if downs else bound


def _rounded(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _ratio(value: float, bound: float | None) -> float | None:
    return round(value / bound, 3) if bound else None


def _fmt(value: float | None, spec: str) -> str:
    """`value` formatted, or '-' of the same width where there is none (unshaped links)."""
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return format(value, spec) if value is not None else format("-", f">{width or 1}")


# --------------------------------------------------------------------------- zswarm


def run_zswarm(
    net: Topology,
    n: int,
    work: Path,
    file: Path,
    window: Callable[[list[int]], Window],
    timeout: float,
    peer_fields: dict[str, Any],
    broker_fields: dict[str, Any],
    origin_only: bool = False,
    warm: Path | None = None,
) -> dict[str, Any]:
    """Broker in host 0, peers in hosts 1..n, as the earlier bench.hosts ran them; with `warm`,
    the peers first get that file (untimed) in the same swarm."""
    fingerprint = core_fingerprint()
    run_dir = work / f"zswarm-{n}-{time.monotonic_ns()}"
    share = run_dir / "share"
    share.mkdir(parents=True)
    os.link(file, share / file.name)
    if warm is not None:
        os.link(warm, share / warm.name)
    procs: list[ProcessBroker | ProcessPeer] = []
    try:
        broker_yaml = write_yaml(
            run_dir / "broker.yaml",
            {
                "share_dir": str(share),
                "manifest_dir": str(work / "manifests"),  # shared: hashed once for all runs
                "bind_host": net.address(0),
                "log_level": "WARNING",
                **({"plan_policy": "origin_only"} if origin_only else {}),
                **broker_fields,
            },
        )
        broker = ProcessBroker("broker", broker_yaml, run_dir / "broker.log", prefix=net.prefix(0))
        procs.append(broker)
        peers: list[ProcessPeer] = []
        for i in range(1, n + 1):
            peer_yaml = write_yaml(
                run_dir / f"p{i}.yaml",
                {
                    "name": f"p{i}",
                    "broker": broker.tracker,
                    "data_dir": str(run_dir / f"p{i}"),
                    "bind_host": net.address(i),
                    "log_level": "WARNING",
                    **peer_fields,
                },
            )
            peers.append(
                ProcessPeer(
                    f"p{i}", peer_yaml, run_dir / f"p{i}", run_dir / f"p{i}.log", prefix=net.prefix(i)
                )
            )
            procs.append(peers[-1])
        for peer in peers:  # every peer registered before the clock starts
            if not peer.wait_registered(30):
                raise RuntimeError(f"{peer.name} did not register")
        warm_s = None
        if warm is not None:
            warm_t0 = time.monotonic()
            warmers = ThreadPoolExecutor(n)
            try:
                list(warmers.map(lambda p: p.get(warm.name, timeout), peers))
            finally:  # not `with`, as below: on Ctrl-C stopping the peers ends the gets
                warmers.shutdown(wait=False, cancel_futures=True)
            warm_s = round(time.monotonic() - warm_t0, 3)
            time.sleep(1.0)  # the warm-up's last announcements and uploads settle, untimed
        before = origin_bytes_served(peers[0].broker_stats())
        win = window([p.pid for p in procs])
        finished: dict[str, float] = {}
        t0 = win.start()

        def fetch(i: int) -> Result:
            result = peers[i - 1].get(file.name, timeout)
            finished[f"h{i}"] = round(time.monotonic() - t0, 3)
            return result

        pool = ThreadPoolExecutor(n)
        try:
            results = list(pool.map(fetch, range(1, n + 1)))
        finally:
            # Not `with`: on Ctrl-C it would wait for every get; stopping the peers ends them instead.
            pool.shutdown(wait=False, cancel_futures=True)
        wall = max(finished.values())
        win.stop(t_end=t0 + wall)
        after = origin_bytes_served(peers[0].broker_stats())
    except BaseException:
        for proc in procs:
            print(f"--- {proc.log_path.name}: {proc.client.log_tail(8)}", file=sys.stderr)
        raise
    finally:
        # Peers first and all at once (each may take its 2 s leave-on-EOF grace), the broker last.
        with ThreadPoolExecutor(max(len(procs), 1)) as stopper:
            list(stopper.map(lambda p: p.stop(), procs[1:]))
        if procs:
            procs[0].stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": round(wall, 3),
        "finished_s": finished,
        # None when the broker's stats do not carry the origin's counter: the wire copies still tell.
        "origin_payload_bytes": after - before if after is not None and before is not None else None,
        "cpu_s": round(win.cpu_seconds, 3),
        "cpu_s_by_host": {f"h{i}": win.cpu_per_pid.get(p.pid, 0.0) for i, p in enumerate(procs)},
        "t0": t0,
        "peer_seconds": {f"h{i + 1}": r.seconds for i, r in enumerate(results)},
        "sources": {f"h{i + 1}": r.sources for i, r in enumerate(results)},
        "notes": {
            "config": "defaults"
            if not (peer_fields or broker_fields)
            else {"peer": peer_fields, "broker": broker_fields},
            "plan_policy": "origin_only" if origin_only else "default",
            "warm_up_s": warm_s,
            "core_fingerprint": fingerprint,
            "timed": "from the first get sent to the last answer",
        },
    }


def core_fingerprint() -> str:
    """A short hash of the zswarm code a run starts (broker/, peer/, common/ *.py as on disk now):
    the checkout is shared and edited while a long benchmark runs, and each zswarm run loads the
    code anew, so runs are only comparable when this is equal."""
    digest = hashlib.sha1()
    for folder in ("broker", "peer", "common"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            try:
                digest.update(path.read_bytes())
            except OSError:
                continue
    return digest.hexdigest()[:12]


def origin_bytes_served(stats: dict[str, Any]) -> int | None:
    """The broker origin's payload bytes served, from the `broker` command's stats: the origin's
    counters (`origin.bytes_served`) or, failing that, a metric named for it (the stats layout has
    changed before)."""
    origin = stats.get("origin")
    if isinstance(origin, dict) and isinstance(origin.get("bytes_served"), int):
        return int(origin["bytes_served"])
    metrics = stats.get("metrics")
    if isinstance(metrics, dict):
        for key in ("origin_bytes_served_total", "origin_served_bytes_total"):
            if isinstance(metrics.get(key), int):
                return int(metrics[key])
    return None


# --------------------------------------------------------------------------- one run


def one_run(
    system: str,
    net: Topology,
    sampler: ByteSampler,
    n: int,
    work: Path,
    file: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    size = file.stat().st_size
    windows: list[Window] = []

    def window(pids: list[int]) -> Window:
        windows.append(Window(sampler, pids))
        return windows[-1]

    if system in ("zswarm", "zswarm-origin", "zswarm-warm"):
        warm = None
        if system == "zswarm-warm":
            warm = work / "warm.bin"
            if not warm.exists():
                make_file(warm, size, seed="zswarm-bench-warm")
        res = run_zswarm(
            net, n, work, file, window, args.timeout, overrides(args.peer_set), overrides(args.broker_set),
            origin_only=system == "zswarm-origin", warm=warm,
        )  # fmt: skip
    elif system == "libtorrent":
        res = anchors.run_libtorrent(
            net, n, work, file, window, args.timeout, overrides(args.lt_set), args.lt_tracker
        )
    elif system == "nginx":
        res = anchors.run_nginx(net, n, work, file, window, args.timeout)
    else:
        raise ValueError(system)
    win = windows[-1]
    t0, t_end = res["t0"], res["t0"] + res["wall_s"]
    end_mark = win.end_mark  # taken by win.stop(), after the last finish: every byte of the run is in
    hosts = net.hosts
    ideal = ideal_seconds(hosts, size)
    sent = {h: sampler.sent_between(h, t0, end_mark) for h in range(n + 1)}
    ups = _uplinks_bps(hosts)
    uplink_capacity = sum(ups) / 8 * res["wall_s"] if ups is not None else None
    busy = win.busy_fraction
    row = {
        "system": system,
        "n": n,
        "wall_s": res["wall_s"],
        "ideal_s": _rounded(ideal),
        "x_ideal": _ratio(res["wall_s"], ideal),
        "server_ideal_s": _rounded(server_ideal_seconds(hosts, size)),
        "origin_payload_copies": (
            round(res["origin_payload_bytes"] / size, 3) if res["origin_payload_bytes"] is not None else None
        ),
        "origin_wire_copies": round(sent[0] / size, 3),
        "peers_wire_copies": round(sum(v for h, v in sent.items() if h) / size, 3),
        "uplink_use": round(sum(sent.values()) / uplink_capacity, 3) if uplink_capacity else None,
        "cpu_s": res["cpu_s"],
        "cpu_s_per_gib": round(res["cpu_s"] / (n * size / GiB), 3),
        "machine_busy": round(busy, 3),
        # Cores busy with anything but this system (other sessions' work, this harness, the sampler).
        "other_cores": round(
            max(win.machine.busy_cpu_seconds - res["cpu_s"], 0.0) / win.machine.elapsed_s, 3
        ),
        "machine_busy_flag": busy > BUSY_FLAG,
        "finished_s": res["finished_s"],
        "notes": res.get("notes", {}),
        **{
            k: v
            for k, v in res.items()
            if k in ("cpu_s_by_host", "peer_seconds", "sources", "seed_status", "download_status")
        },
        "timeline": sampler.timeline(t0, t_end, n + 1),
    }
    return row


# --------------------------------------------------------------------------- reporting


def _compact_lists(text: str) -> str:
    """json.dumps(indent=2) with lists of numbers on one line (the timelines would take 100k lines)."""
    return re.sub(
        r"\[\s*(-?[\d.e+-]+(?:,\s*-?[\d.e+-]+)*)\s*\]",
        lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]",
        text,
    )


def write_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(_compact_lists(json.dumps(data, indent=2, default=str)) + "\n", encoding="utf-8")
    tmp.replace(path)


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _copies(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if not r.get("failed"):
            groups.setdefault((r["setting"], r["n"], r["system"]), []).append(r)
    out = []
    for (setting, n, system), rs in groups.items():
        med = statistics.median([r["wall_s"] for r in rs])
        out.append(
            {
                "setting": setting,
                "n": n,
                "system": system,
                "runs": len(rs),
                "median_s": round(med, 3),
                "runs_s": [r["wall_s"] for r in rs],
                "ideal_s": rs[0]["ideal_s"],
                "x_ideal": _ratio(med, rs[0]["ideal_s"]),
                "origin_payload_copies": _median_or_none([r["origin_payload_copies"] for r in rs]),
                "origin_wire_copies": round(statistics.median([r["origin_wire_copies"] for r in rs]), 3),
                "uplink_use": round(statistics.median([r["uplink_use"] or 0.0 for r in rs]), 3),
                "cpu_s_per_gib": round(statistics.median([r["cpu_s_per_gib"] for r in rs]), 3),
                "machine_busy_max": max(r["machine_busy"] for r in rs),
                "other_cores_max": max(r["other_cores"] for r in rs),
                "code_versions": len({r["notes"].get("core_fingerprint") for r in rs}),
                "flagged_runs": sum(1 for r in rs if r["machine_busy_flag"]),
            }
        )
    return out


def print_summary(summary: list[dict[str, Any]], size_mib: float) -> None:
    print(
        f"\nhosts: N downloaders get one {size_mib:g} MiB file from host 0 (medians; every run in brackets)"
    )
    head = (
        f"{'setting':<8} {'N':>3} {'system':<13} {'median s':>8} {'x ideal':>7} {'ideal s':>7}  "
        f"{'origin copies':>13} {'wire':>5} {'uplinks':>7} {'CPU-s/GiB':>9} {'busy':>5} {'other':>5}  runs s"
    )
    print(head)
    print("-" * len(head))
    for s in summary:
        flag = "!" if s["flagged_runs"] else " "
        payload = _copies(s["origin_payload_copies"], 13)
        print(
            f"{s['setting']:<8} {s['n']:>3} {s['system']:<13} {s['median_s']:>8.2f} "
            f"{_fmt(s['x_ideal'], '>7.2f')} "
            f"{_fmt(s['ideal_s'], '>7.2f')}  {payload} {s['origin_wire_copies']:>5.2f} "
            f"{s['uplink_use']:>7.0%} {s['cpu_s_per_gib']:>9.2f} {s['machine_busy_max']:>4.0%}{flag} "
            f"{s['other_cores_max']:>5.2f}  "
            f"[{', '.join(f'{v:.2f}' for v in s['runs_s'])}]"
            + ("  (zswarm code changed between these runs)" if s["code_versions"] > 1 else "")
        )
    print(
        "origin copies: payload the origin uploaded, in file copies; wire: bytes host 0's link carried "
        "(headers, retransmissions); uplinks: share of all hosts' uplink capacity used over the run; "
        f"busy: the machine's CPU (all cores = 100%), max over runs, '!' if a run exceeded {BUSY_FLAG:.0%}; "
        "other: cores busy with anything but the system measured (other work, this harness), max over runs."
    )


# --------------------------------------------------------------------------- plot


def plot(results: Path, setting: str | None, n: int | None, systems: list[str] | None) -> list[Path]:
    """Per-host timeline PNG for one (setting, N): for each system its median run, bytes sent per host
    over time (top) and send rate (bottom), one line per host, host 0 (the origin) in black."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (.venv/bin/pip install matplotlib)")
        return []
    if not results.is_file():
        print(f"plot skipped: no {results}")
        return []
    data = json.loads(results.read_text())
    rows = [r for r in data.get("rows", []) if not r.get("failed") and r.get("timeline")]
    if not rows:
        print("plot skipped: no runs with timelines")
        return []
    if setting is None or n is None:
        # Default: the largest N at the slowest uniform rate measured (where the swarms differ most).
        uniform = [r for r in rows if r["setting"].endswith("mbit")] or rows
        slowest = min(
            uniform, key=lambda r: float(r["setting"][:-4]) if r["setting"].endswith("mbit") else 1e9
        )
        setting = setting or slowest["setting"]
        n = n or max(r["n"] for r in rows if r["setting"] == setting)
    chosen = [r for r in rows if r["setting"] == setting and r["n"] == n]
    names = [
        s
        for s in (systems or list(dict.fromkeys(r["system"] for r in chosen)))
        if any(r["system"] == s for r in chosen)
    ]
    if not names:
        print(f"plot skipped: no runs for {setting} N={n}")
        return []
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 7.5), squeeze=False, sharex="col")
    mib = 1024 * 1024
    for col, system in enumerate(names):
        runs = sorted((r for r in chosen if r["system"] == system), key=lambda r: r["wall_s"])
        run = runs[len(runs) // 2]  # the median run
        tl = run["timeline"]
        t = tl["t"]
        unit = tl.get("unit_bytes", 1)
        for host, series in tl["tx"].items():
            origin = host == "h0"
            style = (
                {"color": "black", "linewidth": 2.2, "zorder": 3}
                if origin
                else {"linewidth": 0.9, "alpha": 0.75}
            )
            axes[0][col].plot(
                t, [v * unit / mib for v in series], label="h0 (origin)" if origin else None, **style
            )
            # Mean send rate over the last second (10 samples): single samples are tbf bursts.
            smooth = [
                (series[k] - series[max(0, k - 10)]) * unit * 8 / 1e6 / max(t[k] - t[max(0, k - 10)], 1e-3)
                for k in range(len(series))
            ]
            axes[1][col].plot(t, smooth, **style)
        axes[0][col].set_title(
            f"{system}: {run['wall_s']:.1f} s ({_fmt(run['x_ideal'], '.2f')}x ideal), "
            f"origin sent {run['origin_wire_copies']:.2f} copies",
            fontsize=9,
        )
        axes[0][col].set_ylabel("MiB sent since start")
        axes[1][col].set_ylabel("send rate, Mbit/s (1 s mean)")
        axes[1][col].set_xlabel("seconds since start")
        axes[0][col].legend(loc="upper left", fontsize=8)
        for row in axes:
            row[col].grid(alpha=0.3)
    fig.suptitle(
        f"bench.hosts: per-host uploads, {setting}, N = {n}, {data.get('args', {}).get('size_mib', '?')} MiB "
        f"(one line per host; median run of each system)",
        fontsize=10,
    )
    fig.tight_layout()
    out = results.parent / f"{results.stem}-timeline-{setting}-n{n}.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return [out]


# --------------------------------------------------------------------------- main


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # so that every finally (processes, namespaces) runs on SIGTERM too


def run_line(row: dict[str, Any]) -> str:
    busy = "  (!) busy machine" if row["machine_busy_flag"] else ""
    return (
        f"  round {row['round']} {row['system']:<13} {row['wall_s']:7.2f} s "
        f"({_fmt(row['x_ideal'], '.2f')}x)  "
        f"origin {_copies(row['origin_payload_copies'], 4)} copies (wire {row['origin_wire_copies']:.2f})  "
        f"uplinks {_fmt(row['uplink_use'], '.0%')}  CPU {row['cpu_s']:.2f} s  "
        f"machine busy {row['machine_busy']:.0%}{busy}"
        + (f"  code {row['notes']['core_fingerprint']}" if "core_fingerprint" in row["notes"] else "")
    )


def run_block(
    setting: LinkSetting,
    n: int,
    systems: list[str],
    work: Path,
    file: Path,
    shaping: Shaping,
    args: argparse.Namespace,
    data: dict[str, Any],
    out_path: Path,
) -> None:
    """One topology for (setting, N); the systems alternated on it, `args.repeat` rounds."""
    specs = setting.hosts(n)
    ideal = ideal_seconds(specs, file.stat().st_size)
    with Topology(specs, shaping) as net, net.sampler() as sampler:
        print(f"\n{setting.name} ({setting.describe}), N = {n}: ideal {_fmt(ideal, '.2f')} s", flush=True)
        for rep in range(args.repeat):
            # Rotated each round, so that no system always runs first (or right after another).
            order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
            for system in order:
                head = {"setting": setting.name, "n": n, "system": system, "round": rep + 1}
                try:
                    row = head | one_run(system, net, sampler, n, work, file, args)
                except Exception as exc:  # recorded; Ctrl-C and SIGTERM (KeyboardInterrupt) still stop
                    row = head | {"failed": f"{type(exc).__name__}: {exc}"}
                    print(f"  round {rep + 1} {system:<13} FAILED {row['failed']}", flush=True)
                else:
                    print(run_line(row), flush=True)
                data["rows"].append(row)
                data["summary"] = summarize(data["rows"])
                write_results(out_path, data)  # after every run: a crash keeps what was measured
                time.sleep(1.0)  # queues drain, sockets close before the next system


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hosts", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--size-mib", type=float, default=32.0)
    ap.add_argument("--peers", default="1,4,8,12,16", help="numbers of downloaders N")
    ap.add_argument("--rates", default="100,20", help="uniform uplink settings in Mbit/s ('' for none)")
    ap.add_argument(
        "--uncapped",
        action="store_true",
        help="also: no link shaped (CPU per GiB where only the machine limits)",
    )
    ap.add_argument(
        "--mixed", action="store_true", help="also: origin 100, peers alternately 20 / 100 Mbit/s"
    )
    ap.add_argument("--asym", action="store_true", help="also: every host 20 Mbit/s up, 100 Mbit/s down")
    ap.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help="of zswarm, zswarm-origin, zswarm-warm, libtorrent, nginx",
    )
    ap.add_argument("--repeat", type=int, default=3, help="rounds (systems alternated in each)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    ap.add_argument("--burst", type=int, default=50000, help="tbf burst, bytes")
    ap.add_argument("--latency-ms", type=float, default=50.0, help="tbf latency, ms")
    ap.add_argument("--peer-set", action="append", metavar="KEY=VALUE", help="zswarm peer config field")
    ap.add_argument("--broker-set", action="append", metavar="KEY=VALUE", help="zswarm broker config field")
    ap.add_argument("--lt-set", action="append", metavar="KEY=VALUE", help="libtorrent setting, every worker")
    ap.add_argument(
        "--lt-tracker", default="auto", choices=("auto", "opentracker", "python"), help="libtorrent's tracker"
    )
    ap.add_argument("--results-name", default="hosts", help="bench/results/<name>.json")
    ap.add_argument("--plot", action="store_true", help="only draw the timeline PNG from the results file")
    ap.add_argument("--plot-setting", help="setting to plot (e.g. 20mbit); default the slowest uniform rate")
    ap.add_argument("--plot-n", type=int, help="N to plot; default the largest measured")
    ap.add_argument("--plot-systems", help="systems to plot side by side (default: every one measured)")
    args = ap.parse_args(argv)
    out_path = RESULTS / f"{args.results_name}.json"
    if args.plot:
        plot(
            out_path,
            args.plot_setting,
            args.plot_n,
            args.plot_systems.split(",") if args.plot_systems else None,
        )
        return 0
    why_not = why_not_netns()
    if why_not:
        print(f"hosts benchmark skipped: {why_not}")
        return 0
    signal.signal(signal.SIGTERM, _terminate)
    size = int(args.size_mib * 1024 * 1024)
    sizes = [int(x) for x in args.peers.split(",")]
    settings = link_settings(args)
    if not settings:
        raise SystemExit("no link setting: give --rates, --mixed, --asym or --uncapped")
    systems: list[str] = []
    skipped: dict[str, str] = {}
    for system in args.systems.split(","):
        why = {"libtorrent": anchors.ensure_libtorrent, "nginx": anchors.ensure_nginx}.get(
            system, lambda: None
        )()
        if why:
            skipped[system] = why
            print(f"{system}: {why}")
        else:
            systems.append(system)
    data: dict[str, Any] = {
        "benchmark": "hosts",
        "args": vars(args),
        "environment": environment(),
        "method": {
            "shaping": f"tc qdisc add dev eth0 root tbf rate R burst {args.burst} "
            f"latency {args.latency_ms:g}ms",
            "settings": {s.name: s.describe for s in settings},
            "libtorrent": {"version": anchors.libtorrent_version() if "libtorrent" in systems else None,
                           "transport": anchors.TRANSPORT, "settings": anchors.LT_SETTINGS},
            "busy_flag": BUSY_FLAG,
        },
        "skipped": skipped,
        "rows": [],
        "summary": [],
    }  # fmt: skip
    shaping = Shaping(burst_bytes=args.burst, latency_ms=args.latency_ms)
    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; systems {systems}"
    )
    if "libtorrent" in systems:
        lt = data["method"]["libtorrent"]
        print(
            f"libtorrent {lt['version']}: {lt['transport']}, {anchors.PIECE_BYTES // 1024} KiB pieces, "
            f"DHT/LSD/UPnP/NAT-PMP off, tracker {args.lt_tracker}, other settings libtorrent's defaults"
        )
    with tempfile.TemporaryDirectory(prefix="zsb-bench-hosts-") as tmp:
        work = Path(tmp)
        file = make_file(work / "file.bin", size)
        for setting in settings:
            for n in sizes:
                run_block(setting, n, systems, work, file, shaping, args, data, out_path)
    data["summary"] = summarize(data["rows"])
    write_results(out_path, data)
    print_summary(data["summary"], args.size_mib)
    print(f"\nwrote {out_path}")
    plot(
        out_path, args.plot_setting, args.plot_n, args.plot_systems.split(",") if args.plot_systems else None
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
