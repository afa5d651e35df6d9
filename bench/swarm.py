"""A broker and N peer processes all getting the same file at once, against an origin-only baseline.

    python -m bench.swarm                           # 256 MiB, N = 1, 4, 8, 2 runs each
    python -m bench.swarm --size-mib 32 --peers 1,4 --repeat 1     # quick

Modes (interleaved, each run with fresh broker and peer processes):
- swarm        the shipped configs: peers first, the broker's origin as the fallback (with origin
               claims / super-seeding), peers announce segments and serve each other.
- origin-only  the same broker and the same N peer processes, with `plan_policy: origin_only`:
               every plan names only the origin, so the broker is a plain central server through
               the same code path (origin, lanes, downloader) and only the peer-to-peer part is off.
               (On a core without plan_policy it falls back to own-origin below.)
- own-origin   (not run by default) each of the N peers has a broker of its own (same share folder):
               N independent one-source transfers at once, the best a central server spread over
               N processes could do on this machine.

Figures: wall time from the first `get` sent to the last answer; broker upload in file copies
(origin bytes_served delta / file size); CPU-seconds per GiB delivered (utime+stime deltas, from
/proc/<pid>/stat, of the broker and every peer process over the window, divided by N x size);
peak RSS (VmHWM) of the peers and the broker.

Every run is one process-mode launcher swarm (bench._util.bench_swarm): the broker(s) and the peers
are started from YAML configs through the command-line tools and driven over their control
channels; leaving the run stops the peers (each says bye), then the brokers.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import _profile
from bench._util import (
    Background,
    GiB,
    MiB,
    bench_swarm,
    cpu_split,
    known_fields,
    make_file,
    measure,
    median,
    memory_kib,
    overrides,
    prime_page_cache,
    print_table,
    save,
    wait_quiet,
    wait_registered,
    workdir,
)
from launcher import BrokerHandle, PeerHandle, Result

NAME = "movie.bin"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.swarm", description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="file size (default 256)")
    ap.add_argument("--peers", default="1,4,8", help="swarm sizes N (default 1,4,8)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per (N, mode); medians reported")
    ap.add_argument("--modes", default="swarm,origin-only", help="swarm, origin-only, own-origin")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the broker and two peers in one extra largest-N swarm run",
    )
    ap.add_argument(
        "--perf", action="store_true", help="perf record the whole machine in one extra largest-N swarm run"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds a get may take")
    ap.add_argument("--broker-set", action="append", metavar="KEY=VALUE", help="broker config for every run")
    ap.add_argument("--peer-set", action="append", metavar="KEY=VALUE", help="peer config for every run")
    ap.add_argument("--cold", action="store_true", help="no page-cache priming (see _util)")
    ap.add_argument("--results-name", default=None, help="write bench/results/NAME.json (default swarm)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for other load to end")
    ap.add_argument("--max-background", type=float, default=0.3, help="redo a run if others used more cores")
    ap.add_argument("--retries", type=int, default=2, help="redos at most per run")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    return ap.parse_args(argv)


def one_run(
    work: Path,
    n: int,
    mode: str,
    tag: str,
    timeout: float,
    broker_set: dict[str, Any],
    peer_set: dict[str, Any],
    prime: bool,
    profile_dir: Path | None = None,
    perf_out: Path | None = None,
) -> dict[str, Any]:
    names = [f"p{tag}-{i}" for i in range(n)]
    from broker.config import BrokerConfig

    if mode == "origin-only" and known_fields(BrokerConfig, {"plan_policy": 0}):
        broker_set = broker_set | {"plan_policy": "origin_only"}
    elif mode == "origin-only":
        mode = "own-origin"  # this core has no plan_policy: the next best baseline
    brokers_needed = n if mode == "own-origin" else 1
    with contextlib.ExitStack() as stack:
        swarm = stack.enter_context(bench_swarm(work))  # closed last: peers first, then brokers
        brokers: list[BrokerHandle] = []
        lock = threading.Lock()

        def launch_broker(i: int) -> BrokerHandle:
            # own-origin: broker i serves peer i alone (own config and manifest folder, same share)
            return swarm.start_broker(f"broker{i}", manifest_dir=f"manifests{i}", **broker_set)

        with ThreadPoolExecutor(max_workers=brokers_needed) as pool:
            brokers = list(pool.map(launch_broker, range(brokers_needed)))
        peers: list[PeerHandle] = []

        def launch(i: int) -> None:
            name = names[i]
            shutil.rmtree(work / f"data-{name}", ignore_errors=True)
            tracker = brokers[i % brokers_needed].tracker_endpoint
            peer = swarm.add_peer(name, broker=tracker, data_dir=f"data-{name}", register=False, **peer_set)
            with lock:
                peers.append(peer)
            wait_registered(peer, 60.0)

        with ThreadPoolExecutor(max_workers=n) as pool:
            for future in [pool.submit(launch, i) for i in range(n)]:
                future.result()
        peers.sort(key=lambda p: p.name)
        broker_pids = {f"broker{i}": pid_of(b) for i, b in enumerate(brokers)}
        pids = broker_pids | {p.name: pid_of(p) for p in peers}
        prof = None
        if profile_dir is not None:
            chosen = {"broker": pid_of(brokers[0])} | {p.name: pid_of(p) for p in peers[:2]}
            prof = _profile.Profiler({f"swarm-{k}": v for k, v in chosen.items()}, profile_dir)
            stack.enter_context(prof)
        size = (work / "share" / NAME).stat().st_size
        primed = prime_page_cache(work, int(n * size * 1.05)) if prime else 0.0
        perf = None
        if perf_out is not None:
            roles = {name if brokers_needed > 1 else "broker": pid for name, pid in broker_pids.items()}
            roles |= {f"peer {i}": pid_of(p) for i, p in enumerate(peers)}
            perf = _profile.PerfSystem(perf_out, roles)
            stack.enter_context(perf)
        stats0 = [b.stats() for b in brokers]
        cpu0 = {k: cpu_split(pid) for k, pid in pids.items()}
        answers: dict[str, Result] = {}
        finished: dict[str, float] = {}
        errors: dict[str, str] = {}
        start = time.perf_counter()

        def fetch(peer: PeerHandle) -> None:
            try:
                answers[peer.name] = peer.get(NAME, timeout=timeout)
            except Exception as exc:  # a failed or stalled download is a result too
                errors[peer.name] = f"{type(exc).__name__}: {exc}"
            finished[peer.name] = time.perf_counter() - start

        with Background(list(pids.values())) as bg, ThreadPoolExecutor(max_workers=n) as pool:
            for future in [pool.submit(fetch, p) for p in peers]:
                future.result()
        wall = time.perf_counter() - start
        if errors:
            keep = Path(__file__).resolve().parent / "results" / "logs" / f"swarm-{tag}"
            shutil.copytree(work / "logs", keep, dirs_exist_ok=True)
            return {"n": n, "mode": mode, "failed": errors, "wall_s": wall, "logs": str(keep)}
        cpu1 = {k: cpu_split(pid) for k, pid in pids.items()}
        stats1 = [b.stats() for b in brokers]
        mem = {k: memory_kib(pid) for k, pid in pids.items()}
        status = {p.name: p.status() for p in peers}
    summaries = prof.summaries() if prof is not None else None
    if perf is not None and perf_out is not None:
        summaries = {"perf": _profile.perf_summary(perf_out, perf.tid_roles)}
    for name in names:
        shutil.rmtree(work / f"data-{name}", ignore_errors=True)
    cpu = {k: (cpu1[k][0] - cpu0[k][0]) + (cpu1[k][1] - cpu0[k][1]) for k in pids}
    cpu_total = sum(cpu.values())

    def origin_delta(key: str) -> int:
        return sum(int(b["origin"][key]) - int(a["origin"][key]) for a, b in zip(stats0, stats1, strict=True))

    def tracker_delta(op: str) -> int:
        pairs = zip(stats0, stats1, strict=True)
        return sum(int(b["requests"].get(op, 0)) - int(a["requests"].get(op, 0)) for a, b in pairs)

    served = [st.get("served", {}) for st in status.values()]
    peer_requests = sum(int(x.get("requests", 0)) for x in served)
    peer_segments = sum(int(x.get("segments_served", 0)) for x in served)
    origin_requests = origin_delta("requests")
    counts: dict[str, int] = {}
    for st in status.values():
        for key, value in (st.get("counts") or {}).items():
            counts[key] = counts.get(key, 0) + int(value)
    from_broker = sum(int(a.sources.get("broker", 0)) for a in answers.values())
    segments = sum(sum(int(v) for v in a.sources.values()) for a in answers.values())
    return {
        "n": n,
        "mode": mode,
        "brokers": brokers_needed,
        "broker_fields": broker_set,
        "wall_s": wall,
        "peer_seconds": {k: float(a.seconds) for k, a in answers.items()},
        "finished_s": finished,
        "broker_upload_copies": origin_delta("bytes_served") / size,
        "broker_segments_share": from_broker / segments,
        "cpu_s": cpu,
        "prime_s": primed,
        "background_cores": bg.other_cores,
        "cpu_total_s": cpu_total,
        "cpu_sys_s": sum(cpu1[k][1] - cpu0[k][1] for k in pids),
        "cpu_s_per_gib": cpu_total / (n * size / GiB),
        "broker_cpu_s": sum(cpu[k] for k in broker_pids),
        "peer_hwm_mib_max": max(mem[p.name].get("VmHWM", 0) for p in peers) / 1024,
        "broker_hwm_mib": max(mem[k].get("VmHWM", 0) for k in broker_pids) / 1024,
        "origin_requests": origin_requests,
        "origin_segments_per_request": origin_delta("segments_served") / max(origin_requests, 1),
        "peer_requests": peer_requests,
        "peer_segments_per_request": peer_segments / max(peer_requests, 1),
        "peer_counts": counts,
        "tracker_gets": tracker_delta("get"),
        "tracker_haves": tracker_delta("have"),
        "sources": {k: a.sources for k, a in answers.items()},
        "profile": summaries,
    }


def pid_of(node: BrokerHandle | PeerHandle) -> int:
    assert node.pid is not None  # process mode
    return node.pid


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.peers.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    out: dict[str, Any] = {"size_bytes": args.size_mib * MiB, "runs": []}
    broker_set, peer_set = overrides(args.broker_set), overrides(args.peer_set)
    prime = not args.cold
    out["quiet"] = wait_quiet(args.quiet_wait)
    with workdir(args.workdir, args.keep, "swarm") as work:
        make_file(work / "share" / NAME, args.size_mib * MiB)
        for rep in range(args.repeat):
            for n in sizes:
                for mode in modes:
                    row = measure(
                        lambda n=n, mode=mode, tag=f"{n}{mode[0]}{rep}": one_run(
                            work, n, mode, tag, args.timeout, broker_set, peer_set, prime
                        ),
                        args.max_background,
                        args.retries,
                    )
                    out["runs"].append(row)
                    if row.get("failed"):
                        print(
                            f"  N={n:<2} {mode:<11} FAILED after {row['wall_s']:.1f} s: {row['failed']} "
                            f"(logs in {row['logs']})",
                            flush=True,
                        )
                        continue
                    print(
                        f"  N={n:<2} {mode:<11} {row['wall_s']:6.2f} s  broker upload "
                        f"{row['broker_upload_copies']:5.2f} copies  {row['cpu_s_per_gib']:5.2f} CPU-s/GiB  "
                        f"segs/req origin {row['origin_segments_per_request'] or 0:.1f} "
                        f"peers {row['peer_segments_per_request'] or 0:.1f} ({row['peer_requests']} req)  "
                        f"gets {row['tracker_gets']} {row['peer_counts']}",
                        flush=True,
                    )
        if args.profile and _profile.available():
            n = max(sizes)
            row = one_run(
                work,
                n,
                "swarm",
                f"{n}prof",
                args.timeout,
                broker_set,
                peer_set,
                prime,
                profile_dir=work / "profiles",
            )
            row["profiled"] = True
            out["profiled"] = row
            if row.get("failed"):
                print(f"  profiled run FAILED: {row['failed']} (logs in {row['logs']})")
            print(f"  profiled N={n} swarm: {row['wall_s']:.2f} s (not counted)")
            for label, summary in (row.get("profile") or {}).items():
                _profile.print_summary(label, summary)
            dest = Path(__file__).resolve().parent / "results" / "profiles"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (work / "profiles").iterdir():
                shutil.copy(f, dest / f.name)
        if args.perf and _profile.perf_available():
            n = max(sizes)
            for mode in modes:
                data = work / f"perf-{mode}.data"
                row = one_run(
                    work,
                    n,
                    mode,
                    f"{n}perf{mode[0]}",
                    args.timeout,
                    broker_set,
                    peer_set,
                    prime,
                    perf_out=data,
                )
                summary = (row.get("profile") or {}).get("perf") or {}
                out.setdefault("perf", {})[mode] = {"wall_s": row["wall_s"], "summary": summary}
                print(f"  perf-recorded N={n} {mode}: {row['wall_s']:.2f} s (not counted)")
                _profile.print_perf(f"N={n} {mode}", summary)
    return out


def report(out: dict[str, Any]) -> dict[str, Any]:
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    sizes = sorted({r["n"] for r in out["runs"]})
    modes = list(dict.fromkeys(r["mode"] for r in out["runs"]))
    for n in sizes:
        for mode in modes:
            runs = [r for r in out["runs"] if r["n"] == n and r["mode"] == mode and not r.get("failed")]
            failed = sum(1 for r in out["runs"] if r["n"] == n and r["mode"] == mode and r.get("failed"))
            if not runs:
                continue
            walls = [r["wall_s"] for r in runs]
            summary[f"{mode}_{n}"] = {
                "wall_s": median(walls),
                "wall_min_s": min(walls),
                "wall_max_s": max(walls),
                "broker_upload_copies": median([r["broker_upload_copies"] for r in runs]),
                "cpu_s_per_gib": median([r["cpu_s_per_gib"] for r in runs]),
                "sys_share": median([r["cpu_sys_s"] / r["cpu_total_s"] for r in runs]),
                "broker_cpu_s": median([r["broker_cpu_s"] for r in runs]),
                "peer_hwm_mib_max": max(r["peer_hwm_mib_max"] for r in runs),
                "broker_hwm_mib": max(r["broker_hwm_mib"] for r in runs),
                "background_cores_max": max(r.get("background_cores", 0.0) for r in runs),
                "runs": len(runs),
                "failed_runs": failed,
            }
    for n in sizes:
        base = summary.get(f"origin-only_{n}") or summary.get(f"own-origin_{n}")
        for mode in modes:
            row = summary.get(f"{mode}_{n}")
            if row is None:
                continue
            speedup = base["wall_s"] / row["wall_s"] if base is not None and mode == "swarm" else float("nan")
            row["baseline_over_swarm"] = speedup
            rows.append(
                [
                    n,
                    mode,
                    row["wall_s"],
                    f"{row['wall_min_s']:.2f}-{row['wall_max_s']:.2f}",
                    row["broker_upload_copies"],
                    row["cpu_s_per_gib"],
                    row["sys_share"] * 100,
                    row["broker_cpu_s"],
                    row["peer_hwm_mib_max"],
                    speedup,
                    row["background_cores_max"],
                    f"{row['runs']}" + (f" ({row['failed_runs']} failed)" if row["failed_runs"] else ""),
                ]
            )
    print_table(
        f"swarm: N peers get the same {out['size_bytes'] // MiB} MiB file at once (medians)",
        [
            "N",
            "mode",
            "wall s",
            "range s",
            "broker upload copies",
            "CPU-s/GiB",
            "sys %",
            "broker CPU-s",
            "peer peak RSS MiB",
            "baseline/swarm time",
            "other load cores",
            "runs",
        ],
        rows,
        digits=2,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    out["summary"] = report(out)
    save("swarm", args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
