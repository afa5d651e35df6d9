"""BrokerConfig: what a broker YAML file may say (the same names as the Python API)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from common.config import ConfigModel


class BrokerConfig(ConfigModel):
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("share_dir", "manifest_dir")

    share_dir: str = Field(min_length=1)
    manifest_dir: str = Field(min_length=1)
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None  # host peers should use; default: bind_host (127.0.0.1 for 0.0.0.0)
    tracker_port: int = Field(default=5555, ge=0, le=65535)
    heartbeat_port: int = Field(default=5556, ge=0, le=65535)
    origin_port: int = Field(default=5557, ge=0, le=65535)
    heartbeat_interval_s: float = Field(default=1.0, ge=0.01, le=3600.0)
    heartbeat_liveness: int = Field(default=3, ge=1, le=100)
    # "swarm": peers first, the broker as the fallback. "origin_only": every segment from the
    # broker (a plain central server: the baseline the benchmarks compare the swarm against).
    plan_policy: Literal["swarm", "origin_only"] = "swarm"
    plan_block_segments: int = Field(default=64, ge=1, le=1024)
    origin_lanes: int = Field(default=2, ge=1, le=64)  # concurrent origin requests per downloader
    # Super-seeding: blocks of one file the origin may be serving to its downloaders at once,
    # split among them (see broker/planner.py); a block one downloader is fetching from the
    # origin is deferred for the others, who get it from that downloader later.
    # 0: no claims (every downloader gets from the origin every block no peer has).
    origin_window_blocks: int = Field(default=32, ge=0, le=1 << 20)
    # A claim lapses when its downloader reports no progress on the file for this long.
    origin_claim_idle_s: float = Field(default=2.0, gt=0.0)
    strike_limit: int = Field(default=3, ge=1)  # bad-bytes reports before a peer is benched
    bench_s: float = Field(default=30.0, ge=0.0)
    upload_limit_mib_s: float = Field(default=0.0, ge=0.0)  # cap on segment upload; 0: none
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=4096)
    log_level: str = "INFO"

    @property
    def peer_expiry_s(self) -> float:
        # Half an interval of grace: a peer that lost liveness - 1 heartbeats in a row and whose
        # next one is a little late is alive; a dead one is gone within interval x (liveness + 1).
        return self.heartbeat_interval_s * (self.heartbeat_liveness + 0.5)

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.bind_host in ("0.0.0.0", "*", "") else self.bind_host
