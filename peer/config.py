"""PeerConfig: what a peer YAML file may say (the same names as the Python API).

Every numeric field has both bounds: the upper ones are far beyond any sensible setting and are
there to catch a slip (a value in ms where s was meant, extra zeros), not to tune anything.

Authenticated mode (docs/SECURITY.md): `secret_key_file` (this peer's NAME.key_secret, mode 0600,
made by zswarm-keygen; NAME should be the peer's name: the broker binds a name to the key filed
under it), `broker_public_key_file` (the broker's public NAME.key: the tracker and origin are
authenticated with it) and `allow_dir` (the public keys of the peers allowed to download from
this one) switch CURVE on for every socket of the peer. All three or none.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from common.config import (
    ConfigModel,
    LogLevel,
    check_allow_dir,
    check_folder,
    check_secret_key_file,
    check_with_secret_key,
)
from common.errors import ConfigError
from common.protocol import ENDPOINT_PATTERN, NAME_PATTERN, RESERVED_SOURCE_NAMES

MAX_UPLOAD_MIB_S = 1_000_000.0  # about 1 TiB/s: beyond any link, so only a typo reaches it


class PeerConfig(ConfigModel):
    PATH_FIELDS: ClassVar[tuple[str, ...]] = (
        "data_dir",
        "secret_key_file",
        "broker_public_key_file",
        "allow_dir",
    )
    HINTS: ClassVar[dict[str, str]] = {
        "name": "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        "broker": "must be a tracker endpoint like tcp://127.0.0.1:5555",
    }

    name: str = Field(pattern=NAME_PATTERN.pattern)
    broker: str = Field(pattern=ENDPOINT_PATTERN.pattern)  # the broker's tracker endpoint
    data_dir: str = Field(min_length=1)
    bind_host: str = "127.0.0.1"
    advertise_host: str | None = None  # host other peers use to reach this one; default: bind_host
    serve_port: int = Field(default=0, ge=0, le=65535)  # 0: any free port
    batch_segments: int = Field(default=64, ge=1, le=1024)  # segments per request (one frame)
    lanes_per_source: int = Field(default=2, ge=1, le=32)  # requests in flight per source
    request_timeout_s: float = Field(default=2.0, gt=0.0, le=600.0)
    broker_timeout_s: float = Field(default=5.0, gt=0.0, le=600.0)
    have_flush_interval_s: float = Field(default=0.1, ge=0.0, le=60.0)
    replan_interval_s: float = Field(default=1.0, gt=0.0, le=600.0)
    upload_limit_mib_s: float = Field(default=0.0, ge=0.0, le=MAX_UPLOAD_MIB_S)  # cap on upload; 0: none
    log_level: LogLevel = "INFO"
    # Authenticated mode (CURVE + an allow-list): all three or none.
    secret_key_file: str | None = None  # this peer's NAME.key_secret (mode 0600)
    broker_public_key_file: str | None = None  # the broker's public NAME.key
    allow_dir: str | None = None  # folder of the public NAME.key files of peers that may download here

    @field_validator("secret_key_file")
    @classmethod
    def _secret_key_usable(cls, value: str | None) -> str | None:
        return check_secret_key_file(value)

    @field_validator("broker_public_key_file")
    @classmethod
    def _broker_key_usable(cls, value: str | None, info: ValidationInfo) -> str | None:
        if check_with_secret_key(value, info.data, "the broker's public key", "this peer's own key"):
            from common.security import load_public

            try:
                load_public(str(value))
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("allow_dir")
    @classmethod
    def _allow_dir_usable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return check_allow_dir(
            value,
            info.data,
            "the public keys of peers that may download here",
            "this peer's own key",
        )

    @property
    def secure(self) -> bool:
        return self.secret_key_file is not None

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        if name in RESERVED_SOURCE_NAMES:
            raise ValueError(f"{name!r} is reserved for the protocol")
        return name

    @field_validator("data_dir")
    @classmethod
    def _data_dir_usable(cls, value: str) -> str:
        return check_folder(value)

    @property
    def public_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        return "127.0.0.1" if self.bind_host in ("0.0.0.0", "*", "") else self.bind_host
