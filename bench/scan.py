"""Manifest building rate against raw blake3 over the same bytes.

    python -m bench.scan                  # a 512 MiB file, 3 runs each
    python -m bench.scan --size-mib 64 --repeat 1

Cases, all on the same file (page cache warm: the file was just written, and every case reads it once
before timing starts):
- Catalog.scan     the broker's start-up scan of a share folder holding the file (a fresh manifest
                   folder each run, so the manifest is built, written and fsynced)
- hash_file        common.manifest.hash_file: 1 MiB reads, one blake3 per 16 KiB segment
- blake3 per 16KiB raw blake3(segment).digest() for every 16 KiB slice of the bytes already in memory
- blake3 one update  one blake3 over all the bytes in memory (single-threaded; the floor per byte)
- blake3 one update, AUTO threads   the same with blake3's own threads (both cores)

MB/s are 10^6 bytes per second (the unit hash speeds are usually quoted in); MiB/s in the JSON too.
"""

from __future__ import annotations

import argparse
import shutil
import time
from typing import Any

from blake3 import blake3

from bench._util import Background, MiB, make_file, median, print_table, save, wait_quiet, workdir

SEG = 16 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.scan", description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=512, help="file size (default 512)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--results-name", default=None, help="write bench/results/NAME.json (default scan)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for other load to end")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    return ap.parse_args(argv)


BACKGROUND: list[float] = []


def timed(fn: Any) -> float:
    with Background([]) as bg:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    BACKGROUND.append(bg.other_cores)
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    from broker.catalog import Catalog
    from common.manifest import hash_file

    size = args.size_mib * MiB
    results: dict[str, list[float]] = {}
    quiet = wait_quiet(args.quiet_wait)
    with workdir(args.workdir, args.keep, "scan") as work:
        path = make_file(work / "share" / "data.bin", size)
        with open(path, "rb") as f:
            data = f.read()  # also warms the page cache
        view = memoryview(data)

        def catalog_scan(i: int) -> None:
            manifests = work / f"manifests-{i}"
            catalog = Catalog(work / "share", manifests)
            catalog.scan()
            assert catalog.built == 1
            shutil.rmtree(manifests)

        def per_segment() -> bytes:
            return b"".join(blake3(view[o : o + SEG]).digest() for o in range(0, size, SEG))

        # Same answer check: hash_file must equal the per-segment digests of the same bytes.
        expected = per_segment()
        if hash_file(path, "data.bin").digests != expected:
            raise RuntimeError("hash_file digests differ from blake3 per segment")

        cases: list[tuple[str, Any]] = [
            ("Catalog.scan", None),
            ("hash_file", lambda: hash_file(path, "data.bin")),
            ("blake3 per 16KiB (in memory)", per_segment),
            ("blake3 one update (in memory)", lambda: blake3(view).digest()),
            ("blake3 one update, AUTO threads", lambda: blake3(view, max_threads=blake3.AUTO).digest()),
        ]
        # Interleaved rounds: machine noise hits every case alike.
        for i in range(args.repeat):
            for name, fn in cases:
                seconds = timed(lambda i=i: catalog_scan(i)) if fn is None else timed(fn)
                results.setdefault(name, []).append(seconds)
                print(f"  round {i + 1} {name:<32} {size / 1e6 / seconds:9.1f} MB/s", flush=True)
    out: dict[str, Any] = {
        "size_bytes": size,
        "cases": {},
        "quiet": quiet,
        "background_cores_max": max(BACKGROUND),
    }
    for name, runs in results.items():
        best = min(runs)
        out["cases"][name] = {
            "seconds": runs,
            "mb_s": size / 1e6 / median(runs),
            "mb_s_best": size / 1e6 / best,
            "mib_s": size / MiB / median(runs),
        }
    return out


def report(out: dict[str, Any]) -> dict[str, Any]:
    cases = out["cases"]
    per_seg = cases["blake3 per 16KiB (in memory)"]["mb_s"]
    one = cases["blake3 one update (in memory)"]["mb_s"]
    rows = [
        [name, c["mb_s"], c["mb_s_best"], c["mb_s"] / per_seg, c["mb_s"] / one] for name, c in cases.items()
    ]
    print_table(
        f"manifest building, {out['size_bytes'] // MiB} MiB file, page cache warm (median of runs)",
        ["case", "MB/s", "best MB/s", "x per-16KiB", "x one update"],
        rows,
        digits=2,
    )
    return {
        "catalog_scan_mb_s": cases["Catalog.scan"]["mb_s"],
        "hash_file_mb_s": cases["hash_file"]["mb_s"],
        "blake3_per_segment_mb_s": per_seg,
        "blake3_one_update_mb_s": one,
        "hash_file_vs_per_segment": cases["hash_file"]["mb_s"] / per_seg,
        "hash_file_vs_one_update": cases["hash_file"]["mb_s"] / one,
        "catalog_scan_vs_per_segment": cases["Catalog.scan"]["mb_s"] / per_seg,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    out["summary"] = report(out)
    save("scan", args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
