"""Swarm: a broker and N peers, in this process or as child processes, behind one interface.

    with Swarm(tmp, "process", broker_fields={"heartbeat_interval_s": 0.5}) as swarm:
        broker = swarm.start_broker()
        p1, p2 = swarm.add_peer("p1"), swarm.add_peer("p2", upload_limit_mib_s=2)
        get = p1.start_get("movie.bin", timeout=60)
        for snap in get.progress():
            print(snap.done, "/", snap.segments)
        result = get.result()

Theory of operation
-------------------
A node's config is built from three layers, later ones winning: the launcher's defaults (any free
port on 127.0.0.1; the share folder `WORKDIR/share`, manifests in `WORKDIR/manifests`, a peer's
data in `WORKDIR/NAME`, a peer's broker the swarm's newest), the swarm's `broker_fields` /
`peer_fields`, and the fields of the call. `config=PATH` replaces the first two layers with a
config file (used as is when the call adds no fields). Relative paths are relative to WORKDIR,
as they would be in a config file there.

- process mode writes the config to `WORKDIR/NAME.yaml` and starts the real command line on it
  (`python -m broker -c ... --control`, `python -m peer -c ... control`), optionally behind a
  `prefix` (e.g. `["ip", "netns", "exec", "h3"]`); its stderr goes to `LOG_DIR/NAME.log`. The
  config is validated by the child, exactly as a user's file would be.
- thread mode builds `BrokerConfig` / `PeerConfig` from the same fields and starts `Broker` /
  `Peer` objects in this process.

The handles (launcher/handles.py) answer alike in both modes. `add_peer` returns once the broker
registered the peer (unless `register=False`). Every wait has a deadline. `close()` (also on
leaving a `with`) stops the peers first (in parallel: each leaves with a bye), then the brokers,
processes by PID; it is idempotent, and so is each handle's `stop()`.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import yaml

from broker import BrokerConfig
from launcher.handles import (
    BrokerHandle,
    PeerHandle,
    ProcessBroker,
    ProcessPeer,
    ThreadBroker,
    ThreadPeer,
)
from launcher.process import STOP_TIMEOUT_S, LauncherError
from peer import PeerConfig

log = logging.getLogger(__name__)

Mode = Literal["thread", "process"]
HOST = "127.0.0.1"
REGISTER_TIMEOUT_S = 20.0


def _plain(value: Any) -> Any:
    """A config value as YAML can write it safely (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def write_config(path: Path, fields: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_plain(fields), sort_keys=False), encoding="utf-8")
    return path


def resolve_paths(fields: dict[str, Any], path_fields: Sequence[str], base: Path) -> dict[str, Any]:
    """Relative path fields made absolute against `base` (what a config file in `base` means)."""
    out = dict(fields)
    for key in path_fields:
        value = out.get(key)
        if isinstance(value, str | Path) and str(value) and not Path(value).is_absolute():
            out[key] = str((base / value).resolve())
        elif isinstance(value, Path):
            out[key] = str(value)
    return out


def read_config(path: Path, path_fields: Sequence[str]) -> dict[str, Any]:
    """A config file's fields, its relative paths made absolute (so they survive a move)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise LauncherError(f"{path}: not a mapping of config fields")
    return resolve_paths(data, path_fields, path.resolve().parent)


class Swarm:
    """A broker and peers, in this process (`mode="thread"`) or as child processes ("process")."""

    def __init__(
        self,
        workdir: Path,
        mode: Mode = "thread",
        broker_fields: dict[str, Any] | None = None,
        peer_fields: dict[str, Any] | None = None,
        *,
        log_dir: Path | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = STOP_TIMEOUT_S,
    ) -> None:
        if mode not in ("thread", "process"):
            raise ValueError(f"mode must be 'thread' or 'process', not {mode!r}")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mode: Mode = mode
        self.broker_fields = dict(broker_fields or {})
        self.peer_fields = dict(peer_fields or {})
        self.log_dir = Path(log_dir) if log_dir is not None else self.workdir / "logs"
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._lock = threading.Lock()
        self._brokers: list[BrokerHandle] = []
        self._peers: list[PeerHandle] = []
        self._closed = False

    # ---- what it holds

    @property
    def share_dir(self) -> Path:
        """The default broker's share folder (created on first use)."""
        fields = resolve_paths(self._broker_base(None), BrokerConfig.PATH_FIELDS, self.workdir)
        path = Path(fields["share_dir"])
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def broker(self) -> BrokerHandle:
        """The broker started last."""
        with self._lock:
            if not self._brokers:
                raise LauncherError("no broker started yet")
            return self._brokers[-1]

    @property
    def brokers(self) -> list[BrokerHandle]:
        with self._lock:
            return list(self._brokers)

    @property
    def peers(self) -> list[PeerHandle]:
        with self._lock:
            return list(self._peers)

    def peer(self, name: str) -> PeerHandle:
        """The peer added last under `name`."""
        with self._lock:
            for handle in reversed(self._peers):
                if handle.name == name:
                    return handle
        raise LauncherError(f"no peer named {name!r}")

    # ---- configs

    def _broker_base(self, config: Path | None) -> dict[str, Any]:
        if config is not None:
            return read_config(Path(config), BrokerConfig.PATH_FIELDS)
        return {
            "share_dir": "share",
            "manifest_dir": "manifests",
            "bind_host": HOST,
            "tracker_port": 0,
            "heartbeat_port": 0,
            "origin_port": 0,
            **self.broker_fields,
        }

    def _peer_base(self, name: str, config: Path | None) -> dict[str, Any]:
        if config is not None:
            return read_config(Path(config), PeerConfig.PATH_FIELDS)
        base: dict[str, Any] = {"name": name, "data_dir": name, "bind_host": HOST, "serve_port": 0}
        with self._lock:
            if self._brokers:
                base["broker"] = self._brokers[-1].tracker_endpoint
        return {**base, **self.peer_fields}

    def _config_path(self, name: str) -> Path:
        return self.workdir / f"{name}.yaml"

    # ---- starting

    def start_broker(
        self,
        name: str = "broker",
        *,
        config: Path | None = None,
        prefix: Sequence[str] | None = None,
        ready_timeout: float | None = None,
        **fields: Any,
    ) -> BrokerHandle:
        """Start a broker (ports default to 0: any free port). `prefix`: process mode only."""
        self._check_open()
        as_is = config is not None and not fields
        merged = {**self._broker_base(config), **fields}
        if config is None and "share_dir" not in fields and "share_dir" not in self.broker_fields:
            self.share_dir.mkdir(parents=True, exist_ok=True)  # the default one: empty is fine
        handle: BrokerHandle
        if self.mode == "thread":
            if config is not None and as_is:
                handle = ThreadBroker(name, BrokerConfig.from_yaml(config))
            else:
                resolved = resolve_paths(merged, BrokerConfig.PATH_FIELDS, self.workdir)
                handle = ThreadBroker(name, BrokerConfig(**resolved))
        else:
            path = (
                Path(config)
                if config is not None and as_is
                else write_config(self._config_path(name), merged)
            )

            def restart_config(ports: dict[str, int]) -> Path:
                return write_config(self._config_path(name), {**merged, **ports})

            handle = ProcessBroker(
                name,
                path,
                self.log_dir / f"{name}.log",
                prefix=prefix,
                ready_timeout=ready_timeout or self.ready_timeout,
                restart_config=restart_config,
            )
        self._adopt(handle, self._brokers)
        return handle

    def add_peer(
        self,
        name: str,
        *,
        config: Path | None = None,
        register: bool = True,
        register_timeout: float = REGISTER_TIMEOUT_S,
        prefix: Sequence[str] | None = None,
        ready_timeout: float | None = None,
        **fields: Any,
    ) -> PeerHandle:
        """Start a peer; unless `register=False`, return once the broker registered it. Its broker
        is the swarm's newest unless the fields (or `config`) name one."""
        self._check_open()
        as_is = config is not None and not fields
        merged = {**self._peer_base(name, config), **fields}
        if "broker" not in merged:
            raise LauncherError(f"peer {name}: no broker started and none given")
        resolved = resolve_paths(merged, PeerConfig.PATH_FIELDS, self.workdir)
        handle: PeerHandle
        if self.mode == "thread":
            peer_config = (
                PeerConfig.from_yaml(config) if config is not None and as_is else PeerConfig(**resolved)
            )
            handle = ThreadPeer(peer_config)
        else:
            path = (
                Path(config)
                if config is not None and as_is
                else write_config(self._config_path(name), merged)
            )
            handle = ProcessPeer(
                name,
                path,
                Path(resolved["data_dir"]),
                self.log_dir / f"{name}.log",
                prefix=prefix,
                ready_timeout=ready_timeout or self.ready_timeout,
            )
        self._adopt(handle, self._peers)
        if register and not handle.wait_registered(register_timeout):
            where = f" (log: {handle.log_path})" if isinstance(handle, ProcessPeer) else ""
            raise LauncherError(
                f"peer {name} did not register with {merged['broker']} within {register_timeout} s{where}"
            )
        return handle

    def _adopt(self, handle: Any, into: list[Any]) -> None:
        with self._lock:
            if not self._closed:
                into.append(handle)
                return
        handle.stop(self.stop_timeout)  # closed while it was starting: it must not outlive the swarm
        raise LauncherError("the swarm was closed")

    def _check_open(self) -> None:
        if self._closed:
            raise LauncherError("the swarm was closed")

    # ---- stopping

    def close(self) -> None:
        """Stop every peer (in parallel), then every broker (newest first). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, brokers = list(reversed(self._peers)), list(reversed(self._brokers))
        if peers:
            with ThreadPoolExecutor(max_workers=min(16, len(peers)), thread_name_prefix="swarm-stop") as pool:
                list(pool.map(self._stop_quietly, peers))
        for broker in brokers:
            self._stop_quietly(broker)

    def _stop_quietly(self, handle: BrokerHandle | PeerHandle) -> None:
        stop: Callable[[float], Any] = handle.stop
        try:
            stop(self.stop_timeout)
        except Exception:
            log.exception("stopping %r failed", handle)  # the others must still be stopped

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Swarm {self.mode} {self.workdir}: {len(self._brokers)} brokers, {len(self._peers)} peers>"
