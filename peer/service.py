"""Peer: the API object in front of the peer's two threads.

The agent thread owns every broker-facing socket and every download; the server thread answers
other peers' segment requests from the store. Calls made here (from scripts, notebooks, the CLI)
reach the agent through `call()` and come back as `concurrent.futures.Future`s, which also work
with `await` inside a running event loop (Jupyter). A download's progress is a subscription
(`start_get(...).progress()`), read in the caller's thread, never a callback on the I/O thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import ClosedError, InvalidName, ProtocolError, TransferError
from common.manifest import check_name
from common.metrics import Snapshot
from common.node import Node, Service
from common.protocol import FileEntry, Files, Stats
from common.segserver import SegmentServer
from common.subscription import Closed
from common.transport import Transport, endpoint
from peer.agent import Agent
from peer.config import PeerConfig
from peer.driver import GetFuture
from peer.lock import DataDirLock
from peer.store import Store
from peer.transfer import GetResult, Progress

log = logging.getLogger(__name__)

_DEFAULT_GET_TIMEOUT_S = 3600.0
ProgressFn = Callable[[int, int], None]


class Peer(Node):
    """A peer: `with Peer(config) as p:` or `start()` / `close()`."""

    def __init__(self, config: PeerConfig) -> None:
        super().__init__(f"peer-{config.name}")
        self.config = config
        self._agent: Agent | None = None
        self._server: SegmentServer | None = None
        self.store = Store(Path(config.data_dir), on_lost=self._on_lost)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Peer:
        return cls(PeerConfig.from_yaml(path))

    # ---- lifecycle (common/node.py)

    def prepare(self) -> None:
        # One peer per data folder (peer/lock.py): taken before the scan, held until after_stop.
        self._data_dir_lock = DataDirLock(self.config.data_dir)
        self._data_dir_lock.acquire()
        held = self.store.scan()
        if held:
            log.info(
                "%s: %d segments of %d files verified on disk",
                self.config.name,
                sum(held.values()),
                len(held),
            )

    def make_services(self, transport: Transport) -> list[Service]:
        self._server = SegmentServer(
            f"zswarm-serve-{self.config.name}",
            transport,
            self.store,
            self.config.bind_host,
            self.config.serve_port,
            self.config.upload_limit_mib_s * 1024 * 1024,
        )
        self.store.on_held = self._server.notify_held
        self._agent = Agent(self.config, transport, self.store, lambda: self.serve_endpoint, self.metrics)
        server = self._server
        self._agent.served_bytes = lambda: server.counters()["bytes_served"]
        return [self._server, self._agent]

    def before_stop(self) -> None:
        """Say bye to the broker (so it stops offering this peer at once). Even when not
        registered at this instant (a re-registration may be under way), so that the broker
        never keeps a closed peer until its heartbeats time out."""
        agent = self._agent
        if agent is not None and agent.alive:
            try:
                left = agent.call(lambda: agent.say_bye(1.0)).result(1.0)
                left.wait(1.5)
            except Exception:
                pass  # the broker is away: it will evict this peer when heartbeats stop

    def after_stop(self) -> None:
        """Every thread stopped: let another peer use the data folder."""
        lock: DataDirLock | None = getattr(self, "_data_dir_lock", None)
        if lock is not None:
            lock.release()

    def close(self, bye_timeout: float = 1.0) -> None:
        super().close()

    def _running_agent(self) -> Agent:
        if self._agent is None or not self.running or not self._agent.alive:
            raise ClosedError(f"peer {self.config.name} is not running")
        return self._agent

    def _on_lost(self, file_id: bytes, runs: list[tuple[int, int]]) -> None:
        agent = self._agent
        if agent is not None:
            agent.lost_reports.put((file_id, runs))
            agent.wakeup.wake()

    # ---- properties

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def serve_endpoint(self) -> str:
        if self._server is None:
            raise ClosedError(f"peer {self.config.name} is not running")
        return endpoint(self.config.public_host, self._server.port)

    @property
    def registered(self) -> bool:
        return self._agent is not None and self._agent.registered

    def wait_registered(self, timeout: float = 10.0) -> bool:
        """Block until the broker has registered this peer (True), or `timeout` passes (False)."""
        agent = self._agent
        return agent is not None and agent.wait_registered(timeout)

    # ---- downloads

    def start_get(self, name: str, timeout: float = _DEFAULT_GET_TIMEOUT_S) -> GetFuture:
        """Start downloading `name`; returns at once with a future (also awaitable). Its
        `progress()` is a subscription of `Progress` snapshots; `cancel()` stops the download
        and keeps what was verified. Raises InvalidName before anything starts."""
        problem = check_name(name)
        if problem:
            raise InvalidName(f"invalid name {name!r}: {problem}")
        agent = self._running_agent()

        def cancel() -> None:
            if agent.alive:
                agent.call(lambda: agent.api_cancel_get(name))

        return agent.call(lambda: agent.api_start_get(name, timeout, cancel)).result(5.0)

    def get(
        self, name: str, timeout: float = _DEFAULT_GET_TIMEOUT_S, progress: ProgressFn | None = None
    ) -> GetResult:
        """Download `name` into data_dir and return where it came from. Raises on failure.
        `progress(done, total)`, if given, is called in this thread as segments arrive."""
        future = self.start_get(name, timeout)
        if progress is not None:
            _follow(future, progress, timeout + 5.0)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            raise TransferError(f"{name}: not finished within {timeout} s") from None

    # ---- other commands

    def rescan(self) -> dict[str, int]:
        """Verify data_dir again and register exactly what verifies; returns segments held per
        file name."""
        agent = self._running_agent()
        held = agent.call(agent.rescan).result(600.0)
        names = {f["file_id"]: f["name"] for f in self.store.files()}
        return {str(names.get(fid.hex(), fid.hex())): n for fid, n in held.items()}

    def files(self) -> list[dict[str, object]]:
        """What this peer holds (complete and partial)."""
        return self.store.files()

    def list_remote(self, timeout: float = 10.0) -> list[FileEntry]:
        """The broker's files."""
        agent = self._running_agent()
        reply = agent.call(agent.list_files).result(timeout).result(timeout)
        if not isinstance(reply, Files):
            raise ProtocolError(f"the broker answered list with {reply.OP}")
        return list(reply.files)

    def broker_stats(self, timeout: float = 10.0) -> dict[str, Any]:
        agent = self._running_agent()
        reply = agent.call(agent.broker_stats).result(timeout).result(timeout)
        if not isinstance(reply, Stats):
            raise ProtocolError(f"the broker answered stats with {reply.OP}")
        return reply.stats

    def status(self) -> dict[str, Any]:
        agent = self._running_agent()
        status: dict[str, Any] = agent.call(agent.status).result(5.0)
        if self._server is not None:
            status["served"] = self._server.counters()
        return status

    def metrics_snapshot(self) -> Snapshot:
        """Every metric of this peer (the agent's and the segment server's), at one moment each."""
        agent = self._running_agent()
        snap = agent.call(agent.metrics.snapshot).result(5.0)
        if self._server is not None:
            served = self._server.published
            snap.values.update(served.values)
            snap.meta.update(served.meta)
        return snap


def _follow(future: GetFuture, progress: ProgressFn, timeout: float) -> None:
    """Call `progress` with each snapshot until the download ends (in the caller's thread)."""
    subscription = future.progress()
    while True:
        try:
            snap: Progress = subscription.get(timeout)
        except (Closed, TimeoutError):
            return
        try:
            progress(snap.done, snap.segments)
        except Exception:
            log.exception("progress callback failed")
