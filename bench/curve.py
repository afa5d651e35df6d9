"""What CURVE (+ ZAP) costs: MiB/s of 16 KiB replies over loopback, with and without it, in one run.

    python -m bench.curve                   # 3 s per measurement, 2 rounds
    python -m bench.curve --duration 1 --rounds 1

What runs
---------
A server process (multiprocessing, spawn) binds two ROUTERs on 127.0.0.1: one plain (NULL), one
CURVE server set up exactly as zswarm's will be (`apply_server`: ZAP domain enforced, an
`Authenticator` thread, an allow-list folder holding the client's key). Every request gets a
16 KiB reply. This process is the client, with one fresh socket per measurement:

- req/rep:  a REQ sends a small request and waits for its 16 KiB reply, one at a time (latency-bound,
            like a downloader asking one source for one batch);
- stream:   a DEALER keeps 16 requests in flight (throughput-bound, like a lane of segment requests);
- connect:  a new DEALER connects, sends one request and gets its reply: the handshake's cost
            (CURVE key exchange and the ZAP round trip happen here, once per connection).

MiB/s counts reply payload only. Each round measures plain then CURVE (the next round the other way
round, so drift in the machine's load hits both alike); the figure is the mean over rounds. The
server process is stopped by its PID in a `finally`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

from bench._util import save
from common.security import (
    AllowList,
    Authenticator,
    KeyPair,
    apply_client,
    apply_server,
    generate_keypair,
    load_secret,
)

SEGMENT = 16 * 1024
MiB = 1 << 20
IN_FLIGHT = 16
HOST = "127.0.0.1"
REPLY_TIMEOUT_MS = 10_000  # a reply later than this means the server is gone: fail, never hang
CONNECT_SAMPLES = 20


# --------------------------------------------------------------------------- server process


def _serve(conn: multiprocessing.connection.Connection, secret_file: str, allow_dir: str) -> None:
    """Answer every request on both ROUTERs with 16 KiB until told to stop (or the parent is gone)."""
    ctx: zmq.Context[Any] = zmq.Context()
    auth = Authenticator(ctx, AllowList(allow_dir))
    auth.start()
    plain: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    curve: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
    try:
        for sock in (plain, curve):
            sock.setsockopt(zmq.LINGER, 0)
        apply_server(curve, load_secret(secret_file))
        ports = [sock.bind_to_random_port(f"tcp://{HOST}") for sock in (plain, curve)]
        conn.send(ports)
        payload = os.urandom(SEGMENT)
        poller = zmq.Poller()
        poller.register(plain, zmq.POLLIN)
        poller.register(curve, zmq.POLLIN)
        poller.register(conn.fileno(), zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if conn.fileno() in events:
                return  # "stop", or EOF: the parent went away
            for sock in (plain, curve):
                if sock in events:
                    for _ in range(64):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        sock.send_multipart([*frames[:-1], payload])  # same envelope (REQ: + empty)
    finally:
        plain.close(linger=0)
        curve.close(linger=0)
        auth.stop()
        ctx.term()


# --------------------------------------------------------------------------- client side


def _recv(sock: zmq.Socket[Any]) -> list[bytes]:
    if not sock.poll(REPLY_TIMEOUT_MS):
        raise RuntimeError(f"no reply within {REPLY_TIMEOUT_MS} ms: is the server process alive?")
    return sock.recv_multipart()


def _socket(
    ctx: zmq.Context[Any], kind: int, endpoint: str, curve: tuple[KeyPair, bytes] | None
) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        apply_client(sock, *curve)
    sock.connect(endpoint)
    return sock


def _req_rep(
    ctx: zmq.Context[Any], endpoint: str, curve: tuple[KeyPair, bytes] | None, duration: float
) -> float:
    sock = _socket(ctx, zmq.REQ, endpoint, curve)
    try:
        sock.send(b"r")
        _recv(sock)  # connected and authenticated: the handshake is not part of the figure
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            sock.send(b"r")
            count += len(_recv(sock)[-1])
        return count / MiB / elapsed
    finally:
        sock.close(linger=0)


def _stream(
    ctx: zmq.Context[Any], endpoint: str, curve: tuple[KeyPair, bytes] | None, duration: float
) -> float:
    sock = _socket(ctx, zmq.DEALER, endpoint, curve)
    try:
        sock.send(b"r")
        _recv(sock)
        for _ in range(IN_FLIGHT):
            sock.send(b"r")
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration:
            count += len(_recv(sock)[-1])
            sock.send(b"r")
        for _ in range(IN_FLIGHT):  # drain, so the next measurement starts from an idle server
            _recv(sock)
        return count / MiB / elapsed
    finally:
        sock.close(linger=0)


def _connect_ms(ctx: zmq.Context[Any], endpoint: str, curve: tuple[KeyPair, bytes] | None) -> float:
    samples = []
    for _ in range(CONNECT_SAMPLES):
        start = time.perf_counter()
        sock = _socket(ctx, zmq.DEALER, endpoint, curve)
        try:
            sock.send(b"r")
            _recv(sock)
        finally:
            sock.close(linger=0)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def curve_throughput(duration_s: float = 3.0, rounds: int = 2) -> dict[str, float]:
    """MiB/s of 16 KiB replies, plain and CURVE, for req/rep and a 16-in-flight stream, plus the
    median ms to connect and get a first reply. Keys: {reqrep,stream}_{plain,curve}_mibs,
    connect_{plain,curve}_ms."""
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="zswarm-bench-curve-") as tmp:
        root = Path(tmp)
        (root / "allow").mkdir()
        _, server_secret = generate_keypair(root / "server", "server")
        client_public, client_secret = generate_keypair(root / "client", "client")
        (root / "allow" / client_public.name).write_bytes(client_public.read_bytes())
        client = (load_secret(client_secret), load_secret(server_secret).public)

        mp = multiprocessing.get_context("spawn")
        parent_end, child_end = mp.Pipe()
        server = mp.Process(
            target=_serve, args=(child_end, str(server_secret), str(root / "allow")), daemon=True
        )
        ctx: zmq.Context[Any] = zmq.Context()
        server.start()
        try:
            if not parent_end.poll(30):
                raise RuntimeError("the server process did not start within 30 s")
            plain_port, curve_port = parent_end.recv()
            endpoints = {"plain": f"tcp://{HOST}:{plain_port}", "curve": f"tcp://{HOST}:{curve_port}"}
            for index in range(rounds):
                order = ["plain", "curve"] if index % 2 == 0 else ["curve", "plain"]
                for mode in order:
                    keys = client if mode == "curve" else None
                    results.setdefault(f"reqrep_{mode}_mibs", []).append(
                        _req_rep(ctx, endpoints[mode], keys, duration_s)
                    )
                for mode in order:
                    keys = client if mode == "curve" else None
                    results.setdefault(f"stream_{mode}_mibs", []).append(
                        _stream(ctx, endpoints[mode], keys, duration_s)
                    )
                for mode in order:
                    keys = client if mode == "curve" else None
                    results.setdefault(f"connect_{mode}_ms", []).append(
                        _connect_ms(ctx, endpoints[mode], keys)
                    )
        finally:
            ctx.destroy(linger=0)
            try:
                parent_end.send("stop")
            except OSError:
                pass  # already gone
            parent_end.close()
            server.join(5)
            if server.is_alive() and server.pid is not None:
                os.kill(server.pid, 15)  # by its PID, never by name
                server.join(5)
    return {key: statistics.fmean(values) for key, values in results.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.curve", description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, alternating plain/CURVE order (default 2)")
    ap.add_argument("--results-name", default="curve", help="bench/results/<name>.json")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    r = curve_throughput(args.duration, args.rounds)
    load_after = os.getloadavg()[0]
    print(f"{'':10} {'plain':>10} {'CURVE':>10} {'CURVE/plain':>12}")
    for name, unit in (("reqrep", "MiB/s"), ("stream", "MiB/s")):
        plain, curve = r[f"{name}_plain_mibs"], r[f"{name}_curve_mibs"]
        print(f"{name:10} {plain:10.1f} {curve:10.1f} {curve / plain:11.0%}   {unit}, 16 KiB replies")
    plain, curve = r["connect_plain_ms"], r["connect_curve_ms"]
    print(f"{'connect':10} {plain:10.2f} {curve:10.2f} {curve / plain:11.1f}x   ms to a first reply (median)")
    print(f"load average {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    save("curve", args, {"results": r, "load_average": [load_before, load_after]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
