"""The swarm on separate hosts with capped uplinks: network namespaces, a bridge, tc tbf.

    sudo python -m bench.hosts                          # 32 MiB, N = 1, 4, 8, 100 Mbit/s uplinks
    sudo python -m bench.hosts --peers 4 --size-mib 8   # quick

Every host (the broker in `zsw-h0`, peer i in `zsw-h<i>`) is a network namespace with one veth
into a bridge that lives in a namespace of its own (`zsw-hub`), so nothing touches the machine's
own interfaces; addresses are 10.77.0.<i+1>/24, inside those namespaces only. Each host's egress
(its uplink) is limited by `tc qdisc ... tbf rate <rate>`. For each N, two runs:

- swarm        the shipped broker policy (peers first, origin claims / super-seeding);
- origin-only  `plan_policy: origin_only`: every segment from the broker, like a plain server.

Figures: wall time from the first `get` to the last answer, against the ideal bounds (one copy
through one uplink for a perfect swarm; N copies through the broker's uplink for origin-only), and
the broker's upload in file copies. Needs root (namespaces, tc); otherwise it says so and exits 0.
Every process is started inside a namespace and stopped by PID; the namespaces are deleted at the
end, also on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._util import RESULTS, make_file, overrides, write_yaml
from common.processes import BrokerProcess, PeerProcess

PREFIX = "zsw"
SUBNET = "10.77.0"


def run_cmd(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def can_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2)"
    probe = f"{PREFIX}-probe"
    try:
        run_cmd("ip", "netns", "add", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


class Network:
    """A hub namespace with a bridge, and `hosts` namespaces each with a capped uplink."""

    def __init__(self, hosts: int, rate_mbit: float) -> None:
        self.hosts = hosts
        self.rate_mbit = rate_mbit
        self.namespaces: list[str] = []

    def ns(self, i: int) -> str:
        return f"{PREFIX}-h{i}"

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> Network:
        self.delete_leftovers()
        try:
            hub = f"{PREFIX}-hub"
            run_cmd("ip", "netns", "add", hub)
            self.namespaces.append(hub)
            run_cmd("ip", "-n", hub, "link", "add", f"{PREFIX}-br", "type", "bridge")
            run_cmd("ip", "-n", hub, "link", "set", f"{PREFIX}-br", "up")
            for i in range(self.hosts):
                ns = self.ns(i)
                run_cmd("ip", "netns", "add", ns)
                self.namespaces.append(ns)
                port = f"{PREFIX}v{i}"
                run_cmd(
                    "ip",
                    "link",
                    "add",
                    port,
                    "netns",
                    hub,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                run_cmd("ip", "-n", hub, "link", "set", port, "master", f"{PREFIX}-br")
                run_cmd("ip", "-n", hub, "link", "set", port, "up")
                run_cmd("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                run_cmd("ip", "-n", ns, "link", "set", "eth0", "up")
                run_cmd("ip", "-n", ns, "link", "set", "lo", "up")
                # The uplink: egress of the host's only interface.
                run_cmd(
                    "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                    "rate", f"{self.rate_mbit}mbit", "burst", "128kb", "latency", "100ms",
                )  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces.clear()

    @staticmethod
    def delete_leftovers() -> None:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        for line in listing.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{PREFIX}-h") or name == f"{PREFIX}-hub":
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def one_run(
    work: Path,
    n: int,
    mode: str,
    size: int,
    rate_mbit: float,
    timeout: float,
    peer_fields: dict[str, Any] | None = None,
    broker_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    run_dir = work / f"{mode}-{n}"
    share = run_dir / "share"
    share.mkdir(parents=True)
    os.link(work / "file.bin", share / "file.bin")
    procs: list[BrokerProcess | PeerProcess] = []
    with Network(n + 1, rate_mbit) as net:
        try:
            broker_yaml = write_yaml(
                run_dir / "broker.yaml",
                {
                    "share_dir": str(share),
                    "manifest_dir": str(work / "manifests"),  # shared: hashed once for all runs
                    "bind_host": net.address(0),
                    "plan_policy": "origin_only" if mode == "origin-only" else "swarm",
                    "log_level": "WARNING",
                    **(broker_fields or {}),
                },
            )
            broker = BrokerProcess(
                broker_yaml, run_dir / "broker.log", prefix=["ip", "netns", "exec", net.ns(0)]
            )
            procs.append(broker)
            peers: list[PeerProcess] = []
            for i in range(1, n + 1):
                peer_yaml = write_yaml(
                    run_dir / f"p{i}.yaml",
                    {
                        "name": f"p{i}",
                        "broker": broker.tracker,
                        "data_dir": str(run_dir / f"p{i}"),
                        "bind_host": net.address(i),
                        "log_level": "WARNING",
                        **(peer_fields or {}),
                    },
                )
                peers.append(
                    PeerProcess(peer_yaml, run_dir / f"p{i}.log", prefix=["ip", "netns", "exec", net.ns(i)])
                )
                procs.append(peers[-1])
            for peer in peers:  # every peer registered before the clock starts
                deadline = time.monotonic() + 30
                while not peer.command("status")["result"]["registered"]:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{peer.name} did not register")
                    time.sleep(0.05)
            before = peers[0].command("broker")["result"]["origin"]["bytes_served"]
            started = time.monotonic()
            finished: dict[str, float] = {}

            def fetch(peer: PeerProcess) -> dict[str, Any]:
                result = peer.get("file.bin", timeout)
                finished[peer.name] = round(time.monotonic() - started, 3)
                return result

            with ThreadPoolExecutor(len(peers)) as pool:
                results = list(pool.map(fetch, peers))
            wall = time.monotonic() - started
            after = peers[0].command("broker")["result"]["origin"]["bytes_served"]
        except BaseException:
            for proc in procs:
                print(f"--- {proc.log_path.name}: {proc.log_tail(8)}", file=sys.stderr)
            raise
        finally:
            for proc in reversed(procs):
                proc.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    one_copy_s = size * 8 / (rate_mbit * 1e6)
    ideal = one_copy_s * (n if mode == "origin-only" else 1)
    return {
        "n": n,
        "mode": mode,
        "wall_s": round(wall, 3),
        "ideal_s": round(ideal, 3),
        "vs_ideal": round(wall / ideal, 3),
        "one_copy_s": round(one_copy_s, 3),
        "broker_upload_copies": round((after - before) / size, 3),
        "peer_seconds": {f"p{i + 1}": r["seconds"] for i, r in enumerate(results)},  # as each peer timed it
        "finished_s": finished,  # from the first get sent, as this script saw the answers
        "sources": {f"p{i + 1}": r["sources"] for i, r in enumerate(results)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hosts", description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=float, default=32.0)
    ap.add_argument("--peers", default="1,4,8", help="swarm sizes N")
    ap.add_argument("--rate-mbit", type=float, default=100.0, help="every host's uplink")
    ap.add_argument("--modes", default="swarm,origin-only")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a get may take")
    ap.add_argument("--peer-set", action="append", metavar="KEY=VALUE", help="peer config field, every run")
    ap.add_argument("--broker-set", action="append", metavar="KEY=VALUE", help="broker config field")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_path = RESULTS / "hosts.json"
    why_not = can_make_namespaces()
    if why_not:
        print(f"hosts benchmark skipped: {why_not}")
        out_path.write_text(json.dumps({"benchmark": "hosts", "skipped": why_not}, indent=2))
        return 0
    size = int(args.size_mib * 1024 * 1024)
    sizes = [int(x) for x in args.peers.split(",")]
    modes = args.modes.split(",")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zswarm-bench-hosts-") as tmp:
        work = Path(tmp)
        make_file(work / "file.bin", size)
        for n in sizes:
            for mode in modes:
                row = one_run(
                    work,
                    n,
                    mode,
                    size,
                    args.rate_mbit,
                    args.timeout,
                    overrides(args.peer_set),
                    overrides(args.broker_set),
                )
                rows.append(row)
                print(
                    f"  N={n} {mode:<11} {row['wall_s']:7.2f} s  ideal {row['ideal_s']:6.2f} s "
                    f"({row['vs_ideal']:.2f}x)  broker upload {row['broker_upload_copies']:.2f} copies",
                    flush=True,
                )
    by = {(r["n"], r["mode"]): r for r in rows}
    print(
        f"\nhosts: N hosts with {args.rate_mbit:g} Mbit/s uplinks get one {args.size_mib:g} MiB file at once"
    )
    print(
        f"{'N':>3}  {'swarm s':>8}  {'x ideal':>7}  {'copies':>6}  "
        f"{'origin-only s':>13}  {'copies':>6}  {'speed-up':>8}"
    )
    for n in sizes:
        swarm, origin = by.get((n, "swarm")), by.get((n, "origin-only"))
        speedup = f"{origin['wall_s'] / swarm['wall_s']:.2f}x" if swarm and origin else "-"
        print(
            f"{n:>3}  {swarm['wall_s'] if swarm else float('nan'):>8.2f}  "
            f"{swarm['vs_ideal'] if swarm else float('nan'):>7.2f}  "
            f"{swarm['broker_upload_copies'] if swarm else float('nan'):>6.2f}  "
            f"{origin['wall_s'] if origin else float('nan'):>13.2f}  "
            f"{origin['broker_upload_copies'] if origin else float('nan'):>6.2f}  {speedup:>8}"
        )
    out_path.write_text(
        json.dumps(
            {
                "benchmark": "hosts",
                "args": vars(args),
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out_path.relative_to(Path.cwd()) if out_path.is_relative_to(Path.cwd()) else out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
