"""BrokerConfig: what a broker YAML file may say (the same names as the Python API).

Every numeric field has both bounds: the upper ones are far beyond any sensible setting and are
there to catch a slip (a value in ms where s was meant, extra zeros), not to tune anything.

Authenticated mode (docs/SECURITY.md): `secret_key_file` (the broker's NAME.key_secret, mode 0600,
made by zswarm-keygen) and `allow_dir` (a folder of the peers' public NAME.key files: a peer may
connect only with a listed key, and may register only as the NAME its key is filed under) switch
CURVE on for every socket of the broker. Both or neither; both are checked when the file is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from common.config import ConfigModel, LogLevel, check_allow_dir, check_folder, check_secret_key_file
from common.errors import ConfigError
from common.protocol import MAX_REQUEST_BYTES

DAY_S = 86400.0
MAX_UPLOAD_MIB_S = 1_000_000.0  # about 1 TiB/s: beyond any link, so only a typo reaches it


class BrokerConfig(ConfigModel):
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("share_dir", "manifest_dir", "secret_key_file", "allow_dir")

    share_dir: str = Field(min_length=1)
    manifest_dir: str = Field(min_length=1)
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None  # host peers should use; default: bind_host (127.0.0.1 for 0.0.0.0)
    tracker_port: int = Field(default=5555, ge=0, le=65535)
    heartbeat_port: int = Field(default=5556, ge=0, le=65535)
    origin_port: int = Field(default=5557, ge=0, le=65535)
    # Bounds as the wire's `registered` message allows (common/protocol.py).
    heartbeat_interval_s: float = Field(default=1.0, ge=0.01, le=3600.0)
    heartbeat_liveness: int = Field(default=3, ge=1, le=100)
    # "swarm": peers first, the broker as the fallback. "origin_only": every segment from the
    # broker (a plain central server: the baseline the benchmarks compare the swarm against).
    plan_policy: Literal["swarm", "origin_only"] = "swarm"
    plan_block_segments: int = Field(default=64, ge=1, le=1024)
    origin_lanes: int = Field(default=2, ge=1, le=64)  # concurrent origin requests per downloader
    # Relay trees (broker/planner.py, step 6): what no peer holds yet flows from the origin
    # through one tree per stripe of the file over its active downloaders, each node passing
    # it on to at most this many others. Larger: shallower trees, more load per inner node.
    relay_fanout: int = Field(default=4, ge=1, le=64)
    # A relay whose children lag behind it and whose peak upload is this many times below the
    # fastest downloader's of the file becomes a leaf of every relay tree (0: never).
    slow_relay_factor: float = Field(default=3.0, ge=0.0, le=100.0)
    # A downloader that neither asks for a plan nor reports progress for this long leaves the
    # relay trees (it stalled, or was stopped without saying so).
    download_idle_s: float = Field(default=2.0, gt=0.0, le=DAY_S)
    strike_limit: int = Field(default=3, ge=1, le=1000)  # bad-bytes reports before a peer is benched
    bench_s: float = Field(default=30.0, ge=0.0, le=DAY_S)
    upload_limit_mib_s: float = Field(default=0.0, ge=0.0, le=MAX_UPLOAD_MIB_S)  # cap on upload; 0: none
    # The tracker socket's frame limit, at most the protocol's largest request (1 MiB, a
    # `register`: see `effective_max_request_bytes`); each op has its own smaller limit too.
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    # How often the share folder is listed for files added, changed or removed (0: only at start
    # and on `rescan`). A listing stats every file; hashing happens only for what changed.
    rescan_interval_s: float = Field(default=2.0, ge=0.0, le=DAY_S)
    log_level: LogLevel = "INFO"
    # Authenticated mode (CURVE + an allow-list): both or neither.
    secret_key_file: str | None = None  # the broker's NAME.key_secret (mode 0600)
    allow_dir: str | None = None  # folder of the public NAME.key files of the peers allowed in

    @field_validator("secret_key_file")
    @classmethod
    def _secret_key_usable(cls, value: str | None) -> str | None:
        return check_secret_key_file(value)

    @field_validator("allow_dir")
    @classmethod
    def _allow_dir_usable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_allow_dir(
            value, info.data, "the folder of the peers' public keys", "the broker's own key"
        )

    @property
    def secure(self) -> bool:
        return self.secret_key_file is not None

    @property
    def effective_max_request_bytes(self) -> int:
        return min(self.max_request_bytes, MAX_REQUEST_BYTES)

    @field_validator("share_dir")
    @classmethod
    def _share_dir_not_a_file(cls, value: str) -> str:
        # Only what is wrong whatever happens next: the folder itself may be created after the
        # config is loaded (examples/demo.py does), so its existence is check_share_dir's business.
        if os.path.lexists(value) and not os.path.isdir(value):
            raise ValueError(f"{value} exists and is not a folder")
        return value

    @field_validator("manifest_dir")
    @classmethod
    def _manifest_dir_usable(cls, value: str) -> str:
        return check_folder(value)

    def check_share_dir(self) -> None:
        """Raise a one-line ConfigError unless share_dir is an existing folder the broker can read.

        Not part of validation, so that a program may create the folder after loading its config;
        the broker calls it when it starts."""
        path = Path(self.share_dir)
        if path.is_dir() and os.access(path, os.R_OK | os.X_OK):
            return
        if path.is_dir():
            problem = "is a folder this process cannot read"
        elif os.path.lexists(path):
            problem = "exists and is not a folder"
        else:
            problem = "does not exist (the broker shares this folder, it does not create it)"
        raise ConfigError(self.problem_line("share_dir", f"{self.share_dir} {problem}"))

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
