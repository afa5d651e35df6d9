"""Handles: one interface to a broker, a peer and a download, in this process or in a child.

Theory of operation
-------------------
`BrokerHandle`, `PeerHandle` and `GetHandle` are what a `Swarm` (launcher/swarm.py) hands out.
Each has two implementations with the same methods and the same values:

- thread mode (`ThreadBroker`, `ThreadPeer`, `ThreadGet`): real `Broker` and `Peer` objects in
  this process, with their own threads and real sockets. Calls go straight to their API.
- process mode (`ProcessBroker`, `ProcessPeer`, `ProcessGet`): a child process started through
  the real command line (`python -m broker -c X --control`, `python -m peer -c X control`),
  driven over its control channel (launcher/process.py). Calls are control commands.

What comes back is the same in both modes: results as `Result`, progress as `Snapshot`, every
other answer as the JSON value the control channel carries (`common.cli.jsonable` turns a thread
mode answer into exactly that), errors as the same exception classes (`NotFound`,
`TransferError`, `CancelledTransfer`...). Endpoints are read once, at start, so a killed broker's
handle still says where it was (and `restart()` binds the same ports again).

Differences that cannot be hidden: only processes have a `pid`, take `signal()`s and can really
crash (`kill()` of a thread-mode node is a `close()`); in thread mode `GetHandle.cancel()`
cancels that one get, in process mode every get of that file in that peer (the control `cancel`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker import Broker, BrokerConfig
from common.cli import jsonable
from common.subscription import Closed, Subscription
from launcher.process import STOP_TIMEOUT_S, ControlClient, LauncherError, LauncherTimeout, Pending
from peer import GetFuture, GetResult, Peer, PeerConfig, Progress
from peer.transfer import CancelledTransfer

Run = tuple[int, int]
DEFAULT_GET_TIMEOUT_S = 300.0
WAIT_MARGIN_S = 30.0  # a get's result is waited for this much longer than the get's own timeout
CALL_TIMEOUT_S = 30.0  # other commands


# --------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Snapshot:
    """A download's progress at one moment."""

    name: str
    state: str  # planning, fetching, finishing, done, failed
    done: int  # segments verified and written (including those held before)
    segments: int
    bytes_done: int
    size: int  # 0 while the manifest is not known
    rate_bps: float

    @classmethod
    def from_progress(cls, p: Progress) -> Snapshot:
        return cls(p.name, p.state.value, p.done, p.segments, p.bytes_done, p.size, p.rate_bps)

    @classmethod
    def from_event(cls, e: dict[str, Any]) -> Snapshot:
        return cls(
            str(e["name"]),
            str(e["state"]),
            int(e["done"]),
            int(e["segments"]),
            int(e["bytes_done"]),
            int(e["size"]),
            float(e["rate_bps"]),
        )


@dataclass(frozen=True)
class Result:
    """A finished download, in either mode."""

    name: str
    path: Path
    size: int
    file_id: str  # hex
    seconds: float
    sources: dict[str, int]  # source -> segments ("broker", a peer's name, or "local")
    source_runs: dict[str, list[Run]]  # source -> the runs of segments it delivered

    @classmethod
    def from_get_result(cls, r: GetResult) -> Result:
        runs = {name: [(int(a), int(b)) for a, b in rs] for name, rs in r.source_runs.items()}
        return cls(r.name, Path(r.path), r.size, r.file_id, r.seconds, dict(r.sources), runs)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        runs = {name: [(int(a), int(b)) for a, b in rs] for name, rs in d["source_runs"].items()}
        sources = {str(k): int(v) for k, v in d["sources"].items()}
        return cls(
            str(d["name"]),
            Path(d["path"]),
            int(d["size"]),
            str(d["file_id"]),
            float(d["seconds"]),
            sources,
            runs,
        )

    @property
    def segment_sources(self) -> list[str]:
        """For each segment: "broker", the peer it came from, or "local"."""
        out = ["local"] * sum(self.sources.values())
        for name, runs in self.source_runs.items():
            for first, count in runs:
                out[first : first + count] = [name] * count
        return out

    def segments_from(self, source: str) -> set[int]:
        return {i for first, count in self.source_runs.get(source, []) for i in range(first, first + count)}


def _iterate(subscription: Subscription[Any], deadline: float, what: str) -> Iterator[Any]:
    """Every unread value until the subscription closes; LauncherTimeout at the deadline."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LauncherTimeout(f"{what}: still running at the deadline")
        try:
            yield subscription.get(remaining)
        except Closed:
            return
        except TimeoutError:
            continue  # the loop raises at the deadline


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# --------------------------------------------------------------------------------- interfaces


class GetHandle(ABC):
    """A download started with `PeerHandle.start_get`."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout

    @abstractmethod
    def progress(self, timeout: float | None = None) -> Iterator[Snapshot]:
        """Snapshots (the newest unread one each time) until the download ends; a slow reader
        skips some. Ends when the get ends; LauncherTimeout after `timeout` (default: the get's
        own timeout and a margin)."""

    @abstractmethod
    def result(self, timeout: float | None = None) -> Result:
        """The result; raises what the download failed with (CancelledTransfer once cancelled)."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the download (verified segments are kept); `result()` then raises CancelledTransfer."""

    @abstractmethod
    def done(self) -> bool: ...

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout + WAIT_MARGIN_S if timeout is None else timeout)


class BrokerHandle(ABC):
    """A broker of a Swarm. `tracker`, `heartbeat` and `origin` are short names of the endpoints."""

    mode: str

    def __init__(self, name: str) -> None:
        self.name = name
        self.tracker_endpoint = ""
        self.heartbeat_endpoint = ""
        self.origin_endpoint = ""

    @property
    def tracker(self) -> str:
        return self.tracker_endpoint

    @property
    def heartbeat(self) -> str:
        return self.heartbeat_endpoint

    @property
    def origin(self) -> str:
        return self.origin_endpoint

    def _ports(self) -> dict[str, int]:
        return {
            "tracker_port": port_of(self.tracker_endpoint),
            "heartbeat_port": port_of(self.heartbeat_endpoint),
            "origin_port": port_of(self.origin_endpoint),
        }

    @property
    def pid(self) -> int | None:
        """The process id in process mode; None in thread mode."""
        return None

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def rescan(self) -> list[str]:
        """List the share folder now; returns the names shared afterwards."""

    @abstractmethod
    def metrics(self) -> dict[str, Any]:
        """Every metric, flat (common/metrics.py `Snapshot.flat`)."""

    @abstractmethod
    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop cleanly (idempotent); a process's exit status."""

    @abstractmethod
    def kill(self) -> None:
        """Crash it: SIGKILL for a process, close() in thread mode."""

    @abstractmethod
    def restart(self) -> None:
        """Start it again on the same ports (stopping it first if it still runs)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.tracker_endpoint}>"


class PeerHandle(ABC):
    """A peer of a Swarm."""

    mode: str

    def __init__(self, name: str, data_dir: Path) -> None:
        self.name = name
        self.data_dir = data_dir
        self.serve_endpoint = ""

    @property
    def serve(self) -> str:
        return self.serve_endpoint

    @property
    def pid(self) -> int | None:
        """The process id in process mode; None in thread mode."""
        return None

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    def start_get(self, file: str, timeout: float = DEFAULT_GET_TIMEOUT_S) -> GetHandle: ...

    def get(self, file: str, timeout: float = DEFAULT_GET_TIMEOUT_S) -> Result:
        """Download `file`; raises what the download failed with (NotFound, TransferError...)."""
        return self.start_get(file, timeout).result(timeout + WAIT_MARGIN_S)

    @abstractmethod
    def status(self) -> dict[str, Any]: ...

    @abstractmethod
    def files(self) -> list[dict[str, Any]]:
        """What it holds, complete and partial."""

    @abstractmethod
    def list_remote(self) -> list[dict[str, Any]]:
        """The broker's files: [{"name", "size", "file_id" (hex)}]."""

    @abstractmethod
    def broker_stats(self) -> dict[str, Any]: ...

    @abstractmethod
    def rescan(self) -> dict[str, int]: ...

    @abstractmethod
    def metrics(self) -> dict[str, Any]: ...

    @abstractmethod
    def wait_registered(self, timeout: float = 10.0) -> bool:
        """True once the broker registered it; False when `timeout` passed first."""

    @abstractmethod
    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Leave cleanly (bye to the broker; idempotent); a process's exit status."""

    @abstractmethod
    def kill(self) -> None:
        """Crash it: SIGKILL for a process, close() in thread mode."""

    def signal(self, signum: int) -> None:
        raise LauncherError(f"peer {self.name} runs in this process ({self.mode} mode): no signals")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.serve_endpoint}>"


# --------------------------------------------------------------------------------- thread mode


class ThreadGet(GetHandle):
    def __init__(self, future: GetFuture, name: str, timeout: float) -> None:
        super().__init__(name, timeout)
        self.future = future

    def progress(self, timeout: float | None = None) -> Iterator[Snapshot]:
        what = f"get {self.name}"
        for snap in _iterate(self.future.progress(), self._deadline(timeout), what):
            yield Snapshot.from_progress(snap)

    def result(self, timeout: float | None = None) -> Result:
        wait_s = self.timeout + WAIT_MARGIN_S if timeout is None else timeout
        try:
            return Result.from_get_result(self.future.result(wait_s))
        except CancelledError:
            raise CancelledTransfer(f"{self.name}: cancelled") from None
        except TimeoutError:
            raise LauncherTimeout(f"get {self.name}: no result within {wait_s} s") from None

    def cancel(self) -> None:
        self.future.cancel()

    def done(self) -> bool:
        return self.future.done()


class ThreadBroker(BrokerHandle):
    mode = "thread"

    def __init__(self, name: str, config: BrokerConfig) -> None:
        super().__init__(name)
        self.config = config
        self.broker = self._start(config)

    def _start(self, config: BrokerConfig) -> Broker:
        broker = Broker(config).start()
        self.tracker_endpoint = broker.tracker_endpoint
        self.heartbeat_endpoint = broker.heartbeat_endpoint
        self.origin_endpoint = broker.origin_endpoint
        return broker

    @property
    def alive(self) -> bool:
        return self.broker.running

    def stats(self) -> dict[str, Any]:
        return dict(jsonable(self.broker.stats()))

    def rescan(self) -> list[str]:
        return list(self.broker.rescan())

    def metrics(self) -> dict[str, Any]:
        return dict(jsonable(self.broker.metrics_snapshot().flat()))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.broker.close()

    def kill(self) -> None:
        self.broker.close()

    def restart(self) -> None:
        self.broker.close()
        self.config = BrokerConfig(**{**self.config.model_dump(), **self._ports()})
        self.broker = self._start(self.config)


class ThreadPeer(PeerHandle):
    mode = "thread"

    def __init__(self, config: PeerConfig) -> None:
        super().__init__(config.name, Path(config.data_dir))
        self.config = config
        self.peer = Peer(config).start()
        self.serve_endpoint = self.peer.serve_endpoint

    @property
    def alive(self) -> bool:
        return self.peer.running

    def start_get(self, file: str, timeout: float = DEFAULT_GET_TIMEOUT_S) -> ThreadGet:
        return ThreadGet(self.peer.start_get(file, timeout), file, timeout)

    def get(self, file: str, timeout: float = DEFAULT_GET_TIMEOUT_S) -> Result:
        return Result.from_get_result(self.peer.get(file, timeout))

    def status(self) -> dict[str, Any]:
        return dict(jsonable(self.peer.status()))

    def files(self) -> list[dict[str, Any]]:
        return list(jsonable(self.peer.files()))

    def list_remote(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "size": f.size, "file_id": f.file_id.hex()} for f in self.peer.list_remote()]

    def broker_stats(self) -> dict[str, Any]:
        return dict(jsonable(self.peer.broker_stats()))

    def rescan(self) -> dict[str, int]:
        return dict(self.peer.rescan())

    def metrics(self) -> dict[str, Any]:
        return dict(jsonable(self.peer.metrics_snapshot().flat()))

    def wait_registered(self, timeout: float = 10.0) -> bool:
        return self.peer.wait_registered(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.peer.close()

    def kill(self) -> None:
        self.peer.close()


# --------------------------------------------------------------------------------- process mode


def broker_args(config_path: Path) -> list[str]:
    return ["-m", "broker", "-c", str(config_path), "--control"]


def peer_args(config_path: Path) -> list[str]:
    return ["-m", "peer", "-c", str(config_path), "control"]


class ProcessGet(GetHandle):
    def __init__(self, pending: Pending, client: ControlClient, name: str, timeout: float) -> None:
        super().__init__(name, timeout)
        self.pending = pending
        self.client = client

    def progress(self, timeout: float | None = None) -> Iterator[Snapshot]:
        what = f"{self.client.label}: get {self.name}"
        for event in _iterate(self.pending.progress, self._deadline(timeout), what):
            yield Snapshot.from_event(event)

    def result(self, timeout: float | None = None) -> Result:
        wait_s = self.timeout + WAIT_MARGIN_S if timeout is None else timeout
        return Result.from_json(self.pending.wait(wait_s))

    def cancel(self) -> None:
        self.client.call("cancel", CALL_TIMEOUT_S, name=self.name)

    def done(self) -> bool:
        return self.pending.done()


class _ProcessNode:
    """What a broker's and a peer's process handles share."""

    client: ControlClient

    @property
    def pid(self) -> int:
        return self.client.pid

    @property
    def alive(self) -> bool:
        return self.client.alive

    @property
    def returncode(self) -> int | None:
        return self.client.returncode

    @property
    def log_path(self) -> Path:
        return self.client.log_path

    def call(self, op: str, wait_s: float = CALL_TIMEOUT_S, **args: Any) -> Any:
        """One control command, answered within `wait_s` (see common/cli.py for the ops)."""
        return self.client.call(op, wait_s, **args)

    def request(self, op: str, **args: Any) -> Pending:
        """One control command, returning at once (several may be in flight)."""
        return self.client.request(op, **args)

    def signal(self, signum: int) -> None:
        self.client.signal(signum)

    def wait(self, timeout: float) -> int:
        """Its exit status once it exits (after a signal, a quit); LauncherTimeout after `timeout`."""
        return self.client.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        return self.client.stop(timeout)

    def kill(self) -> None:
        self.client.kill()


class ProcessBroker(_ProcessNode, BrokerHandle):
    mode = "process"

    def __init__(
        self,
        name: str,
        config_path: Path,
        log_path: Path,
        *,
        prefix: Sequence[str] | None = None,
        ready_timeout: float = 60.0,
        restart_config: Any = None,
    ) -> None:
        BrokerHandle.__init__(self, name)
        self.config_path = config_path
        self._log = log_path
        self._prefix = list(prefix or [])
        self._ready_timeout = ready_timeout
        # restart_config(ports) -> the config file to restart from (the same one, ports pinned)
        self._restart_config = restart_config
        self.client = self._start(config_path)

    def _start(self, config_path: Path) -> ControlClient:
        client = ControlClient(
            broker_args(config_path),
            self._log,
            ready_timeout=self._ready_timeout,
            prefix=self._prefix,
            label=f"broker {self.name}",
        )
        self.tracker_endpoint = str(client.ready["tracker"])
        self.heartbeat_endpoint = str(client.ready["heartbeat"])
        self.origin_endpoint = str(client.ready["origin"])
        return client

    def stats(self) -> dict[str, Any]:
        return dict(self.call("stats"))

    def rescan(self) -> list[str]:
        return list(self.call("rescan", 600.0))

    def metrics(self) -> dict[str, Any]:
        return dict(self.call("metrics"))

    def restart(self) -> None:
        self.client.stop()
        if self._restart_config is not None:
            self.config_path = self._restart_config(self._ports())
        self.client = self._start(self.config_path)


class ProcessPeer(_ProcessNode, PeerHandle):
    mode = "process"

    def __init__(
        self,
        name: str,
        config_path: Path,
        data_dir: Path,
        log_path: Path,
        *,
        prefix: Sequence[str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        PeerHandle.__init__(self, name, data_dir)
        self.config_path = config_path
        self.client = ControlClient(
            peer_args(config_path), log_path, ready_timeout=ready_timeout, prefix=prefix, label=f"peer {name}"
        )
        self.name = str(self.client.ready["name"])
        self.serve_endpoint = str(self.client.ready["serve"])

    def start_get(self, file: str, timeout: float = DEFAULT_GET_TIMEOUT_S) -> ProcessGet:
        return ProcessGet(self.client.request("get", name=file, timeout=timeout), self.client, file, timeout)

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def files(self) -> list[dict[str, Any]]:
        return list(self.call("files"))

    def list_remote(self) -> list[dict[str, Any]]:
        return list(self.call("remote"))

    def broker_stats(self) -> dict[str, Any]:
        return dict(self.call("broker_stats"))

    def rescan(self) -> dict[str, int]:
        return dict(self.call("rescan", 600.0))

    def metrics(self) -> dict[str, Any]:
        return dict(self.call("metrics"))

    def wait_registered(self, timeout: float = 10.0) -> bool:
        return bool(self.call("wait_registered", timeout + CALL_TIMEOUT_S, timeout=timeout))


__all__ = [
    "BrokerHandle",
    "GetHandle",
    "PeerHandle",
    "ProcessBroker",
    "ProcessGet",
    "ProcessPeer",
    "Result",
    "Snapshot",
    "ThreadBroker",
    "ThreadGet",
    "ThreadPeer",
]
