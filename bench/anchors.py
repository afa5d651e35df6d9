"""Reference systems for the hosts benchmark, run on a `bench.netns.Topology`: libtorrent and nginx + curl.

Both answer the question zswarm answers in `bench.hosts`: host 0 has one file, hosts 1..N want it,
every link is shaped; how long until the last of them has it, and how much did host 0 upload?

libtorrent (Debian's python3-libtorrent, 2.0.8, in the system python /usr/bin/python3, not the
venv). A tracker in host 0 (Debian's opentracker, which is built in whitelist mode: the torrent's
info-hash is written to its whitelist; if opentracker is missing, a minimal HTTP tracker of this
file: BEP 3 announce, compact peer list). A v1 torrent with 256 KiB pieces. One worker process per
host (this file run with /usr/bin/python3, role `lt-worker`): the seeder in host 0 checks its copy
and announces before it reports ready; each downloader adds the torrent paused and reports ready.
The clock starts when every downloader has been told to resume; each downloader reports the
CLOCK_MONOTONIC time of its torrent_finished_alert. Settings: DHT, LSD, UPnP and NAT-PMP off (a
closed network with a tracker), several connections per IP allowed, no rate limits, uTP off in both
directions so that TCP is compared with TCP (zswarm runs over TCP); all else libtorrent's defaults
(notably 8 unchoke slots, rarest first). The seeder's `total_payload_upload` and `total_upload`
(payload and wire bytes as libtorrent counts them) are reported.

nginx + curl (Debian's nginx and curl). nginx in host 0 with a minimal configuration written into a
temporary folder (`daemon off`, one worker, `sendfile on`, pid and logs in that folder); N curl
processes, one per host, all started at once; time until the last exits. A plain server: it
must upload N copies through host 0's uplink, so it shows what the swarms save.

Each runner returns a dict: wall time, each downloader's finish, the origin's payload upload, the
CPU-seconds of the system's processes over the timed window (from /proc before they exit; for the
curls, which exit inside the window, from the rusage of reaped children) and how the window was
timed. `bench.hosts` adds the byte counters and the machine's load. Installing: `ensure_*` run
`apt-get install -y` only when the package is missing; when that fails the runner is skipped with
"skipped: <package> not installed". Every process is started inside its host, read with deadlines
and stopped by PID in a `finally`.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # the worker roles run under /usr/bin/python3 without the project on sys.path
    from bench.netns import Topology, Window

SYSTEM_PYTHON = "/usr/bin/python3"
HERE = Path(__file__).resolve()
PIECE_BYTES = 256 * 1024
TRACKER_PORT = 6969
LT_PORT = 6881
HTTP_PORT = 8080

# libtorrent settings for every worker (see the module docstring for why each).
LT_SETTINGS: dict[str, Any] = {
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
    "dht_bootstrap_nodes": "",  # no name look-ups towards the internet
    "allow_multiple_connections_per_ip": True,
    "enable_outgoing_utp": False,
    "enable_incoming_utp": False,
    "enable_outgoing_tcp": True,
    "enable_incoming_tcp": True,
    "upload_rate_limit": 0,
    "download_rate_limit": 0,
}
TRANSPORT = "TCP only (uTP off both ways)"


# --------------------------------------------------------------------------- installing


def _apt_install(package: str) -> bool:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for step in (["apt-get", "install", "-y", "-q", package], ["apt-get", "update", "-q"]):
        try:
            done = subprocess.run(step, capture_output=True, env=env, timeout=300)
        except subprocess.TimeoutExpired:
            return False
        if step[1] == "install" and done.returncode == 0:
            return True
    # The package lists may have been stale: one more try after the update.
    try:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", package], capture_output=True, env=env, timeout=300
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def _ensure(package: str, present: Callable[[], bool]) -> str | None:
    """None when `package` is there (installing it if missing and possible), else why not."""
    if present() or (_apt_install(package) and present()):
        return None
    return f"skipped: {package} not installed"


def _has_libtorrent() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    done = subprocess.run([SYSTEM_PYTHON, "-c", "import libtorrent"], capture_output=True, timeout=60)
    return done.returncode == 0


def ensure_libtorrent() -> str | None:
    return _ensure("python3-libtorrent", _has_libtorrent)


def ensure_nginx() -> str | None:
    return _ensure("nginx", lambda: nginx_binary() is not None) or _ensure(
        "curl", lambda: shutil.which("curl") is not None
    )


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@functools.cache  # one install attempt per run, not one per libtorrent run
def opentracker_binary() -> str | None:
    """Debian's opentracker, installed when missing; None means: use this file's own tracker."""
    if shutil.which("opentracker") is None:
        _apt_install("opentracker")
    return shutil.which("opentracker")


def libtorrent_version() -> str:
    done = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import libtorrent; print(libtorrent.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip()


# --------------------------------------------------------------------------- child processes


class JsonChild:
    """A process answering with JSON lines on stdout; stderr to a log; stopped by PID."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            cwd=cwd,
        )
        self.pid = self.proc.pid
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name=f"stdout-{self.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"pid {self.pid}: no answer within {timeout:.0f} s ({self.tail()})")
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"pid {self.pid} exited with {self.proc.wait(5)}: {self.tail()}")
            if line.startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()  # the workers leave on end of input
            except OSError:
                pass
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.kill(self.pid, signal.SIGKILL)
                    self.proc.wait(timeout)
        self._reader.join(timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def stop_popen(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Stop one process we started, by its PID: `sig`, then SIGKILL."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def wait_tcp(net: Topology, host: int, address: str, port: int, timeout: float = 15.0) -> None:
    """Wait (bounded) until `address:port` accepts a TCP connection, tried from inside host `host`."""
    probe = (
        "import socket, sys, time\n"
        f"end = time.monotonic() + {timeout}\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        f"        socket.create_connection(({address!r}, {port}), timeout=1).close(); sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run(
        [*net.prefix(host), sys.executable, "-c", probe], capture_output=True, timeout=timeout + 15
    )
    if done.returncode != 0:
        raise RuntimeError(f"{address}:{port} did not accept connections within {timeout:.0f} s")


# --------------------------------------------------------------------------- libtorrent runner


def make_torrent(work: Path, file: Path, tracker_url: str) -> tuple[Path, str]:
    """A v1 torrent of `file` with 256 KiB pieces announcing to `tracker_url`: (path, info-hash hex).
    Made once per tracker URL (hashing is not part of any timed window)."""
    out = work / f"file-{tracker_url.split('//')[1].split('/')[0].replace(':', '-')}.torrent"
    meta = out.with_suffix(".json")
    if not meta.exists():
        done = subprocess.run(
            [SYSTEM_PYTHON, str(HERE), "make-torrent", str(file), str(out), tracker_url],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"make-torrent failed: {done.stderr.strip()[-500:]}")
        meta.write_text(done.stdout)
    return out, json.loads(meta.read_text())["info_hash"]


def _start_opentracker(net: Topology, run_dir: Path, info_hash: str, binary: str) -> subprocess.Popen[Any]:
    # opentracker chroots into its folder and drops to `nobody`: the folder must be readable by it,
    # and the whitelist (Debian builds it in whitelist mode) named relative to it, as it is read
    # after the chroot.
    folder = run_dir / "opentracker"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "whitelist.txt").write_text(info_hash + "\n")
    os.chmod(folder, 0o755)
    os.chmod(folder / "whitelist.txt", 0o644)
    argv = [*net.prefix(0), binary, "-i", net.address(0), "-p", str(TRACKER_PORT), "-P", str(TRACKER_PORT)]
    argv += ["-d", str(folder), "-u", "nobody", "-w", "whitelist.txt"]
    with open(run_dir / "opentracker.log", "ab") as log:
        return subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def _start_tracker(
    net: Topology, run_dir: Path, info_hash: str, which: str = "auto"
) -> tuple[subprocess.Popen[Any] | JsonChild, str]:
    """A tracker in host 0: `opentracker`, `python` (this file's), or `auto` (opentracker when it is
    installed or installable and accepts connections, else this file's)."""
    address = net.address(0)
    binary = opentracker_binary() if which in ("auto", "opentracker") else None
    if which == "opentracker" and binary is None:
        raise RuntimeError("opentracker is not installed")
    if binary is not None:
        proc = _start_opentracker(net, run_dir, info_hash, binary)
        try:
            wait_tcp(net, 0, address, TRACKER_PORT)
            return proc, "opentracker"
        except RuntimeError:
            stop_popen(proc)
            if which == "opentracker":
                raise
        except BaseException:
            stop_popen(proc)
            raise
    own = JsonChild(
        [*net.prefix(0), sys.executable, str(HERE), "tracker", address, str(TRACKER_PORT)],
        run_dir / "tracker.log",
    )
    try:
        wait_tcp(net, 0, address, TRACKER_PORT)
    except BaseException:
        own.stop()
        raise
    return own, "bench.anchors minimal tracker"


def _stop_any(proc: subprocess.Popen[Any] | JsonChild) -> None:
    if isinstance(proc, JsonChild):
        proc.stop()
    else:
        stop_popen(proc)


def run_libtorrent(
    net: Topology,
    n: int,
    work: Path,
    file: Path,
    window: Callable[[list[int]], Window],
    timeout: float,
    settings: dict[str, Any] | None = None,
    tracker_kind: str = "auto",
) -> dict[str, Any]:
    """Seeder in host 0, downloaders in hosts 1..n; see the module docstring. `tracker_kind`:
    auto, opentracker or python."""
    run_dir = work / f"lt-{n}-{time.monotonic_ns()}"
    run_dir.mkdir(parents=True)
    tracker_url = f"http://{net.address(0)}:{TRACKER_PORT}/announce"
    torrent, info_hash = make_torrent(work, file, tracker_url)
    lt_settings = {**LT_SETTINGS, **(settings or {})}
    children: list[JsonChild] = []
    tracker: subprocess.Popen[Any] | JsonChild | None = None
    try:
        tracker, tracker_used = _start_tracker(net, run_dir, info_hash, tracker_kind)

        def worker(i: int, role: str, save: Path) -> JsonChild:
            params = {
                "role": role,
                "torrent": str(torrent),
                "save": str(save),
                "listen": f"{net.address(i)}:{LT_PORT}",
                "settings": lt_settings,
            }
            child = JsonChild(
                [*net.prefix(i), SYSTEM_PYTHON, str(HERE), "lt-worker", json.dumps(params)],
                run_dir / f"lt-h{i}.log",
            )
            children.append(child)
            return child

        seeder = worker(0, "seed", file.parent)
        seeder.read(60.0)  # checked its copy and heard from the tracker
        downloaders = [worker(i, "get", run_dir / f"h{i}") for i in range(1, n + 1)]
        for d in downloaders:
            d.read(60.0)
        tracker_pid = tracker.pid if tracker else 0
        win = window([c.pid for c in children] + ([tracker_pid] if tracker_pid else []))
        t0 = win.start()
        for d in downloaders:
            d.send("start")
        done_at: dict[str, float] = {}
        downloads: dict[str, dict[str, Any]] = {}
        deadline = t0 + timeout
        for i, d in enumerate(downloaders, start=1):
            answer = d.read(max(deadline - time.monotonic(), 0.1))
            done_at[f"h{i}"] = round(answer["t"] - t0, 3)
            downloads[f"h{i}"] = answer["status"]
        wall = max(done_at.values())
        win.stop(t_end=t0 + wall)
        seed_status = _ask(seeder, "stats")["status"]
    finally:
        for child in reversed(children):
            child.stop()
        if tracker is not None:
            _stop_any(tracker)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": round(wall, 3),
        "finished_s": done_at,
        "origin_payload_bytes": seed_status["total_payload_upload"],
        "origin_wire_bytes_libtorrent": seed_status["total_upload"],
        "seed_status": seed_status,
        "download_status": downloads,
        "cpu_s": round(win.cpu_seconds, 3),
        "cpu_s_by_host": {f"h{i}": win.cpu_per_pid.get(c.pid, 0.0) for i, c in enumerate(children)}
        | ({"tracker": win.cpu_per_pid.get(tracker_pid, 0.0)} if tracker_pid else {}),
        "t0": t0,
        "notes": {
            "transport": TRANSPORT,
            "tracker": tracker_used,
            "piece_bytes": PIECE_BYTES,
            "settings": lt_settings,
            "timed": "from the resume sent to every downloader to the last torrent_finished_alert",
        },
    }


def _ask(child: JsonChild, command: str, timeout: float = 10.0) -> dict[str, Any]:
    child.send(command)
    return child.read(timeout)


# --------------------------------------------------------------------------- nginx + curl runner

NGINX_CONF = """\
# Written by bench/anchors.py for one benchmark run; everything it writes stays in {tmp}.
daemon off;
master_process on;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {address}:{port};
        root {root};
    }}
}}
"""


def run_nginx(
    net: Topology,
    n: int,
    work: Path,
    file: Path,
    window: Callable[[list[int]], Window],
    timeout: float,
) -> dict[str, Any]:
    """nginx in host 0, one curl per host 1..n, all at once; see the module docstring."""
    binary = nginx_binary()
    curl = shutil.which("curl")
    if binary is None or curl is None:
        raise RuntimeError("nginx or curl missing")
    run_dir = work / f"nginx-{n}-{time.monotonic_ns()}"
    tmp, root = run_dir / "nginx", run_dir / "www"
    tmp.mkdir(parents=True)
    root.mkdir()
    os.link(file, root / file.name)
    # The worker runs as `nobody`: it must be able to walk down to the file.
    for folder in (work, run_dir, root):
        os.chmod(folder, 0o755)
    os.chmod(root / file.name, 0o644)
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, address=net.address(0), port=HTTP_PORT, root=root))
    url = f"http://{net.address(0)}:{HTTP_PORT}/{file.name}"
    server: subprocess.Popen[Any] | None = None
    curls: list[subprocess.Popen[Any]] = []
    outs: list[Path] = []
    try:
        with open(tmp / "stderr.log", "ab") as log:
            server = subprocess.Popen(
                [*net.prefix(0), binary, "-c", str(conf), "-p", str(tmp), "-e", str(tmp / "error.log")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_tcp(net, min(1, n), net.address(0), HTTP_PORT)
        server_pid = server.pid
        win = window([server_pid])
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        finished: dict[str, float] = {}
        t0 = win.start()
        for i in range(1, n + 1):
            out = run_dir / f"h{i}.out"
            outs.append(out)
            with open(out, "w") as w:
                curls.append(
                    subprocess.Popen(
                        [
                            *net.prefix(i),
                            curl,
                            "-sS",
                            "--max-time",
                            str(int(timeout)),
                            "-o",
                            str(run_dir / f"h{i}.bin"),
                            "-w",
                            "%{size_download} %{http_code}",
                            url,
                        ],
                        stdin=subprocess.DEVNULL,
                        stdout=w,
                        stderr=subprocess.STDOUT,
                    )
                )

        def reap(i: int, proc: subprocess.Popen[Any]) -> None:
            try:
                proc.wait(timeout + 10)
            except subprocess.TimeoutExpired:
                return
            finished[f"h{i}"] = round(time.monotonic() - t0, 3)

        threads = [threading.Thread(target=reap, args=(i, p), daemon=True) for i, p in enumerate(curls, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 15)
        if len(finished) < n:
            raise TimeoutError(f"{n - len(finished)} curl(s) not done after {timeout:.0f} s")
        wall = max(finished.values())
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        # The curls were our only children reaped in the window: their CPU is the rusage delta.
        curl_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        win.extra_cpu(curl_cpu)
        win.stop(t_end=t0 + wall)
        served = 0
        for i, (proc, out) in enumerate(zip(curls, outs, strict=True), 1):
            text = out.read_text().strip()
            parts = text.split()
            if proc.returncode != 0 or len(parts) != 2 or parts[1] != "200":
                raise RuntimeError(f"curl in h{i} failed ({proc.returncode}): {text[-300:]}")
            served += int(parts[0])
        if served != n * file.stat().st_size:
            raise RuntimeError(f"curls got {served} bytes, expected {n} copies")
    finally:
        for proc in curls:
            stop_popen(proc)
        if server is not None:
            stop_popen(server)  # SIGTERM: nginx's fast shutdown
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": round(wall, 3),
        "finished_s": finished,
        "origin_payload_bytes": served,
        "cpu_s": round(win.cpu_seconds, 3),
        "t0": t0,
        "notes": {
            "server": "nginx, 1 worker, sendfile on",
            "client": "curl -o FILE, one per host",
            "timed": "from the first curl started to the last one exited",
        },
    }


# --------------------------------------------------------------------------- worker roles
# Everything below runs under /usr/bin/python3 inside a host namespace: standard library (and
# libtorrent) only.


def _lt_status(h: Any) -> dict[str, Any]:
    s = h.status()
    return {
        "state": str(s.state),
        "progress": round(s.progress, 4),
        "total_payload_upload": s.total_payload_upload,
        "total_upload": s.total_upload,
        "total_payload_download": s.total_payload_download,
        "total_download": s.total_download,
        "total_redundant_bytes": s.total_redundant_bytes,
        "total_failed_bytes": s.total_failed_bytes,
        "num_peers": s.num_peers,
        "num_uploads": s.num_uploads,
    }


def _stdin_lines() -> queue.SimpleQueue[str | None]:
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        for line in sys.stdin:
            lines.put(line.strip())
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _emit(value: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def lt_worker(params: dict[str, Any]) -> int:
    """One libtorrent session: `seed` (ready once checked and announced) or `get` (added paused;
    resumes on "start", prints {"t", "status"} when finished). "stats" prints the status; end of
    input leaves."""
    import libtorrent as lt  # type: ignore[import-not-found,unused-ignore]  # system python only

    settings = dict(params["settings"])
    settings["listen_interfaces"] = params["listen"]
    settings["alert_mask"] = (
        lt.alert.category_t.status_notification
        | lt.alert.category_t.error_notification
        | lt.alert.category_t.tracker_notification
    )
    ses = lt.session(settings)
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(params["torrent"])
    atp.save_path = params["save"]
    seed = params["role"] == "seed"
    # Not auto-managed: the session's queue must not pause or resume anything on its own.
    flags = atp.flags & ~lt.torrent_flags.auto_managed & ~lt.torrent_flags.paused
    atp.flags = flags if seed else flags | lt.torrent_flags.paused
    h = ses.add_torrent(atp)
    lines = _stdin_lines()
    deadline = time.monotonic() + 60
    announced = not seed
    checked = False
    while time.monotonic() < deadline and not (announced and checked):
        ses.wait_for_alert(100)
        for a in ses.pop_alerts():
            if isinstance(a, lt.tracker_reply_alert):
                announced = True
            elif isinstance(a, (lt.tracker_error_alert, lt.torrent_error_alert)):
                print(f"alert: {a.message()}", file=sys.stderr, flush=True)
        state = h.status().state
        checked = state not in (lt.torrent_status.checking_files, lt.torrent_status.checking_resume_data)
        if seed:
            checked = checked and h.status().is_seeding
    if not (announced and checked):
        print(f"not ready: announced={announced} state={h.status().state}", file=sys.stderr, flush=True)
        return 1
    _emit({"ready": True, "status": _lt_status(h)})
    started = False
    done = False
    while True:
        ses.wait_for_alert(20)
        for a in ses.pop_alerts():
            if isinstance(a, lt.torrent_finished_alert) and started and not done:
                done = True
                _emit({"t": time.monotonic(), "status": _lt_status(h)})
            elif isinstance(a, (lt.tracker_error_alert, lt.torrent_error_alert, lt.file_error_alert)):
                print(f"alert: {a.message()}", file=sys.stderr, flush=True)
        if started and not done and h.status().is_seeding:  # in case the alert was missed
            done = True
            _emit({"t": time.monotonic(), "status": _lt_status(h)})
        while True:
            try:
                line = lines.get_nowait()
            except queue.Empty:
                break
            if line is None or line == "quit":
                # Nothing to save: leave at once rather than wait for the tracker's "stopped".
                sys.stdout.flush()
                os._exit(0)
            if line == "start":
                started = True
                h.resume()
            elif line == "stats":
                _emit({"status": _lt_status(h)})


def make_torrent_main(file: str, out: str, tracker_url: str) -> int:
    import libtorrent as lt  # type: ignore[import-not-found,unused-ignore]  # system python only

    fs = lt.file_storage()
    lt.add_files(fs, file)
    ct = lt.create_torrent(fs, PIECE_BYTES, lt.create_torrent.v1_only)
    ct.add_tracker(tracker_url)
    ct.set_creator("zswarm bench.anchors")
    lt.set_piece_hashes(ct, str(Path(file).parent))
    Path(out).write_bytes(lt.bencode(ct.generate()))
    info = lt.torrent_info(out)
    _emit({"info_hash": str(info.info_hashes().v1), "pieces": info.num_pieces()})
    return 0


def bencode(value: Any) -> bytes:
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode() if isinstance(k, str) else k, v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(type(value))


def tracker_main(address: str, port: int) -> int:
    """A minimal HTTP tracker (BEP 3 announce, BEP 23 compact peers) for when opentracker is missing."""
    import socket
    import struct
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import unquote_to_bytes

    swarms: dict[bytes, dict[bytes, tuple[str, int, bool]]] = {}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the http.server name
            path, _, query = self.path.partition("?")
            fields: dict[str, bytes] = {}
            for pair in query.split("&"):
                key, _, value = pair.partition("=")
                fields[key] = unquote_to_bytes(value)
            if path != "/announce" or "info_hash" not in fields or "port" not in fields:
                body = bencode({"failure reason": "bad announce"})
            else:
                ih, pid = fields["info_hash"], fields.get("peer_id", b"")
                ip = self.client_address[0]
                event = fields.get("event", b"").decode()
                with lock:
                    swarm = swarms.setdefault(ih, {})
                    if event == "stopped":
                        swarm.pop(pid, None)
                    else:
                        swarm[pid] = (ip, int(fields["port"]), fields.get("left", b"1") == b"0")
                    others = [v for k, v in swarm.items() if k != pid]
                    seeds = sum(1 for v in swarm.values() if v[2])
                    incomplete = len(swarm) - seeds
                compact = b"".join(socket.inet_aton(a) + struct.pack(">H", p) for a, p, _ in others)
                body = bencode(
                    {"interval": 1800, "complete": seeds, "incomplete": incomplete, "peers": compact}
                )
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _emit({"ready": True})
    for _ in sys.stdin:  # runs until end of input (or a signal)
        pass
    server.shutdown()
    return 0


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role == "lt-worker":
        sys.exit(lt_worker(json.loads(sys.argv[2])))
    if role == "make-torrent":
        sys.exit(make_torrent_main(sys.argv[2], sys.argv[3], sys.argv[4]))
    if role == "tracker":
        sys.exit(tracker_main(sys.argv[2], int(sys.argv[3])))
    print("roles: lt-worker PARAMS | make-torrent FILE OUT URL | tracker ADDRESS PORT", file=sys.stderr)
    sys.exit(2)
