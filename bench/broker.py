"""The broker's tracker: request rate, GET latency for a big file with many holders, memory with many peers.

    python -m bench.broker                         # 4 clients x 8 in flight, 5 s x 2 rounds; 1 GiB file
    python -m bench.broker --duration 2 --rounds 1 --peers 200 --big-mib 256     # quick

1. Request rate. `--clients` processes (bench/_workers.py tracker-load), each with one registered fake
   peer sending `have` and `ping`, one unregistered downloader sending `get` (known_file_id set, as a
   replanning peer does) for a 64 MiB file, and a PUB sending heartbeats; `--inflight` requests in
   flight per client; the mix (default hb:3,have:5,get:1,ping:1) is the share of each message.
   Requests/s = (replies the clients got + heartbeats the broker counted) / window.
   Baseline, interleaved round by round with the same clients: a raw pyzmq ROUTER echo loop (a
   process doing recv_multipart/send_multipart and nothing else); there every message, heartbeats
   too, goes over the DEALER and is echoed.
2. GET latency, 1 GiB file (sparse: the broker hashes it once; only its manifest matters here),
   with 100 holders registered over the wire (fake endpoints; they do not serve). A registered
   requester holding nothing sends GETs one at a time: the round trip (send to last frame received)
   and the client's decode+validate time, with the manifest's digests (first GET, 2 MiB) and without
   (known_file_id). Holders complete, then the same 100 re-registered as partial holders (each a
   random half of the 64-segment blocks), then with 1,000 holders.
3. Broker RSS (VmRSS from /proc/<pid>/status): idle with the catalog loaded, with 100 and with 1,000
   registered peers (each holding the whole 1 GiB file, the DEALERs kept connected). Baseline: the
   echo process with the same 1,000 connections.

The broker of parts 2 and 3 runs with heartbeat_interval_s 60 (expiry 3 min + grace): the fake
peers do not heartbeat, and must outlive the measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import zmq

from bench import _profile
from bench._util import (
    Background,
    Child,
    GiB,
    MiB,
    TrackerClient,
    make_file,
    measure,
    median,
    memory_kib,
    print_table,
    quantile,
    raise_fd_limit,
    save,
    start_broker,
    wait_quiet,
    workdir,
)
from common import protocol
from common.protocol import Bye, FileInfo, Files, Get, Holding, ListFiles, Register, Registered

MIX_NAME = "mix.bin"
BIG_NAME = "big.bin"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.broker", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=4, help="load client processes")
    ap.add_argument("--inflight", type=int, default=8, help="requests in flight per client")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per load round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds (echo and broker interleaved)")
    ap.add_argument("--mix", default="hb:3,have:5,get:1,ping:1", help="message shares")
    ap.add_argument("--mix-mib", type=int, default=64, help="size of the file the load GETs")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the GET-latency file (default 1 GiB)")
    ap.add_argument("--holders", type=int, default=100, help="holders for the GET latency")
    ap.add_argument("--peers", type=int, default=1000, help="registered peers for the RSS figure")
    ap.add_argument("--gets", type=int, default=30, help="GETs per latency case")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the broker in one extra load round and in the partial-holders GETs",
    )
    ap.add_argument("--results-name", default=None, help="write bench/results/NAME.json (default broker)")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for other load to end")
    ap.add_argument(
        "--max-background", type=float, default=0.3, help="redo a round if others used more cores"
    )
    ap.add_argument("--retries", type=int, default=2, help="redos at most per round")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- 1. request rate


def load_round(
    work: Path,
    args: argparse.Namespace,
    target: str,
    heartbeat: str,
    echo: bool,
    file_id: bytes,
    segments: int,
    tracker: TrackerClient | None,
    tag: str,
    server_pid: int,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        clients = []
        for i in range(args.clients):
            params = {
                "name": f"load{tag}-{i}",
                "tracker": target,
                "heartbeat": heartbeat,
                "echo": echo,
                "file_id": file_id.hex(),
                "file_name": MIX_NAME,
                "segments": segments,
                "mix": args.mix,
                "inflight": args.inflight,
                "duration": args.duration,
            }
            child = Child("tracker-load", params, work / "logs" / f"load{tag}-{i}.log")
            stack.callback(child.stop)
            clients.append(child)
        for child in clients:
            ready = child.read_json(60)
            if ready.get("event") != "ready":
                raise RuntimeError(f"load client: {ready}")
        before = tracker.stats() if tracker is not None else None
        with Background([server_pid, *(c.pid for c in clients)]) as bg:
            for child in clients:
                child.send("go")
            done = [child.read_json(args.duration + 60) for child in clients]
        after = tracker.stats() if tracker is not None else None
    start = min(d["start"] for d in done)
    end = max(d["start"] + d["seconds"] for d in done)
    window = end - start
    answered: dict[str, int] = {}
    for d in done:
        for op, n in d["answered"].items():
            answered[op] = answered.get(op, 0) + n
    heartbeats = 0
    if before is not None and after is not None:
        heartbeats = int(after["requests"].get("heartbeats", 0)) - int(
            before["requests"].get("heartbeats", 0)
        )
    total = sum(answered.values()) + heartbeats
    latency = {}
    for op in answered:
        p50 = [d["latency"][op]["p50_ms"] for d in done if d["latency"].get(op, {}).get("p50_ms") is not None]
        p99 = [d["latency"][op]["p99_ms"] for d in done if d["latency"].get(op, {}).get("p99_ms") is not None]
        latency[op] = {"p50_ms": median(p50), "p99_ms": max(p99) if p99 else None}
    return {
        "target": "echo" if echo else "broker",
        "window_s": window,
        "answered": answered,
        "heartbeats_counted": heartbeats,
        "heartbeats_sent": sum(d["heartbeats_sent"] for d in done),
        "requests": total,
        "req_s": total / window,
        "errors": sum(d["errors"] for d in done),
        "unanswered": sum(d["unanswered"] for d in done),
        "latency": latency,
        "client_cpu_s": sum(d["cpu_s"] for d in done),
        "background_cores": bg.other_cores,
    }


# --------------------------------------------------------------------------- 2./3. fake peers


class FakePeers:
    """Registered peers without a process each: one DEALER per peer, kept connected."""

    def __init__(self, tracker: str) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.ctx.setsockopt(zmq.MAX_SOCKETS, 8192)
        self.tracker = tracker
        self.socks: dict[str, zmq.Socket[Any]] = {}

    def register(self, names: list[str], holdings_of: Any, timeout: float = 120.0) -> float:
        """(Re-)register peers; returns the seconds it took for all replies (pipelined)."""
        t0 = time.perf_counter()
        for i, name in enumerate(names):
            sock = self.socks.get(name)
            if sock is None:
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(self.tracker)
                self.socks[name] = sock
            endpoint = f"tcp://127.0.0.1:{20000 + len(self.socks) % 40000}"
            sock.send_multipart(protocol.encode(Register(i + 1, name, endpoint, holdings_of(name))))
        poller = zmq.Poller()
        for name in names:
            poller.register(self.socks[name], zmq.POLLIN)
        pending = set(names)
        by_sock = {self.socks[n]: n for n in names}
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for sock, _ in poller.poll(1000):
                reply = protocol.decode(sock.recv_multipart())
                if not isinstance(reply, Registered):
                    raise RuntimeError(f"registration refused: {reply}")
                pending.discard(by_sock[sock])
                poller.unregister(sock)
        if pending:
            raise RuntimeError(f"{len(pending)} registrations unanswered")
        return time.perf_counter() - t0

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.ctx.term()


def get_latency(tracker: str, name: str, file_id: bytes, gets: int, with_digests: bool) -> dict[str, Any]:
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tracker)
    try:
        sock.send_multipart(protocol.encode(Register(1, "requester", "tcp://127.0.0.1:9", ())))
        if not sock.poll(10_000) or not isinstance(protocol.decode(sock.recv_multipart()), Registered):
            raise RuntimeError("requester registration failed")
        rtt: list[float] = []
        decode: list[float] = []
        reply_bytes = 0
        sources = entries = 0
        for i in range(gets + 2):  # two warm-up GETs first
            request = Get(i + 2, name, known_file_id=None if with_digests else file_id)
            t0 = time.perf_counter()
            sock.send_multipart(protocol.encode(request))
            if not sock.poll(30_000):
                raise RuntimeError("GET unanswered")
            frames = sock.recv_multipart()
            t1 = time.perf_counter()
            reply = protocol.decode(frames)
            t2 = time.perf_counter()
            if not isinstance(reply, FileInfo):
                raise RuntimeError(f"GET failed: {reply}")
            if i >= 2:
                rtt.append(t1 - t0)
                decode.append(t2 - t1)
            reply_bytes = sum(len(f) for f in frames)
            sources, entries = len(reply.sources), len(reply.plan)
        return {
            "with_digests": with_digests,
            "rtt_ms_p50": median(rtt) * 1000,
            "rtt_ms_p95": quantile(rtt, 0.95) * 1000,
            "rtt_ms_max": max(rtt) * 1000,
            "decode_ms_p50": median(decode) * 1000,
            "reply_kib": reply_bytes / 1024,
            "plan_sources": sources,
            "plan_entries": entries,
            "gets": len(rtt),
        }
    finally:
        # Say bye, so that the next case's requester may take the name at once (a name stays
        # taken while its holder lives).
        sock.send_multipart(protocol.encode(Bye(1_000_000)))
        if sock.poll(2_000):
            sock.recv_multipart()
        sock.close(linger=0)
        ctx.term()


def echo_rss_with_connections(work: Path, n: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        echo = Child("echo", {"max_seconds": 600}, work / "logs" / "echo-rss.log")
        stack.callback(echo.stop)
        ready = echo.read_json(30)
        idle = memory_kib(echo.pid)["VmRSS"]
        ctx: zmq.Context[Any] = zmq.Context()
        ctx.setsockopt(zmq.MAX_SOCKETS, 8192)
        socks = []
        stack.callback(ctx.term)
        for _ in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ready["endpoint"])
            stack.callback(s.close, 0)
            socks.append(s)
        for s in socks:
            s.send(b"x" * 100)
        deadline = time.monotonic() + 60
        got = 0
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        while got < n and time.monotonic() < deadline:
            for s, _ in poller.poll(1000):
                s.recv()
                got += 1
        rss = memory_kib(echo.pid)["VmRSS"]
    return {"idle_mib": idle / 1024, "connected_mib": rss / 1024, "connections": n, "answered": got}


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    if fd_limit < 2 * args.peers + 200:
        raise SystemExit(f"open-file limit {fd_limit} is too low for {args.peers} peers")
    out: dict[str, Any] = {"load": [], "latency": [], "rss": {}}
    out["quiet"] = wait_quiet(args.quiet_wait)
    with workdir(args.workdir, args.keep, "broker") as work:
        # 1. request rate
        rate = work / "rate"
        mix_path = make_file(rate / "share" / MIX_NAME, args.mix_mib * MiB, sparse=True)
        with contextlib.ExitStack() as stack:
            broker = start_broker(rate)
            stack.callback(broker.stop)
            tracker = TrackerClient(broker.tracker)
            stack.callback(tracker.close)
            files = tracker.request(ListFiles)
            assert isinstance(files, Files)
            file_id = files.files[0].file_id
            segments = (mix_path.stat().st_size + 16383) // 16384
            echo = Child("echo", {"max_seconds": 3600}, work / "logs" / "echo.log")
            stack.callback(echo.stop)
            echo_endpoint = echo.read_json(30)["endpoint"]
            for r in range(args.rounds):
                for target in ("echo", "broker"):
                    is_echo = target == "echo"
                    row = measure(
                        lambda is_echo=is_echo, tag=f"{r}{target[0]}": load_round(
                            work,
                            args,
                            echo_endpoint if is_echo else broker.tracker,
                            broker.heartbeat,
                            is_echo,
                            file_id,
                            segments,
                            None if is_echo else tracker,
                            tag,
                            echo.pid if is_echo else broker.pid,
                        ),
                        args.max_background,
                        args.retries,
                    )
                    row["round"] = r
                    out["load"].append(row)
                    print(
                        f"  round {r + 1} {target:<6} {row['req_s']:10,.0f} req/s  {row['answered']} "
                        f"hb counted {row['heartbeats_counted']}/{row['heartbeats_sent']}",
                        flush=True,
                    )
            out["load_broker_rss_mib"] = memory_kib(broker.pid)["VmRSS"] / 1024
            if args.profile and _profile.available():
                with _profile.Profiler({"broker-load": broker.pid}, work / "profiles") as prof:
                    row = load_round(
                        work,
                        args,
                        broker.tracker,
                        broker.heartbeat,
                        False,
                        file_id,
                        segments,
                        tracker,
                        "prof",
                        broker.pid,
                    )
                print(f"  profiled round (not counted): {row['req_s']:,.0f} req/s")
                out["profile_load"] = prof.summaries()
                for label, summary in out["profile_load"].items():
                    _profile.print_summary(label, summary)

        # 2. + 3. GET latency and memory
        big = work / "big"
        make_file(big / "share" / BIG_NAME, args.big_mib * MiB, sparse=True)
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            broker = start_broker(big, heartbeat_interval_s=60.0)
            stack.callback(broker.stop)
            out["big_broker_start_s"] = time.perf_counter() - t0
            tracker = TrackerClient(broker.tracker)
            stack.callback(tracker.close)
            files = tracker.request(ListFiles)
            assert isinstance(files, Files)
            big_id = files.files[0].file_id
            seg_count = (args.big_mib * MiB + 16383) // 16384
            fake = FakePeers(broker.tracker)
            stack.callback(fake.close)
            rss: dict[str, Any] = {"idle_mib": memory_kib(broker.pid)["VmRSS"] / 1024}

            def complete(name: str) -> tuple[Holding, ...]:
                return (Holding(big_id, ((0, seg_count),)),)

            def partial(name: str) -> tuple[Holding, ...]:
                rng = random.Random(name)
                blocks = (seg_count + 63) // 64
                runs = []
                for b in sorted(rng.sample(range(blocks), blocks // 2)):
                    first = b * 64
                    runs.append((first, min(64, seg_count - first)))
                merged: list[tuple[int, int]] = []
                for first, count in runs:
                    if merged and merged[-1][0] + merged[-1][1] == first:
                        merged[-1] = (merged[-1][0], merged[-1][1] + count)
                    else:
                        merged.append((first, count))
                return (Holding(big_id, tuple(merged)),)

            holders = [f"holder{i}" for i in range(args.holders)]
            out["register_holders_s"] = fake.register(holders, complete)
            rss[f"{args.holders}_peers_mib"] = memory_kib(broker.pid)["VmRSS"] / 1024

            def latency(case: str) -> None:
                for with_digests in (False, True):
                    row = get_latency(broker.tracker, BIG_NAME, big_id, args.gets, with_digests)
                    row["case"] = case
                    out["latency"].append(row)
                    print(
                        f"  GET {case:<28} digests {'yes' if with_digests else 'no ':<3} "
                        f"p50 {row['rtt_ms_p50']:7.2f} ms  p95 {row['rtt_ms_p95']:7.2f} ms  "
                        f"reply {row['reply_kib']:8.1f} KiB  decode {row['decode_ms_p50']:6.2f} ms",
                        flush=True,
                    )

            latency(f"{args.holders} complete holders")
            fake.register(holders, partial)
            latency(f"{args.holders} partial holders")
            if args.profile and _profile.available():
                with _profile.Profiler({"broker-get-partial": broker.pid}, work / "profiles") as prof:
                    get_latency(broker.tracker, BIG_NAME, big_id, args.gets, False)
                out["profile_get"] = prof.summaries()
                for label, summary in out["profile_get"].items():
                    _profile.print_summary(label, summary)
            others = [f"peer{i}" for i in range(args.peers - args.holders)]
            out["register_rest_s"] = fake.register(others, complete)
            time.sleep(0.5)
            mem = memory_kib(broker.pid)
            rss[f"{args.peers}_peers_mib"] = mem["VmRSS"] / 1024
            rss["peak_mib"] = mem["VmHWM"] / 1024
            live = len(tracker.stats()["live_peers"])
            rss["live_peers"] = live
            latency(f"{args.peers} holders ({args.holders} partial)")
            rss["after_gets_mib"] = memory_kib(broker.pid)["VmRSS"] / 1024
            rss["peak_after_gets_mib"] = memory_kib(broker.pid)["VmHWM"] / 1024
        rss["echo"] = echo_rss_with_connections(work, args.peers)
        if (work / "profiles").is_dir():
            dest = Path(__file__).resolve().parent / "results" / "profiles"
            dest.mkdir(parents=True, exist_ok=True)
            for f in (work / "profiles").iterdir():
                dest.joinpath(f.name).write_bytes(f.read_bytes())
        out["rss"] = rss
        print(f"  RSS: {rss}", flush=True)
    out["big_bytes"] = args.big_mib * MiB
    out["big_gib"] = args.big_mib * MiB / GiB
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    rows = []
    for target in ("echo", "broker"):
        runs = [r for r in out["load"] if r["target"] == target]
        rates = [r["req_s"] for r in runs]
        summary[f"{target}_req_s"] = median(rates)
        lat = runs[-1]["latency"]
        rows.append(
            [
                "raw ROUTER echo loop" if target == "echo" else "zswarm tracker",
                median(rates),
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                "-" if target == "echo" else median(rates) / summary["echo_req_s"],
                lat.get("have", {}).get("p50_ms"),
                lat.get("get", {}).get("p50_ms"),
                lat.get("get", {}).get("p99_ms"),
                sum(r["errors"] for r in runs),
            ]
        )
    print_table(
        f"tracker request rate: {args.clients} client processes x {args.inflight} in flight, mix {args.mix}, "
        f"{args.duration:g} s x {args.rounds} rounds",
        ["server", "req/s", "range", "x echo", "have p50 ms", "get p50 ms", "get p99 ms", "errors"],
        rows,
        digits=2,
    )
    rows = [
        [
            r["case"],
            "yes" if r["with_digests"] else "no",
            r["rtt_ms_p50"],
            r["rtt_ms_p95"],
            r["rtt_ms_max"],
            r["decode_ms_p50"],
            r["reply_kib"],
            r["plan_sources"],
            r["plan_entries"],
        ]
        for r in out["latency"]
    ]
    print_table(
        f"GET of a {out['big_gib']:g} GiB file: round trip from a registered requester holding nothing",
        [
            "holders",
            "digests",
            "p50 ms",
            "p95 ms",
            "max ms",
            "client decode ms",
            "reply KiB",
            "sources",
            "plan entries",
        ],
        rows,
        digits=2,
    )
    for r in out["latency"]:
        case = r["case"].split(" (")[0].replace(" ", "_")
        key = f"get_ms_{'digests' if r['with_digests'] else 'known'}_{case}"
        summary[key] = r["rtt_ms_p50"]
    rss = out["rss"]
    rows = [
        ["broker, catalog loaded, no peers", rss["idle_mib"]],
        [f"broker, {args.holders} peers", rss[f"{args.holders}_peers_mib"]],
        [f"broker, {args.peers} peers ({rss['live_peers']} live in stats)", rss[f"{args.peers}_peers_mib"]],
        [f"broker, {args.peers} peers, after the GETs", rss["after_gets_mib"]],
        ["broker peak (VmHWM)", rss["peak_after_gets_mib"]],
        ["raw echo process, idle", rss["echo"]["idle_mib"]],
        [f"raw echo process, {rss['echo']['connections']} connections", rss["echo"]["connected_mib"]],
    ]
    print_table(
        f"memory (VmRSS MiB), peers each holding the whole {out['big_gib']:g} GiB file",
        ["process", "MiB"],
        rows,
    )
    summary["broker_rss_peers_mib"] = rss[f"{args.peers}_peers_mib"]
    summary["broker_rss_idle_mib"] = rss["idle_mib"]
    summary["echo_rss_connected_mib"] = rss["echo"]["connected_mib"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = run(args)
    out["summary"] = report(out, args)
    save("broker", args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
