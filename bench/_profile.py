"""Sampling profiles of benchmark processes with py-spy (`pip install py-spy`), summarised as tables.

`Profiler` attaches `py-spy record --format raw --threads` to each PID it is given (a py-spy process
this benchmark starts, stopped by its PID with SIGINT, which makes it write its file). Samples are
on-CPU only (py-spy leaves idle threads out), so the tables say where CPU time goes: the share of
samples whose innermost frame is a function ("self") and whose stack contains it ("total").
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any


def available() -> bool:
    return shutil.which("py-spy") is not None


class Profiler:
    def __init__(self, targets: dict[str, int], out_dir: Path, rate: int = 250) -> None:
        self.targets = targets
        self.out_dir = out_dir
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paths: dict[str, Path] = {}

    def __enter__(self) -> Profiler:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for label, pid in self.targets.items():
            path = self.out_dir / f"{label}.txt"
            path.unlink(missing_ok=True)
            self.paths[label] = path
            self.procs[label] = subprocess.Popen(
                [
                    "py-spy",
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--threads",
                    "--nonblocking",
                    "--rate",
                    str(self.rate),
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        time.sleep(0.5)  # py-spy needs a moment to attach
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def summaries(self, top: int = 12) -> dict[str, dict[str, Any]]:
        return {label: summarize(path, top) for label, path in self.paths.items() if path.is_file()}


def _short(frame: str) -> str:
    """'fn (path/to/mod.py:123)' -> 'fn (mod.py:123)', keeping the parent folder for our packages."""
    if "(" not in frame:
        return frame
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    short = (
        "/".join(parts[-2:])
        if len(parts) >= 2 and parts[-2] in ("common", "broker", "peer", "bench")
        else parts[-1]
    )
    return f"{name} ({short})"


def _without_line(frame: str) -> str:
    head, sep, tail = frame.rpartition(":")
    return head + ")" if sep and tail.rstrip(")").isdigit() else frame


def summarize(path: Path, top: int = 12) -> dict[str, Any]:
    """Self and total sample shares per function, per thread, and the hottest lines."""
    self_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else ""
        frames = [f for f in frames if not f.startswith(("thread", "process"))]
        if not frames:
            continue
        samples += count
        threads[thread.split(" (")[0] + " " + thread.split(" ")[-1] if thread else "?"] += count
        leaf = _short(frames[-1])
        self_line[leaf] += count
        self_fn[_without_line(leaf)] += count
        for fn in {_without_line(_short(f)) for f in frames}:
            total_fn[fn] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / samples, 1)) for k, v in counter.most_common(top)] if samples else []

    return {
        "samples": samples,
        "threads_pct": share(threads),
        "self_pct": share(self_fn),
        "total_pct": share(total_fn),
        "hot_lines_pct": share(self_line),
    }


def print_summary(label: str, summary: dict[str, Any], top: int = 10) -> None:
    print(f"\nprofile {label}: {summary['samples']} on-CPU samples")
    for title, key in (
        ("threads", "threads_pct"),
        ("self", "self_pct"),
        ("total (inclusive)", "total_pct"),
        ("hot lines (self)", "hot_lines_pct"),
    ):
        print(f"  {title}:")
        for name, pct in summary[key][:top]:
            print(f"    {pct:5.1f}%  {name}")


# --------------------------------------------------------------------------- perf (whole machine)


def perf_available() -> bool:
    return shutil.which("perf") is not None


class PerfSystem:
    """`perf record -a -g` over the whole machine while the block runs (all processes, kernel too).

    py-spy says which Python function is running; perf says where the CPU goes below it: the
    kernel's copies (TCP loopback, page cache), libzmq, blake3, the interpreter. `roles` names the
    processes of interest (label -> pid): their thread ids are read on exit, while they still run,
    so that samples can be attributed to them. perf is stopped by its PID (SIGINT: it writes its file).
    """

    def __init__(self, out: Path, roles: dict[str, int] | None = None, freq: int = 499) -> None:
        self.out = out
        self.freq = freq
        self.roles = roles or {}
        self.tid_roles: dict[int, str] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PerfSystem:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["perf", "record", "-a", "-g", "-F", str(self.freq), "-o", str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: Any) -> None:
        for role, pid in self.roles.items():
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    self.tid_roles[int(tid)] = role
            except OSError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


_CATEGORIES = (
    ("blake3", ("blake3",)),
    (
        "kernel: TCP/loopback",
        ("tcp_", "skb_", "sock_", "__sys_recvfrom", "__sys_sendto", "net_", "ip_", "loopback"),
    ),
    (
        "kernel: page cache write",
        ("copy_folio_from_iter", "shmem_write", "generic_perform_write", "ext4_da_write"),
    ),
    ("kernel: copies to/from user", ("_copy_to_iter", "_copy_from_iter", "copy_user", "rep_movs")),
    (
        "kernel: page faults / memory",
        (
            "clear_page",
            "do_anonymous_page",
            "handle_mm_fault",
            "page_fault",
            "folio_",
            "free_unref",
            "__alloc_pages",
            "get_page_from_freelist",
            "release_pages",
            "zap_",
        ),
    ),
    (
        "kernel: scheduler / futex / poll",
        (
            "schedule",
            "futex",
            "do_sys_poll",
            "ep_poll",
            "try_to_wake_up",
            "finish_task_switch",
            "pick_next",
            "update_",
            "enqueue",
            "dequeue",
        ),
    ),
    ("libzmq", ("zmq::", "zmq_")),
    (
        "python interpreter",
        (
            "_PyEval",
            "PyObject",
            "_Py",
            "Py",
            "list_",
            "dict_",
            "tuple",
            "unicode",
            "long_",
            "bytes_",
            "frame_",
            "method_",
            "gc_",
            "visit_",
        ),
    ),
    ("libc memcpy/malloc", ("__memmove", "__memcpy", "malloc", "free", "_int_", "memset")),
)


def perf_summary(path: Path, tid_roles: dict[int, str] | None = None, top: int = 25) -> dict[str, Any]:
    """Self time by role (processes named in PerfSystem(roles=...), libzmq I/O threads apart), by
    category (kernel copies, blake3, libzmq, interpreter, ...) and the top symbols."""
    command = ["perf", "report", "-i", str(path), "--no-children", "--sort", "pid,dso,sym"]
    command += ["--stdio", "-g", "none", "--percent-limit", "0.02"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    tid_roles = tid_roles or {}
    rows: list[tuple[float, str, str, str]] = []
    by_role: Counter[str] = Counter()
    for line in proc.stdout.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line.split()[0]:
            continue
        parts = line.split()
        try:
            pct = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        tid_text, _, comm = parts[1].partition(":")
        dso = parts[2]
        sym = " ".join(parts[4:]) if len(parts) > 4 else ""
        rows.append((pct, comm, dso, sym))
        role = tid_roles.get(int(tid_text), "other") if tid_text.isdigit() else "other"
        if comm.startswith("ZMQbg"):
            role += " (libzmq I/O thread)"
        elif comm == "swapper":
            role = "idle"
        by_role[role] += pct
    by_cat: Counter[str] = Counter()
    by_sym: Counter[str] = Counter()
    for pct, _comm, dso, sym in rows:
        kernel = dso == "[kernel.kallsyms]"
        cat = "other kernel" if kernel else f"other ({dso})"
        for name, needles in _CATEGORIES:
            if name.startswith("kernel") and not kernel:
                continue
            if any(n in sym for n in needles):
                cat = name
                break
        by_cat[cat] += pct
        by_sym[f"{sym} [{dso}]"] += pct
    return {
        "by_role_pct": [(k, round(v, 1)) for k, v in by_role.most_common(30)],
        "by_category_pct": [(k, round(v, 1)) for k, v in by_cat.most_common()],
        "top_symbols_pct": [(k, round(v, 2)) for k, v in by_sym.most_common(top)],
    }


def print_perf(label: str, summary: dict[str, Any]) -> None:
    print(f"\nperf {label} (whole machine, % of all samples):")
    for title, key in (
        ("by role", "by_role_pct"),
        ("by category", "by_category_pct"),
        ("top symbols", "top_symbols_pct"),
    ):
        print(f"  {title}:")
        for name, pct in summary[key][:20]:
            print(f"    {pct:5.1f}%  {name}")
