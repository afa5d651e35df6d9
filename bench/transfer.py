"""One source to one downloader over loopback, against a raw PUSH/PULL stream of the same bytes.

    python -m bench.transfer                      # 256 MiB; defaults, variants, grid; 2 GiB RSS check
    python -m bench.transfer --size-mib 32 --repeat 1 --no-grid --rss-mib 0      # quick

What runs
---------
- baseline, measured at the start and again at the end: a raw pyzmq PUSH/PULL stream of the file as
  16 KiB messages between two processes ("raw"), and the same stream with the receiver doing a
  downloader's work per message: blake3, compare with the manifest, pwrite ("raw+verify").
- zswarm, every run in a fresh downloader process (`python -m peer -c X control`, a `get` over its
  control channel); the source is the broker's origin (`python -m broker -c X --control`) or a peer
  process holding the whole file ("seed"), all started by the launcher (bench._util.bench_swarm):
  * defaults: the shipped configs, --repeat runs per source;
  * variants: named config changes (batch 256 with the default plan block of 64; batch 256 with
    block 256; the broker without origin claims), --repeat runs each;
  * grid: batch_segments x lanes, one fresh broker (and seed) per cell. "lanes" is origin_lanes
    for the broker source and lanes_per_source for the seed. A request never spans a plan block,
    so each cell runs the broker with plan_block_segments = max(64, batch) (else 256 acts as 64);
    everything else is default.
- optionally (--rss-mib, default 2048) a big file from the broker with the defaults, to read the
  downloader's peak RSS (VmHWM).

MiB/s = file size / the downloader's own `seconds` (from `get` to the file in place, manifest and
plan included). CPU: /proc utime and stime deltas of the downloader and the source over the get, and
the split between libzmq's I/O threads and Python's threads.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from bench import _profile, _util
from bench._util import (
    Background,
    Child,
    MiB,
    bench_swarm,
    cpu_delta,
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
    stop_peer,
    thread_cpu_seconds,
    wait_quiet,
    wait_registered,
    workdir,
)
from launcher import PeerHandle

NAME = "movie.bin"
PRIME = True  # write and delete a ballast file before each timed run (bench/_util.prime_page_cache)

# (label, sources it concerns, broker fields, peer fields)
VARIANTS: list[tuple[str, tuple[str, ...], dict[str, Any], dict[str, Any]]] = [
    ("batch 256, block 64 (default block)", ("broker", "seed"), {}, {"batch_segments": 256}),
    ("batch 256, block 256", ("broker", "seed"), {"plan_block_segments": 256}, {"batch_segments": 256}),
    ("no relay trees (origin_only policy)", ("broker",), {"plan_policy": "origin_only"}, {}),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="file size (default 256)")
    ap.add_argument("--batches", default="16,64,256", help="batch_segments values of the grid")
    ap.add_argument("--lanes", default="1,2,4", help="lanes values of the grid")
    ap.add_argument("--sources", default="broker,seed", help="sources: broker, seed")
    ap.add_argument(
        "--repeat", type=int, default=3, help="runs of the defaults and of each variant, per source"
    )
    ap.add_argument("--grid-repeat", type=int, default=2, help="runs per grid cell")
    ap.add_argument("--raw-repeat", type=int, default=2, help="raw stream runs at start and at end")
    ap.add_argument("--no-grid", action="store_true", help="skip the grid")
    ap.add_argument("--no-variants", action="store_true", help="skip the variants")
    ap.add_argument("--rss-mib", type=int, default=2048, help="size of the peer-RSS download (0: skip)")
    ap.add_argument("--profile", action="store_true", help="py-spy one extra defaults run per source")
    ap.add_argument("--perf", action="store_true", help="perf record the machine in one extra run per source")
    ap.add_argument("--broker-set", action="append", metavar="KEY=VALUE", help="broker config for every run")
    ap.add_argument(
        "--peer-set", action="append", metavar="KEY=VALUE", help="downloader config for every run"
    )
    ap.add_argument(
        "--plain-stop",
        action="store_true",
        help="stop downloaders with SIGTERM at once, no 'quit' first (see BENCHMARKS.md)",
    )
    ap.add_argument("--cold", action="store_true", help="no page-cache priming (see _util)")
    ap.add_argument("--results-name", default=None, help="write bench/results/NAME.json (default transfer)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for other load to end")
    ap.add_argument("--max-background", type=float, default=0.3, help="redo a run if others used more cores")
    ap.add_argument("--retries", type=int, default=2, help="redos at most per run")
    ap.add_argument("--workdir", default=None, help="folder for temporary files (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary files")
    return ap.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# --------------------------------------------------------------------------- baseline


def raw_stream(work: Path, path: Path, verify: bool) -> dict[str, Any]:
    size = path.stat().st_size
    count = (size + 16 * 1024 - 1) // (16 * 1024)
    with contextlib.ExitStack() as stack:
        sink = Child(
            "pull",
            {
                "count": count,
                "verify": verify,
                "file": str(path),
                "out": str(work / "raw.out"),
                "timeout": 120,
            },
            work / "logs" / "pull.log",
        )
        stack.callback(sink.stop)
        endpoint = sink.read_json(120)["endpoint"]
        primed = prime_page_cache(work, int(size * 1.1)) if PRIME else 0.0
        source = Child("push", {"endpoint": endpoint, "file": str(path)}, work / "logs" / "push.log")
        stack.callback(source.stop)
        source.read_json(30)
        with Background([sink.pid, source.pid]) as bg:
            done = sink.read_json(300)
        pushed = source.read_json(60)
    (work / "raw.out").unlink(missing_ok=True)
    if done["messages"] != count:
        raise RuntimeError(f"raw stream lost messages: {done['messages']} of {count}")
    return {
        "kind": "raw+verify" if verify else "raw",
        "seconds": done["seconds"],
        "mib_s": size / MiB / done["seconds"],
        "cpu_s": done["cpu_s"] + pushed["cpu_s"],
        "bad": done["bad"],
        "prime_s": primed,
        "background_cores": bg.other_cores,
    }


# --------------------------------------------------------------------------- zswarm


class Source:
    """The broker (and, for kind "seed", a peer process holding the file), for one broker config."""

    def __init__(
        self, work: Path, kind: str, broker_fields: dict[str, Any], stack: contextlib.ExitStack
    ) -> None:
        # One swarm per source: leaving the stack stops its downloaders, its seed, then its broker.
        self.swarm = stack.enter_context(bench_swarm(work))
        self.broker = self.swarm.start_broker(**broker_fields)
        self.seed: PeerHandle | None = None
        if kind == "seed":
            self.seed = self.swarm.add_peer("seed", data_dir="data-seed", register=False)
            wait_registered(self.seed)
            if not (
                work / "data-seed" / NAME
            ).is_file():  # the first time: fetch it from the broker (untimed)
                self.seed.get(NAME, timeout=600)
        node = self.seed if self.seed is not None else self.broker
        assert node.pid is not None and self.broker.pid is not None  # process mode
        self.pid: int = node.pid
        self.broker_pid: int = self.broker.pid
        self.label = kind

    def add_downloader(self, name: str, **fields: Any) -> PeerHandle:
        """A fresh downloader process with its own data folder, registered."""
        peer = self.swarm.add_peer(name, data_dir=f"data-{name}", register=False, **fields)
        wait_registered(peer)
        return peer

    def served(self) -> dict[str, Any]:
        """The source's segment-server counters (cumulative): requests, segments_served, ..."""
        if self.seed is not None:
            return dict(self.seed.status().get("served", {}))
        stats = self.broker.stats()
        return dict(stats["origin"]) | {"gets": int(stats.get("requests", {}).get("get", 0))}


def one_get(
    work: Path,
    source: Source,
    peer_fields: dict[str, Any],
    tag: str,
    profile_dir: Path | None = None,
    file_name: str = NAME,
    perf_out: Path | None = None,
) -> dict[str, Any]:
    name = f"dl-{tag}"
    data = work / f"data-{name}"
    shutil.rmtree(data, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        peer = source.add_downloader(name, **peer_fields)
        stack.callback(stop_peer, peer)
        assert peer.pid is not None  # process mode
        prof = None
        if profile_dir is not None:
            prof = _profile.Profiler(
                {f"{tag}-downloader": peer.pid, f"{tag}-{source.label}": source.pid}, profile_dir
            )
            stack.enter_context(prof)
        served0 = source.served()
        size = (work / "share" / file_name).stat().st_size
        primed = prime_page_cache(work, int(size * 1.1)) if PRIME else 0.0
        perf = None
        if perf_out is not None:
            perf = _profile.PerfSystem(
                perf_out, {"downloader": peer.pid, f"source {source.label}": source.pid}
            )
            stack.enter_context(perf)
        dl0, src0 = cpu_split(peer.pid), cpu_split(source.pid)
        threads_dl0, threads_src0 = thread_cpu_seconds(peer.pid), thread_cpu_seconds(source.pid)
        t0 = time.perf_counter()
        with Background([peer.pid, source.pid, source.broker_pid]) as bg:
            result = peer.get(file_name, timeout=600)
        wall = time.perf_counter() - t0
        dl1, src1 = cpu_split(peer.pid), cpu_split(source.pid)
        threads_dl = cpu_delta(threads_dl0, thread_cpu_seconds(peer.pid))
        threads_src = cpu_delta(threads_src0, thread_cpu_seconds(source.pid))
        served1 = source.served()
        counts = dict(peer.status().get("counts") or {})
        mem = memory_kib(peer.pid)
        src_mem = memory_kib(source.pid)
    summaries = prof.summaries() if prof is not None else None
    if perf is not None and perf_out is not None:
        summaries = {"perf": _profile.perf_summary(perf_out, perf.tid_roles)}
    shutil.rmtree(data, ignore_errors=True)
    seconds = float(result.seconds)
    requests = int(served1.get("requests", 0)) - int(served0.get("requests", 0))
    segments = int(served1.get("segments_served", 0)) - int(served0.get("segments_served", 0))
    return {
        "source": source.label,
        "seconds": seconds,
        "wall_s": wall,
        "mib_s": size / MiB / seconds,
        "sources": result.sources,
        "cpu_downloader_s": (dl1[0] - dl0[0]) + (dl1[1] - dl0[1]),
        "cpu_downloader_user_s": dl1[0] - dl0[0],
        "cpu_downloader_sys_s": dl1[1] - dl0[1],
        "cpu_source_s": (src1[0] - src0[0]) + (src1[1] - src0[1]),
        "cpu_source_sys_s": src1[1] - src0[1],
        "cpu_threads_downloader_s": threads_dl,
        "cpu_threads_source_s": threads_src,
        "prime_s": primed,
        "background_cores": bg.other_cores,
        "source_requests": requests,
        "downloader_counts": counts,
        "segments_per_request": segments / requests if requests else None,
        "plan_requests": int(served1.get("gets", 0)) - int(served0.get("gets", 0))
        if "gets" in served1
        else None,
        "downloader_rss_mib": mem.get("VmRSS", 0) / 1024,
        "downloader_hwm_mib": mem.get("VmHWM", 0) / 1024,
        "source_hwm_mib": src_mem.get("VmHWM", 0) / 1024,
        "profile": summaries,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from broker.config import BrokerConfig
    from peer.config import PeerConfig

    size = args.size_mib * MiB
    batches, lanes_list = ints(args.batches), ints(args.lanes)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    broker_set, peer_set = overrides(args.broker_set), overrides(args.peer_set)
    out: dict[str, Any] = {
        "size_bytes": size,
        "raw": [],
        "defaults": [],
        "variants": [],
        "grid": [],
        "rss": None,
    }
    global PRIME
    PRIME = not args.cold
    _util.PLAIN_STOP = args.plain_stop
    out["quiet"] = wait_quiet(args.quiet_wait)
    with workdir(args.workdir, args.keep, "transfer") as work:
        path = make_file(work / "share" / NAME, size)

        def baseline(when: str) -> None:
            for _ in range(args.raw_repeat):
                for verify in (False, True):
                    row = measure(
                        lambda v=verify: raw_stream(work, path, v), args.max_background, args.retries
                    )
                    row["when"] = when
                    out["raw"].append(row)
                    print(f"  {row['kind']:<11} ({when}): {row['mib_s']:8.1f} MiB/s", flush=True)

        def show(label: str, row: dict[str, Any]) -> None:
            print(
                f"  {label:<52} {row['mib_s']:8.1f} MiB/s  "
                f"downloader CPU {row['cpu_downloader_user_s']:.2f} user "
                f"+ {row['cpu_downloader_sys_s']:.2f} sys  source CPU {row['cpu_source_s']:.2f}  "
                f"{row['segments_per_request'] or 0:.0f} seg/req  plan GETs {row['plan_requests']}  "
                f"{row['downloader_counts'] or ''}"
                + (
                    f"  [other load {row['background_cores']:.2f} cores]"
                    if row["background_cores"] > 0.2
                    else ""
                ),
                flush=True,
            )

        print(f"file {args.size_mib} MiB; raw baseline:")
        baseline("start")

        for kind in sources:
            with contextlib.ExitStack() as stack:
                src = Source(work, kind, dict(broker_set), stack)
                for i in range(args.repeat):
                    row = measure(
                        lambda s=src, t=f"def-{kind}-{i}": one_get(work, s, dict(peer_set), t),
                        args.max_background,
                        args.retries,
                    )
                    row.update(case="defaults")
                    out["defaults"].append(row)
                    show(f"defaults from {kind}", row)
                if args.profile and _profile.available():
                    row = one_get(work, src, dict(peer_set), f"prof-{kind}", profile_dir=work / "profiles")
                    row.update(case="defaults, profiled")
                    out.setdefault("profiled", []).append(row)
                    show(f"defaults from {kind} (py-spy attached, not counted)", row)
                    for label, summary in (row["profile"] or {}).items():
                        _profile.print_summary(label, summary)
                if args.perf and _profile.perf_available():
                    data = work / f"perf-{kind}.data"
                    row = one_get(work, src, dict(peer_set), f"perf-{kind}", perf_out=data)
                    row.update(case="defaults, perf", perf=(row.pop("profile") or {}).get("perf"))
                    out.setdefault("profiled", []).append(row)
                    show(f"defaults from {kind} (perf recording, not counted)", row)
                    _profile.print_perf(f"defaults from {kind}", row["perf"])

        if not args.no_variants:
            for label, kinds, bfields, pfields in VARIANTS:
                if not (known_fields(BrokerConfig, bfields) and known_fields(PeerConfig, pfields)):
                    print(f"  (variant {label!r} skipped: a field is not in this version's configs)")
                    continue
                for kind in [k for k in sources if k in kinds]:
                    with contextlib.ExitStack() as stack:
                        src = Source(work, kind, broker_set | bfields, stack)
                        for i in range(args.repeat):
                            row = measure(
                                lambda s=src, f=peer_set | pfields, t=f"var-{kind}-{i}": one_get(
                                    work, s, f, t
                                ),
                                args.max_background,
                                args.retries,
                            )
                            row.update(case=label, broker_fields=bfields, peer_fields=pfields)
                            out["variants"].append(row)
                            show(f"{label} from {kind}", row)

        if not args.no_grid:
            for rep in range(args.grid_repeat):
                for lanes in lanes_list:
                    for batch in batches:
                        block = max(64, batch)
                        for kind in sources:
                            bfields = {"origin_lanes": lanes, "plan_block_segments": block}
                            pfields = {"batch_segments": batch, "lanes_per_source": lanes}

                            def cell(
                                kind: str = kind,
                                bfields: dict[str, Any] = bfields,
                                pfields: dict[str, Any] = pfields,
                                tag: str = f"g-{kind}-{batch}-{lanes}-{rep}",
                            ) -> dict[str, Any]:
                                with contextlib.ExitStack() as stack:
                                    src = Source(work, kind, broker_set | bfields, stack)
                                    return one_get(work, src, peer_set | pfields, tag)

                            row = measure(cell, args.max_background, args.retries)
                            row.update(case="grid", batch=batch, lanes=lanes, block=block)
                            out["grid"].append(row)
                            show(f"grid {kind} batch {batch} lanes {lanes} block {block}", row)

        print("raw baseline again:")
        baseline("end")

        if args.rss_mib > 0:
            make_file(work / "share" / "big.bin", args.rss_mib * MiB, seed="big")
            with contextlib.ExitStack() as stack:
                src = Source(work, "broker", dict(broker_set), stack)
                row = one_get(work, src, dict(peer_set), "rss", file_name="big.bin")
            row["size_mib"] = args.rss_mib
            out["rss"] = row
            show(f"{args.rss_mib} MiB from broker, peak RSS {row['downloader_hwm_mib']:.1f} MiB", row)
        if args.profile and (work / "profiles").is_dir():
            dest = Path(__file__).resolve().parent / "results" / "profiles"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (work / "profiles").iterdir():
                shutil.copy(f, dest / f"transfer-{f.name}")
    return out


def _cpu_per_gib(r: dict[str, Any], gib: float) -> float:
    return (r["cpu_downloader_s"] + r["cpu_source_s"]) / gib


def report(out: dict[str, Any]) -> dict[str, Any]:
    raw = median([r["mib_s"] for r in out["raw"] if r["kind"] == "raw"])
    raw_verify = median([r["mib_s"] for r in out["raw"] if r["kind"] == "raw+verify"])
    gib = out["size_bytes"] / (1 << 30)
    summary: dict[str, Any] = {"raw_mib_s": raw, "raw_verify_mib_s": raw_verify}
    rows: list[list[Any]] = []
    for kind in ("raw", "raw+verify"):
        runs = [r for r in out["raw"] if r["kind"] == kind]
        speeds = [r["mib_s"] for r in runs]
        rows.append(
            [
                kind,
                "-",
                median(speeds),
                median(speeds) / raw,
                f"{min(speeds):.0f}-{max(speeds):.0f}",
                median([r["cpu_s"] / gib for r in runs]),
                "-",
                "-",
                "-",
                max(r["background_cores"] for r in runs),
            ]
        )
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in out["defaults"] + out["variants"]:
        groups.setdefault((r["case"], r["source"]), []).append(r)
    for (case, kind), runs in groups.items():
        speeds = [r["mib_s"] for r in runs]
        m = median(speeds)
        key = "defaults" if case == "defaults" else case
        summary[f"{key}|{kind}"] = {
            "mib_s": m,
            "ratio": m / raw,
            "best_mib_s": max(speeds),
            "runs": len(runs),
        }
        rows.append(
            [
                f"zswarm {case}",
                kind,
                m,
                m / raw,
                f"{min(speeds):.0f}-{max(speeds):.0f}",
                median([_cpu_per_gib(r, gib) for r in runs]),
                median([r["cpu_downloader_sys_s"] / gib for r in runs]),
                median([r["segments_per_request"] or 0 for r in runs]),
                median([r["plan_requests"] for r in runs]) if runs[0]["plan_requests"] is not None else "-",
                max(r["background_cores"] for r in runs),
            ]
        )
    print_table(
        f"one source -> one downloader, {out['size_bytes'] // MiB} MiB over loopback (medians; ratio to raw "
        f"PUSH/PULL, median {raw:.0f} MiB/s)",
        [
            "case",
            "source",
            "MiB/s",
            "x raw",
            "range",
            "CPU-s/GiB",
            "dl sys-s/GiB",
            "seg/request",
            "plan GETs",
            "other load (cores, max)",
        ],
        rows,
        digits=2,
    )
    if out["grid"]:
        for kind in ("broker", "seed"):
            cells = [r for r in out["grid"] if r["source"] == kind]
            if not cells:
                continue
            batches = sorted({r["batch"] for r in cells})
            lanes = sorted({r["lanes"] for r in cells})
            grid_rows = []
            for b in batches:
                row: list[Any] = [b, max(64, b)]
                for ln in lanes:
                    speeds = [r["mib_s"] for r in cells if r["batch"] == b and r["lanes"] == ln]
                    row.append(f"{max(speeds):.0f} ({median(speeds):.0f})" if speeds else "-")
                grid_rows.append(row)
            print_table(
                f"grid, source {kind}: best MiB/s of the runs (median) (columns: "
                f"{'origin_lanes' if kind == 'broker' else 'lanes_per_source'}; noise only slows a run down)",
                ["batch", "block"] + [f"lanes {ln}" for ln in lanes],
                grid_rows,
            )
            best = max(cells, key=lambda r: r["mib_s"])
            summary[f"grid_{kind}_best"] = {k: best[k] for k in ("batch", "lanes", "mib_s")}
    if out.get("rss"):
        r = out["rss"]
        summary["rss_download_mib"] = r["size_mib"]
        summary["rss_downloader_hwm_mib"] = r["downloader_hwm_mib"]
        print_table(
            "peer memory while downloading a big file from the broker (defaults)",
            [
                "size MiB",
                "MiB/s",
                "downloader peak RSS MiB",
                "downloader RSS at end MiB",
                "broker peak RSS MiB",
            ],
            [
                [
                    r["size_mib"],
                    r["mib_s"],
                    r["downloader_hwm_mib"],
                    r["downloader_rss_mib"],
                    r["source_hwm_mib"],
                ]
            ],
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    out["summary"] = report(out)
    save("transfer", args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
