"""Emulated hosts for swarm benchmarks: network namespaces, one bridge, `tc tbf` on every link.

    with Topology([HostSpec(100)] * 5) as net:          # 5 hosts, 100 Mbit/s uplinks
        proc = subprocess.Popen([*net.prefix(0), "some-server", net.address(0)])
        with net.sampler() as bytes_seen, MachineCpu() as busy:
            ...                                           # the measured run

Method. Host i is the network namespace `zsb-h<i>` with a single interface `eth0` (address
10.79.0.<i+1>/24), the end of a veth pair whose other end `zsbv<i>` is a port of the bridge `zsb-br`
in a namespace of its own, `zsb-hub`; nothing touches the machine's own interfaces. A host's uplink
is the egress of its `eth0`, shaped with `tc qdisc add dev eth0 root tbf rate <up>mbit burst 50000
latency 50ms`; a host with `down_mbit` also has its downlink shaped, as the egress of its bridge port
(the only way into the host). So every byte a host sends leaves through its own token bucket, and
what the bridge sees on port i is what host i really sent (port rx) and received (port tx).

Byte counters: ONE helper process inside the hub namespace reads /proc/net/dev (which lists every
port at once) every 100 ms and prints a JSON line per sample, with the shared CLOCK_MONOTONIC, so
the samples line up with the caller's `time.monotonic()`. That costs one small read per sample
instead of one `ip -s link` process per host per sample, which on 2 cores would itself be load.

CPU: `MachineCpu` gives the machine's busy fraction over a window from /proc/stat (all CPUs; a
run where it is near 100% measures the machine, not the swarm); `ProcessCpu` sums the CPU-seconds
of a set of live PIDs and their descendants (read from /proc/<pid>/stat before they exit), so a
system's cost can be taken as a delta over the timed window only.

Clean-up: the object deletes the namespaces it created (tracked in a list), also on exceptions and
Ctrl-C; at start it removes a stale namespace of exactly one of the names it is about to create (a
crashed earlier run), nothing else. Needs root, `ip` and `tc` (Debian: iproute2).

Run as a script (`python bench/netns.py sample IFACE_PREFIX`), this file is that helper process; it
then imports nothing but the standard library.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

PREFIX = "zsb"  # every namespace and interface made here starts with it (`zsw-` is another tool's)
SUBNET = "10.79.0"
SAMPLE_S = 0.1
LOCK_PATH = "/run/zsb-bench-netns.lock" if os.path.isdir("/run") else "/tmp/zsb-bench-netns.lock"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class HostSpec:
    """One host's links in Mbit/s: `up_mbit` its uplink (egress), or None for an unshaped one (only
    the machine limits it); `down_mbit` its downlink, or None for an unshaped downlink (then only
    the senders' uplinks limit what it receives)."""

    up_mbit: float | None
    down_mbit: float | None = None


@dataclass(frozen=True)
class Shaping:
    """tbf parameters: burst in bytes, latency (the queue a packet may wait in) in ms."""

    burst_bytes: int = 50000
    latency_ms: float = 50.0

    def tbf(self, rate_mbit: float) -> list[str]:
        return [
            "tbf",
            "rate",
            f"{rate_mbit:g}mbit",
            "burst",
            str(self.burst_bytes),
            "latency",
            f"{self.latency_ms:g}ms",
        ]


def run_cmd(*args: str, timeout: float = 30.0) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def why_not_netns() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: iproute2)"
    return None


def list_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.split()}


class Topology:
    """Hosts as network namespaces on one bridge, each link shaped by tbf. A context manager."""

    def __init__(self, hosts: list[HostSpec], shaping: Shaping | None = None) -> None:
        if not hosts or len(hosts) > 250:
            raise ValueError("between 1 and 250 hosts")
        self.hosts = list(hosts)
        self.shaping = shaping or Shaping()
        self.hub = f"{PREFIX}-hub"
        self.bridge = f"{PREFIX}-br"
        self.created: list[str] = []  # what __exit__ deletes: exactly these names, nothing else
        self._lock: IO[str] | None = None

    def ns(self, i: int) -> str:
        return f"{PREFIX}-h{i}"

    def port(self, i: int) -> str:
        return f"{PREFIX}v{i}"  # host i's bridge port, in the hub namespace

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        """The command prefix that starts a process inside host i (`ip netns exec` execs it: the
        PID of the Popen is the PID of the program)."""
        return ["ip", "netns", "exec", self.ns(i)]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "host": i,
                "ns": self.ns(i),
                "address": self.address(i),
                "up_mbit": h.up_mbit,
                "down_mbit": h.down_mbit,
            }
            for i, h in enumerate(self.hosts)
        ]

    def __enter__(self) -> Topology:
        # One topology at a time on this machine: the names are fixed, and the stale-namespace
        # clean-up below would otherwise delete a live run's hosts.
        self._lock = open(LOCK_PATH, "w")  # held until close()
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"another bench.netns topology is in use (lock {LOCK_PATH})") from None
        names = [self.hub, *(self.ns(i) for i in range(len(self.hosts)))]
        stale = list_namespaces() & set(names)
        for name in sorted(stale):  # a crashed earlier run of ours: same exact names
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        run_cmd("ip", "netns", "add", name)
        self.created.append(name)

    def _build(self) -> None:
        self._add_ns(self.hub)
        run_cmd("ip", "-n", self.hub, "link", "add", self.bridge, "type", "bridge")
        run_cmd("ip", "-n", self.hub, "link", "set", self.bridge, "up")
        run_cmd("ip", "-n", self.hub, "link", "set", "lo", "up")
        for i, spec in enumerate(self.hosts):
            ns, port = self.ns(i), self.port(i)
            self._add_ns(ns)
            # Both ends are created directly in their namespaces: no name clash with the machine's
            # own eth0, and nothing appears in the root namespace even for a moment.
            run_cmd(
                "ip",
                "link",
                "add",
                port,
                "netns",
                self.hub,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            run_cmd("ip", "-n", self.hub, "link", "set", port, "master", self.bridge)
            run_cmd("ip", "-n", self.hub, "link", "set", port, "up")
            run_cmd("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            run_cmd("ip", "-n", ns, "link", "set", "eth0", "up")
            run_cmd("ip", "-n", ns, "link", "set", "lo", "up")
            if spec.up_mbit is not None:
                run_cmd(
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    "eth0",
                    "root",
                    *self.shaping.tbf(spec.up_mbit),
                )
            if spec.down_mbit is not None:
                run_cmd(
                    "ip",
                    "netns",
                    "exec",
                    self.hub,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    port,
                    "root",
                    *self.shaping.tbf(spec.down_mbit),
                )

    def close(self) -> None:
        # Deleting a namespace deletes its veth ends (and so the pairs) and its qdiscs with it.
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.created.clear()
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __exit__(self, *exc: object) -> None:
        self.close()

    def qdisc_stats(self) -> dict[str, str]:
        """`tc -s qdisc` of every host's uplink (drops, overlimits): for the record."""
        out: dict[str, str] = {}
        for i in range(len(self.hosts)):
            try:
                text = run_cmd("ip", "netns", "exec", self.ns(i), "tc", "-s", "qdisc", "show", "dev", "eth0")
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
            out[f"h{i}"] = " ".join(text.split())
        return out

    def sampler(self) -> ByteSampler:
        return ByteSampler(self)


# --------------------------------------------------------------------------- byte counters


class ByteSampler:
    """Per-host tx/rx byte counters at 10 Hz, from one helper process in the hub namespace.

    On port i of the bridge, rx is what host i sent (after its uplink's tbf) and tx what it
    received. `mark()` asks for one sample now (the start of a timed window); `stop()` takes a last
    one and ends the helper. `samples` holds (monotonic time, {host: (tx, rx)}) tuples."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.samples: list[tuple[float, dict[int, tuple[int, int]]]] = []
        self.proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._marks: list[float] = []

    def __enter__(self) -> ByteSampler:
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.topology.hub,
                sys.executable,
                str(Path(__file__).resolve()),
                "sample",
                f"{PREFIX}v",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self._thread = threading.Thread(target=self._read, name="byte-sampler", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.samples:  # bounded: the first sample proves the helper runs
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("the byte sampler did not start")
            time.sleep(0.02)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            # The port's rx is what the host sent, its tx what the host received.
            ports = {int(k): (int(v[0]), int(v[1])) for k, v in value["ports"].items()}  # host: (tx, rx)
            with self._lock:
                self.samples.append((float(value["t"]), ports))
                if value.get("mark"):
                    self._marks.append(float(value["t"]))

    def mark(self, timeout: float = 2.0) -> float:
        """Take one sample now; returns its time (waits for it, bounded)."""
        assert self.proc is not None and self.proc.stdin is not None
        with self._lock:
            count = len(self._marks)
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self._marks) > count:
                    return self._marks[-1]
            time.sleep(0.005)
        return time.monotonic()

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the helper takes a last sample on end of input and exits
            self.proc.wait(3)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        if self._thread is not None:
            self._thread.join(3)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def at(self, t: float) -> dict[int, tuple[int, int]]:
        """Counters of the last sample taken at or before t (the first one if none)."""
        with self._lock:
            best = self.samples[0][1] if self.samples else {}
            for ts, ports in self.samples:
                if ts > t:
                    break
                best = ports
        return best

    def sent_between(self, host: int, t0: float, t1: float) -> int:
        return self.at(t1).get(host, (0, 0))[0] - self.at(t0).get(host, (0, 0))[0]

    def timeline(self, t0: float, t1: float, hosts: int, unit: int = 1024) -> dict[str, Any]:
        """KiB (`unit` bytes) sent (tx) and received (rx) by each host since t0, per sample in
        [t0 - 0.2, t1 + 0.5]; KiB keep a long run's JSON small, exact totals are taken elsewhere."""
        base = self.at(t0)
        with self._lock:
            window = [(t, p) for t, p in self.samples if t0 - 0.2 <= t <= t1 + 0.5]
        out: dict[str, Any] = {
            "unit_bytes": unit,
            "t": [round(t - t0, 2) for t, _ in window],
            "tx": {},
            "rx": {},
        }
        for h in range(hosts):
            b_tx, b_rx = base.get(h, (0, 0))
            out["tx"][f"h{h}"] = [round((p.get(h, (0, 0))[0] - b_tx) / unit) for _, p in window]
            out["rx"][f"h{h}"] = [round((p.get(h, (0, 0))[1] - b_rx) / unit) for _, p in window]
        return out


def _sample_main(port_prefix: str) -> int:
    """The helper: print {"t", "ports": {i: [rx, tx]}} for every port `<prefix><i>` every 100 ms,
    one more on each stdin line (marked), a last one at end of input."""

    def read() -> dict[str, list[int]]:
        ports: dict[str, list[int]] = {}
        with open("/proc/net/dev") as f:
            for line in f.readlines()[2:]:
                name, _, rest = line.partition(":")
                name = name.strip()
                if name.startswith(port_prefix) and name[len(port_prefix) :].isdigit():
                    fields = rest.split()
                    ports[name[len(port_prefix) :]] = [int(fields[0]), int(fields[8])]
        return ports

    def emit(out: IO[str], mark: bool = False) -> None:
        t = time.monotonic()
        record: dict[str, Any] = {"t": t, "ports": read()}
        if mark:
            record["mark"] = True
        out.write(json.dumps(record) + "\n")
        out.flush()

    next_at = time.monotonic()
    while True:
        emit(sys.stdout)
        next_at += SAMPLE_S
        while True:  # wait for the next tick, answering marks meanwhile
            wait = next_at - time.monotonic()
            if wait <= 0:
                break
            ready, _, _ = select.select([sys.stdin], [], [], wait)
            if ready:
                line = sys.stdin.readline()
                if not line:
                    emit(sys.stdout)
                    return 0
                emit(sys.stdout, mark=True)
        if next_at < time.monotonic() - 1:  # fell behind (a stalled machine): do not burst
            next_at = time.monotonic()


# --------------------------------------------------------------------------- CPU


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)


def children_map() -> dict[int, list[int]]:
    """parent PID -> child PIDs of every live process (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pids: list[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """The PIDs and every live descendant of them (nginx's workers, a shell's children...)."""
    children = children_map() if children is None else children
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def pid_cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of a live process (all threads); 0 when it is gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class ProcessCpu:
    """CPU-seconds of a set of processes (and their descendants) over a window: `start()` at the
    window's start, `stop()` before any of them exits. `extra` adds CPU taken elsewhere (the rusage
    of children reaped inside the window); `per_root` splits the rest by the PIDs given."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = list(pids)
        self.begin: dict[int, dict[int, float]] = {}
        self.per_root: dict[int, float] = {}
        self.seconds = 0.0
        self.extra = 0.0

    def _read(self) -> dict[int, dict[int, float]]:
        tree = children_map()
        return {root: {p: pid_cpu_seconds(p) for p in descendants([root], tree)} for root in self.pids}

    def start(self) -> None:
        self.begin = self._read()

    def stop(self) -> float:
        now = self._read()
        self.per_root = {
            root: round(sum(v - self.begin.get(root, {}).get(p, 0.0) for p, v in tree.items()), 3)
            for root, tree in now.items()
        }
        self.seconds = sum(self.per_root.values()) + self.extra
        return self.seconds


def machine_busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat; busy = everything but idle and iowait."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


class MachineCpu:
    """The whole machine's busy fraction over a window (1.0 = every core busy all the time)."""

    def __enter__(self) -> MachineCpu:
        self.b0, self.t0 = machine_busy_jiffies()
        self.busy_fraction = float("nan")
        self.busy_cpu_seconds = float("nan")
        self.elapsed_s = float("nan")
        self.stopped = False
        return self

    def stop(self) -> None:
        if self.stopped:  # the first stop (the end of the timed window) counts
            return
        self.stopped = True
        b1, t1 = machine_busy_jiffies()
        self.busy_fraction = (b1 - self.b0) / (t1 - self.t0) if t1 > self.t0 else float("nan")
        self.busy_cpu_seconds = (b1 - self.b0) / _CLK_TCK
        self.elapsed_s = (t1 - self.t0) / _CLK_TCK / (os.cpu_count() or 1)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Window:
    """One timed window of a run: byte-counter marks at both ends, the machine's busy fraction and
    the CPU-seconds of the system's processes in between. `stop(t_end)` may name the end (the last
    download's finish, as the system reported it) when it is called a little later."""

    def __init__(self, sampler: ByteSampler | None, pids: list[int]) -> None:
        self.sampler = sampler
        self.cpu = ProcessCpu(pids)
        self.machine = MachineCpu()
        self.t0 = self.t1 = self.end_mark = float("nan")

    def start(self) -> float:
        if self.sampler is not None:
            self.sampler.mark()
        self.cpu.start()
        self.machine.__enter__()
        self.t0 = time.monotonic()
        return self.t0

    def extra_cpu(self, seconds: float) -> None:
        self.cpu.extra += seconds

    def stop(self, t_end: float | None = None) -> None:
        now = time.monotonic()
        self.machine.stop()
        self.cpu.stop()
        self.t1 = t_end if t_end is not None else now
        self.end_mark = self.sampler.mark() if self.sampler is not None else now

    @property
    def cpu_seconds(self) -> float:
        return self.cpu.seconds

    @property
    def cpu_per_pid(self) -> dict[int, float]:
        return self.cpu.per_root

    @property
    def busy_fraction(self) -> float:
        return self.machine.busy_fraction


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sample":
        sys.exit(_sample_main(sys.argv[2]))
    print("usage: python bench/netns.py sample IFACE_PREFIX (the byte-sampler helper)", file=sys.stderr)
    sys.exit(2)
