"""Worker processes for the benchmarks: `python -m bench._workers ROLE PARAMS_JSON`.

Roles
-----
pull          bind a PULL socket, receive `count` messages; optionally blake3-verify each 16 KiB
              message against the file's manifest and pwrite it (the work a downloader does)
push          connect a PUSH socket and stream a file as 16 KiB messages
echo          a raw pyzmq ROUTER echo loop (the baseline of the tracker benchmark)
tracker-load  a tracker client: one registered fake peer (DEALER) sending haves and pings, one
              unregistered downloader (DEALER) sending gets, a PUB sending heartbeats; `inflight`
              requests in flight in all, for `duration` seconds after "go" on stdin

Each prints JSON lines on stdout: {"event": "ready", ...} when its sockets are up, then a result.
Every loop is bounded (a message count with a deadline, or a duration); every worker also stops
when its stdin closes (the parent went away).
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import time
from collections import deque
from typing import Any

import zmq

SEGMENT = 16 * 1024


def emit(**values: Any) -> None:
    print(json.dumps(values), flush=True)


def wait_line(timeout: float) -> str | None:
    """One line from stdin within `timeout` s ('' on EOF, None on timeout)."""
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        return None
    return sys.stdin.readline()


def cpu_now() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- raw stream


def pull(p: dict[str, Any]) -> None:
    from blake3 import blake3

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1000)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    digests = b""
    fd = -1
    if p.get("verify"):
        from common.manifest import hash_file

        digests = hash_file(p["file"], "x").digests
        fd = os.open(p["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, os.path.getsize(p["file"]))
    emit(event="ready", endpoint=f"tcp://127.0.0.1:{port}")
    count = int(p["count"])
    deadline = time.monotonic() + float(p.get("timeout", 120))
    received = nbytes = bad = 0
    first = last = 0.0
    cpu0 = cpu_now()
    while received < count:
        if not sock.poll(1000):
            if time.monotonic() > deadline:
                break
            continue
        msg = sock.recv(copy=False)
        if received == 0:
            first = time.perf_counter()
        buf = msg.buffer
        if fd >= 0:
            i = received
            if blake3(buf).digest() != digests[i * 32 : i * 32 + 32]:
                bad += 1
            else:
                os.pwrite(fd, buf, i * SEGMENT)
        nbytes += len(buf)
        received += 1
    last = time.perf_counter()
    cpu = cpu_now() - cpu0
    if fd >= 0:
        os.close(fd)
    sock.close(linger=0)
    ctx.term()
    emit(event="done", messages=received, bytes=nbytes, seconds=last - first, cpu_s=cpu, bad=bad)


def push(p: dict[str, Any]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 5000)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(p["endpoint"])
    emit(event="ready")
    chunk = 64 * SEGMENT
    sent = 0
    cpu0 = cpu_now()
    with open(p["file"], "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            data = memoryview(os.pread(fd, chunk, offset))
            for k in range(0, len(data), SEGMENT):
                sock.send(data[k : k + SEGMENT])
                sent += 1
    cpu = cpu_now() - cpu0
    sock.close()  # linger: let the queue drain
    ctx.term()
    emit(event="done", messages=sent, cpu_s=cpu)


# --------------------------------------------------------------------------- tracker baseline


def echo(p: dict[str, Any]) -> None:
    ctx = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 4096)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 10_000)
    router.setsockopt(zmq.RCVHWM, 10_000)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(sys.stdin.fileno(), zmq.POLLIN)
    emit(event="ready", endpoint=f"tcp://127.0.0.1:{port}", pid=os.getpid())
    deadline = time.monotonic() + float(p.get("max_seconds", 600))
    handled = dropped = 0
    while time.monotonic() < deadline:
        events = dict(poller.poll(500))
        if sys.stdin.fileno() in events:
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
            if line.strip() == "count":
                emit(event="count", handled=handled)
        if router in events:
            for _ in range(256):  # same drain budget as the tracker
                try:
                    frames = router.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    router.send_multipart(frames, zmq.NOBLOCK)
                except zmq.ZMQError:
                    dropped += 1
                handled += 1
    router.close(linger=0)
    ctx.term()
    emit(event="done", handled=handled, dropped=dropped)


def _parse_mix(text: str) -> list[str]:
    ops: list[str] = []
    for part in text.split(","):
        name, _, weight = part.partition(":")
        ops += [name.strip()] * int(weight or 1)
    random.Random(7).shuffle(ops)
    return ops


def tracker_load(p: dict[str, Any]) -> None:
    from common import protocol
    from common.protocol import Get, Have, Heartbeat, Ping, Register, Registered

    echo_mode = bool(p.get("echo"))
    name = p["name"]
    file_id = bytes.fromhex(p["file_id"])
    segments = int(p["segments"])
    block = 64
    rng = random.Random(name)
    ctx = zmq.Context()

    def dealer() -> zmq.Socket[Any]:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 10_000)
        s.setsockopt(zmq.RCVHWM, 10_000)
        s.connect(p["tracker"])
        return s

    peer, getter = dealer(), dealer()
    pub = None
    token = bytes(16)
    if not echo_mode:
        reply_frames = None
        peer.send_multipart(protocol.encode(Register(1, name, "tcp://127.0.0.1:9", ())))
        if peer.poll(10_000):
            reply_frames = peer.recv_multipart()
        registered = protocol.decode(reply_frames) if reply_frames is not None else None
        if not isinstance(registered, Registered):
            emit(event="error", error="registration failed")
            return
        token = registered.token
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 10_000)
        pub.connect(p["heartbeat"])

    # Pre-encoded requests: the client's own cost stays small next to the server's.
    haves = []
    for i in range(256):
        first = rng.randrange(0, max(segments - block, 1))
        haves.append(protocol.encode(Have(i + 1, file_id, ((first, rng.randint(1, block)),))))
    get = protocol.encode(Get(1, p["file_name"], known_file_id=file_id))
    ping = protocol.encode(Ping(1))
    # Protocol 2: a heartbeat carries the registration's token and a growing sequence number, so
    # each is encoded when sent (a replayed one would be refused, and cost the broker less).
    beat_seq = [0]

    def beat() -> list[bytes]:
        beat_seq[0] += 1
        return protocol.encode(Heartbeat(name, token, beat_seq[0]))  # type: ignore[return-value]

    mix = _parse_mix(p["mix"])
    inflight = int(p["inflight"])
    queues: dict[zmq.Socket[Any], deque[tuple[float, str]]] = {peer: deque(), getter: deque()}
    poller = zmq.Poller()
    poller.register(peer, zmq.POLLIN)
    poller.register(getter, zmq.POLLIN)
    emit(event="ready")
    line = wait_line(60.0)
    if not line or line.strip() != "go":
        emit(event="error", error="no go")
        return
    latencies: dict[str, list[float]] = {op: [] for op in set(mix)}
    replies: dict[str, int] = dict.fromkeys(set(mix), 0)
    sent: dict[str, int] = dict.fromkeys(set(mix), 0)
    errors = checked = 0
    k = 0
    duration = float(p["duration"])
    start_wall = time.time()
    start = time.perf_counter()
    end = start + duration
    cpu0 = cpu_now()
    outstanding = 0
    drain_deadline = end + 3.0
    now = start
    while True:
        now = time.perf_counter()
        sending = now < end
        if not sending and (outstanding == 0 or now > drain_deadline):
            break
        burst = 0
        while sending and outstanding < inflight and burst < 4 * len(mix):
            burst += 1
            op = mix[k % len(mix)]
            k += 1
            sent[op] += 1
            if op == "hb" and pub is not None:
                pub.send_multipart(beat())
                replies[op] += 1  # fire and forget: counted by the broker, see the parent
                continue
            sock = getter if op == "get" else peer
            frames = (
                get if op == "get" else ping if op == "ping" else beat() if op == "hb" else haves[k & 255]
            )
            sock.send_multipart(frames)
            queues[sock].append((time.perf_counter(), op))
            outstanding += 1
        for sock, _ in poller.poll(100):
            q = queues[sock]
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t0, op = q.popleft()
                outstanding -= 1
                replies[op] += 1
                latencies[op].append(time.perf_counter() - t0)
                if not echo_mode and (replies[op] & 63) == 1:
                    checked += 1
                    msg = protocol.decode(frames)
                    if type(msg).__name__ == "Error":
                        errors += 1
    cpu = cpu_now() - cpu0
    elapsed = min(time.perf_counter(), end) - start
    for s in (peer, getter, pub):
        if s is not None:
            s.close(linger=0)
    ctx.term()
    summary = {}
    for op, values in latencies.items():
        values.sort()
        summary[op] = {
            "p50_ms": values[len(values) // 2] * 1000 if values else None,
            "p99_ms": values[int(len(values) * 0.99)] * 1000 if values else None,
        }
    emit(
        event="done",
        start=start_wall,
        seconds=elapsed,
        answered={op: n for op, n in replies.items() if op != "hb" or echo_mode},
        heartbeats_sent=sent.get("hb", 0) if not echo_mode else 0,
        sent=sent,
        unanswered=outstanding,
        errors=errors,
        checked=checked,
        latency=summary,
        cpu_s=cpu,
    )


ROLES = {"pull": pull, "push": push, "echo": echo, "tracker-load": tracker_load}

if __name__ == "__main__":
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
