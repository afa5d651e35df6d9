"""Config files: YAML into validated objects, with one-line errors.

pydantic does the field checks (types, ranges, unknown keys); this module turns its reports into
one line naming the file, the key and the problem, raised as `ConfigError`. Relative paths in a
config file are taken relative to the folder of that file, so a config means the same thing
whatever the current directory is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from common.errors import ConfigError


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    # Fields holding filesystem paths, resolved against the config file's folder.
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(f"{path}:{where}: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        base = path.resolve().parent
        for key in cls.PATH_FIELDS:
            value = data.get(key)
            if isinstance(value, str) and value and not Path(value).is_absolute():
                data[key] = os.path.normpath(base / value)
        return cls.validated(data, source=str(path))

    @classmethod
    def validated(cls, data: dict[str, Any], source: str = "config") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """The first problem of a pydantic report, as `key: problem (got value)`."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    got = err.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    more = len(exc.errors()) - 1
    return f"{key}: {message}{shown}" + (f" (and {more} more problems)" if more else "")
