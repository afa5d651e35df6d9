"""Worker threads that leave the process's signals to the main thread.

The kernel hands a signal sent to a process to any one of its threads that does not block it,
and Python runs the handler only in the main thread, the next time that thread runs Python. A
main thread blocked in `input()` (the peer's prompt) or in a C call does not notice a Ctrl-C
that landed on a worker until something else wakes it: the prompt ignored Ctrl-C in 2 of 10
runs. Every thread zswarm starts blocks SIGINT, SIGTERM and SIGHUP, so they reach the main
thread (libzmq's own threads block every signal already)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

PROCESS_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


def worker_thread(target: Callable[..., Any], name: str, args: tuple[Any, ...] = ()) -> threading.Thread:
    """A daemon thread running `target(*args)` with the process's signals blocked (not started)."""

    def run() -> None:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        target(*args)

    return threading.Thread(target=run, name=name, daemon=True)
