"""Peer: the API object in front of the peer's two threads.

The agent thread owns every broker-facing socket and every download; the server thread answers
other peers' segment requests from the store. Calls made here (from scripts, notebooks, the CLI)
reach the agent through `call()` and come back as `concurrent.futures.Future`s, which also work
with `await asyncio.wrap_future(...)` inside a running event loop (Jupyter).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import zmq

from common.errors import ClosedError, ProtocolError, TransferError
from common.protocol import FileEntry, Files, Stats
from common.segserver import SegmentServer
from common.service import endpoint
from peer.agent import Agent, GetResult, ProgressFn
from peer.config import PeerConfig
from peer.store import Store

log = logging.getLogger(__name__)

_DEFAULT_GET_TIMEOUT_S = 3600.0


class GetFuture(Future[GetResult]):
    """A Future that can also be awaited: `result = await peer.start_get(name)`."""

    def __await__(self) -> Generator[Any, None, GetResult]:
        return asyncio.wrap_future(self).__await__()


class Peer:
    """A peer: `with Peer(config) as p:` or `start()` / `close()`."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self._context: zmq.Context[Any] | None = None
        self._agent: Agent | None = None
        self._server: SegmentServer | None = None
        self._closed = False
        self.store = Store(Path(config.data_dir), on_lost=self._on_lost)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Peer:
        return cls(PeerConfig.from_yaml(path))

    # ---- lifecycle

    def start(self) -> Self:
        if self._context is not None:
            return self
        held = self.store.scan()
        if held:
            log.info(
                "%s: %d segments of %d files verified on disk",
                self.config.name,
                sum(held.values()),
                len(held),
            )
        self._context = zmq.Context()
        try:
            self._server = SegmentServer(
                f"zswarm-serve-{self.config.name}",
                self._context,
                self.store,
                self.config.bind_host,
                self.config.serve_port,
                self.config.upload_limit_mib_s * 1024 * 1024,
            )
            self._server.start()
            self._agent = Agent(self.config, self._context, self.store, lambda: self.serve_endpoint)
            self._agent.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self, bye_timeout: float = 1.0) -> None:
        """Say bye to the broker (so it stops offering this peer at once), then stop the threads."""
        if self._closed:
            return
        self._closed = True
        agent = self._agent
        # Even when not registered at this instant (a re-registration may be under way), so that
        # the broker never keeps a closed peer until its heartbeats time out.
        if agent is not None and agent.alive:
            try:
                agent.call(agent.say_bye).result(bye_timeout).result(bye_timeout)
            except Exception:
                pass  # the broker is away: it will evict this peer when heartbeats stop
        for service in (agent, self._server):
            if service is not None:
                service.stop()
        if self._context is not None:
            self._context.term()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _running_agent(self) -> Agent:
        if self._agent is None or self._closed or not self._agent.alive:
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

    def start_get(
        self, name: str, timeout: float = _DEFAULT_GET_TIMEOUT_S, progress: ProgressFn | None = None
    ) -> GetFuture:
        """Start downloading `name`; returns at once with a future (also awaitable)."""
        agent = self._running_agent()
        future = GetFuture()
        agent.call(lambda: agent.start_get(name, future, timeout, progress)).result(5.0)
        return future

    def get(
        self, name: str, timeout: float = _DEFAULT_GET_TIMEOUT_S, progress: ProgressFn | None = None
    ) -> GetResult:
        """Download `name` into data_dir and return where it came from. Raises on failure."""
        future = self.start_get(name, timeout, progress)
        try:
            return future.result(timeout + 5.0)
        except TimeoutError:
            raise TransferError(f"{name}: not finished within {timeout} s") from None

    # ---- other commands

    def rescan(self) -> dict[str, int]:
        """Verify data_dir again and register exactly what verifies; returns segments held per file id."""
        agent = self._running_agent()
        held = agent.call(agent.rescan).result(600.0)
        return {fid.hex(): n for fid, n in held.items()}

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
        status = agent.call(agent.status).result(5.0)
        if self._server is not None:
            status["served"] = self._server.counters()
        return status
