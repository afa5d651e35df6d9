"""Which code a measurement ran: the checkout's commit and whether some folders differ from it.

Used by the benchmarks and the simulator to record, in every result file, the code they measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("common", "broker", "peer")


def git_state(folders: tuple[str, ...] = CORE) -> tuple[str, bool]:
    """(short commit, whether `folders` differ from it); ("", False) outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *folders],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "", False
    return commit, bool(dirty)
