"""Compatibility: `BrokerProcess` and `PeerProcess`, the process driver from before the launcher,
now thin wrappers over it. New code uses `launcher.Swarm` in process mode (or the handles of
launcher/handles.py directly); this module stays only while bench/hosts.py imports it.

Both run the real command line on an existing config file, over its control channel (see
common/cli.py), so there is one process driver: launcher/process.py. `PeerProcess.command` keeps
the answers of the old `--json` prompt (`{"ok": true, "cmd": ..., "result": ...}` or
`{"ok": false, ...}`) for the prompt commands a script used: ls, remote, status, broker, rescan.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from launcher.handles import CALL_TIMEOUT_S, ProcessBroker, ProcessPeer
from launcher.process import ChildProcess as DrivenProcess
from launcher.process import LauncherError as ProcessError
from launcher.swarm import read_config

__all__ = ["BrokerProcess", "DrivenProcess", "PeerProcess", "ProcessError"]

# prompt command -> control op
_PROMPT_OPS = {
    "ls": "files",
    "remote": "remote",
    "status": "status",
    "broker": "broker_stats",
    "rescan": "rescan",
}


class BrokerProcess(ProcessBroker):
    """`python -m broker -c CONFIG --control`; `tracker`, `heartbeat`, `origin` from its ready line."""

    def __init__(
        self, config: Path, log_path: Path, ready_timeout: float = 60.0, prefix: list[str] | None = None
    ) -> None:
        super().__init__(config.stem, config, log_path, prefix=prefix, ready_timeout=ready_timeout)

    def log_tail(self, lines: int = 5) -> str:
        return self.client.log_tail(lines)


class PeerProcess:
    """`python -m peer -c CONFIG control`, answering prompt-style commands and `get` as dicts."""

    def __init__(
        self, config: Path, log_path: Path, ready_timeout: float = 30.0, prefix: list[str] | None = None
    ) -> None:
        data_dir = Path(read_config(config, ("data_dir",)).get("data_dir", "."))
        self.handle = ProcessPeer(
            config.stem, config, data_dir, log_path, prefix=prefix, ready_timeout=ready_timeout
        )
        self.name = self.handle.name
        self.serve = self.handle.serve_endpoint
        self.pid = self.handle.pid
        self.log_path = log_path

    def command(self, line: str, timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        """One prompt command (ls, remote, status, broker, rescan, get NAME) as the `--json`
        prompt answered it."""
        words = shlex.split(line)
        cmd = words[0].lower() if words else ""
        try:
            if cmd == "get" and len(words) == 2:
                result = self.handle.call("get", timeout + CALL_TIMEOUT_S, name=words[1], timeout=timeout)
            elif cmd in _PROMPT_OPS and len(words) == 1:
                result = self.handle.call(_PROMPT_OPS[cmd], timeout)
            else:
                raise ValueError(f"unknown command {line!r}")
        except (ProcessError, ValueError) as exc:
            raise ProcessError(f"peer {self.name}: {line}: {exc}") from exc
        except Exception as exc:  # the peer's own error: an answer, as the prompt gave it
            return {"ok": False, "cmd": cmd, "error": str(exc), "type": type(exc).__name__}
        return {"ok": True, "cmd": cmd, "result": result}

    def get(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Download `name`; returns the result (sources, seconds, path...) or raises ProcessError."""
        answer = self.command(f"get {shlex.quote(name)}", timeout)
        if not answer.get("ok"):
            raise ProcessError(f"peer {self.name}: get {name} failed: {answer.get('error')}")
        result: dict[str, Any] = answer["result"]
        return result

    def log_tail(self, lines: int = 5) -> str:
        return self.handle.client.log_tail(lines)

    def signal(self, signum: int) -> None:
        self.handle.signal(signum)

    def kill(self) -> None:
        self.handle.kill()

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.handle.stop(timeout)

    @property
    def alive(self) -> bool:
        return self.handle.alive
