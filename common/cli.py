"""What both command-line tools share: logging, one-line fatal errors, signals."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from common.errors import ConfigError, ZswarmError

EXIT_CONFIG = 2
EXIT_FAILURE = 1


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def fail(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def run_guarded(body: Callable[[], int]) -> int:
    """Run a CLI body: config problems exit 2, other zswarm errors exit 1, each in one line."""
    try:
        return body()
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except ZswarmError as exc:
        return fail(str(exc), EXIT_FAILURE)
    except FileNotFoundError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except KeyboardInterrupt:
        return 130


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT, for long-running commands."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop
