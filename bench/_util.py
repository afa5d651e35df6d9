"""Shared pieces of the benchmarks: files, processes, /proc readings, tables and result files.

Every process a benchmark starts is started through the launcher (launcher/): zswarm brokers and
peers by a process-mode `Swarm` (`bench_swarm`), the benchmarks' own workers (`Child`) by the same
process driver. Each is stopped by its PID in a `finally` (ExitStack callbacks, or the swarm's
close). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from common.checkout import git_state
from launcher import BrokerHandle, ChildProcess, LauncherError, PeerHandle, Swarm

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
HOST = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- files


def make_file(path: Path, size: int, seed: str = "zswarm-bench", sparse: bool = False) -> Path:
    """A file of `size` pseudo-random bytes (blake3 XOF: every 16 KiB segment distinct), or a sparse
    file of zeros. Reused when it already has the right size (the content is a function of seed)."""
    from blake3 import blake3

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size == size:
        return path
    with open(path, "wb") as f:
        if sparse:
            f.truncate(size)
            return path
        xof = blake3(seed.encode())
        chunk = 16 * MiB
        for offset in range(0, size, chunk):
            f.write(xof.digest(length=min(chunk, size - offset), seek=offset))
    return path


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (inherited by the children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def workdir(base: str | None, keep: bool, prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"zswarm-bench-{prefix}-", dir=base))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept work folder {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- /proc readings


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (/proc/<pid>/task/*/comm): libzmq names its I/O threads
    ZMQbg/IO/n and ZMQbg/Reaper; Python threads all show as the program name."""
    out: dict[str, float] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{task}/stat") as f:
                text = f.read()
        except OSError:
            continue  # the thread ended meanwhile
        fields = text[text.rindex(")") + 2 :].split()
        key = (
            "zmq-io" if name.startswith("ZMQbg/IO") else "zmq-other" if name.startswith("ZMQbg") else "python"
        )
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after.get(k, 0.0) - before.get(k, 0.0), 3) for k in after}


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy (all CPUs, /proc/stat: everything but idle/iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class Background:
    """How busy the machine was with processes other than ours over a window, in cores.

    The machine is shared: other sessions' tests and loads run at the same time. Every benchmark
    records this next to its figures, so a run measured while something else ate a core says so."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def __enter__(self) -> Background:
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.ours0 = sum(_cpu_or_zero(p) for p in self.pids) + self_cpu_seconds()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        busy = machine_busy_seconds() - self.busy0
        ours = sum(_cpu_or_zero(p) for p in self.pids) + self_cpu_seconds() - self.ours0
        self.other_cores = max(busy - ours, 0.0) / self.seconds if self.seconds > 0 else 0.0


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def busy_elsewhere(seconds: float = 1.0) -> float:
    """Cores used by other processes over `seconds` now (a check before measuring)."""
    with Background([]) as bg:
        time.sleep(seconds)
    return bg.other_cores


DISCARDED: list[dict[str, Any]] = []  # runs redone because other processes were busy (kept for the JSON)


def measure(run: Callable[[], dict[str, Any]], max_background: float, retries: int = 2) -> dict[str, Any]:
    """Run a measurement; if other processes used more than `max_background` cores meanwhile, put
    the row aside (it stays in the JSON under "discarded") and run again, at most `retries` times.
    The row returned says how many tries it took and whether it is still noisy."""
    for attempt in range(retries + 1):
        row = run()
        row["attempt"] = attempt + 1
        noisy = row.get("background_cores", 0.0) > max_background
        row["noisy"] = noisy
        if not noisy or attempt == retries:
            return row
        DISCARDED.append(dict(row, profile=None))
        print(f"    (other processes used {row['background_cores']:.2f} cores: measuring again)", flush=True)
        wait_quiet(30.0)
    return row


def wait_quiet(max_wait_s: float, threshold: float = 0.25) -> dict[str, float]:
    """Wait (up to max_wait_s) until other processes use less than `threshold` cores; says so."""
    t0 = time.monotonic()
    other = busy_elsewhere(1.0)
    warned = False
    while other > threshold and time.monotonic() - t0 < max_wait_s:
        if not warned:
            print(
                f"other processes use {other:.2f} cores; waiting up to {max_wait_s:.0f} s for quiet",
                flush=True,
            )
            warned = True
        other = busy_elsewhere(2.0)
    if other > threshold:
        print(
            f"warning: measuring while other processes use {other:.2f} of {os.cpu_count()} cores", flush=True
        )
    return {"other_cores_at_start": round(other, 3), "waited_s": round(time.monotonic() - t0, 1)}


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def prime_page_cache(folder: Path, nbytes: int) -> float:
    """Write then delete a ballast file of `nbytes` in `folder`; returns the seconds it took.

    Why: this machine is a VM whose host backs guest memory lazily and takes free pages back (free
    page reporting, ~2 s after they are freed). A download's new page-cache pages then cost a host
    fault each: measured here, a 256 MiB download from a peer ran at 80-300 MiB/s "cold" against
    780-900 MiB/s right after a ballast file of the same size was written and deleted (its pages go
    back to the free lists, still backed, and the download reuses them). Priming every timed run the
    same way measures zswarm on a page allocator like bare metal's; `--cold` in the benchmarks skips it.
    """
    if nbytes <= 0:
        return 0.0
    path = folder / ".bench-ballast"
    chunk = b"\x01" * (16 * MiB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range((nbytes + len(chunk) - 1) // len(chunk)):
            os.write(fd, chunk)
    finally:
        os.close(fd)
        os.unlink(path)
    return time.perf_counter() - t0


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a live process, in KiB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- processes


def overrides(pairs: Sequence[str] | None) -> dict[str, Any]:
    """['key=value', ...] from the command line into config fields (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def known_fields(model: Any, fields: dict[str, Any]) -> bool:
    """True when every key is a field of the pydantic config model (the core may rename fields)."""
    return set(fields) <= set(model.model_fields)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class ChildError(LauncherError):
    pass


class Child(ChildProcess):
    """`python -m bench._workers ROLE JSON`: a worker process answering with JSON lines on stdout.

    stderr goes to a log file; every read has a deadline; `stop()` closes stdin, then SIGTERM, then
    SIGKILL, always by this child's PID (launcher/process.py does all of that).
    """

    LEAVES_ON_EOF = True

    def __init__(self, role: str, params: dict[str, Any], log_path: Path) -> None:
        super().__init__(
            ["-m", "bench._workers", role, json.dumps(params)], log_path, cwd=ROOT, label=f"worker {role}"
        )
        self.role = role

    def send(self, line: str) -> None:
        self.send_line(line)

    def tail(self, lines: int = 6) -> str:
        return self.log_tail(lines)


# --------------------------------------------------------------------------- zswarm processes


def bench_swarm(folder: Path) -> Swarm:
    """A process-mode swarm in `folder` with the benchmarks' settings: everything on 127.0.0.1,
    log level WARNING, configs in `folder/NAME.yaml` and logs in `folder/logs/`, a broker's share in
    `folder/share` (relative paths are relative to `folder`). The broker may take minutes to be
    ready: it hashes big files first."""
    quiet = {"bind_host": HOST, "log_level": "WARNING"}
    return Swarm(folder, "process", quiet, quiet, log_dir=folder / "logs", ready_timeout=300.0)


def start_broker(folder: Path, name: str = "broker", **fields: Any) -> BrokerHandle:
    """A broker process (`python -m broker -c FOLDER/NAME.yaml --control`), ports chosen by the OS.
    The caller stops it (`.stop()`)."""
    return bench_swarm(folder).start_broker(name, **fields)


def start_peer(folder: Path, name: str, tracker: str, **fields: Any) -> PeerHandle:
    """A peer process (`python -m peer -c FOLDER/NAME.yaml control`) with its own data folder
    `FOLDER/data-NAME`, not yet registered (see wait_registered). The caller stops it (stop_peer)."""
    fields = {"data_dir": f"data-{name}", **fields}
    return bench_swarm(folder).add_peer(name, broker=tracker, register=False, ready_timeout=60.0, **fields)


PLAIN_STOP = False  # True: stop peers with SIGTERM at once, no quit first (see stop_peer)


def stop_peer(peer: PeerHandle, timeout: float = 10.0) -> None:
    """Let a peer leave cleanly (the control channel's quit: it says bye to the broker), then make
    sure it is gone, by PID.

    PLAIN_STOP sends SIGTERM at once instead. With the old prompt driver a SIGTERM could land inside
    Peer.close() and cut the bye short, leaving the broker to offer a departed peer until it was
    evicted (see docs/BENCHMARKS.md, findings); the control channel treats SIGTERM as a quit, which
    `--plain-stop` lets a benchmark confirm."""
    if PLAIN_STOP:
        peer.signal(signal.SIGTERM)
    peer.stop(timeout)


def wait_registered(peer: PeerHandle, timeout: float = 20.0) -> None:
    if not peer.wait_registered(timeout):
        raise ChildError(f"peer {peer.name} did not register within {timeout} s")


class TrackerClient:
    """A DEALER speaking the tracker protocol (for broker stats and load generation)."""

    def __init__(self, tracker: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(tracker)
        self._rid = 0

    def request(self, make: Any, timeout: float = 10.0) -> Any:
        from common import protocol

        self._rid += 1
        self.sock.send_multipart(protocol.encode(make(self._rid)))
        if not self.sock.poll(int(timeout * 1000)):
            raise ChildError("the broker did not answer")
        return protocol.decode(self.sock.recv_multipart())

    def stats(self) -> dict[str, Any]:
        from common.protocol import StatsRequest

        reply = self.request(StatsRequest)
        return dict(reply.stats)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


# --------------------------------------------------------------------------- reporting


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def quantile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[k])


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 1) -> None:
    cells = [[fmt(v, digits) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


_AT_START = git_state()  # the core may change while a long run goes on: both ends are recorded


def environment() -> dict[str, Any]:
    import blake3
    import msgpack
    import zmq

    commit, dirty = git_state()
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "blake3": getattr(blake3, "__version__", "?"),
        "platform": platform.platform(),
        "commit": commit,
        "core_modified_since_commit": dirty,
        "commit_at_start": _AT_START[0],
        "core_modified_at_start": _AT_START[1],
    }


def save(name: str, args: Any, results: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = getattr(args, "results_name", None) or name
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "args": vars(args), "environment": environment(), **results}
    data["discarded"] = DISCARDED
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
