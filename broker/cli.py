"""zswarm-broker: run a broker from a YAML config until Ctrl-C or SIGTERM.

    zswarm-broker -c broker.yaml              prints one ready line, then runs (stdin is ignored)
    zswarm-broker -c broker.yaml --control    the same ready line, then serves control commands

The share folder is listed again every `rescan_interval_s` (files added, changed or removed take
effect while it runs); SIGHUP (`kill -HUP PID`) lists it at once. Ctrl-C exits with status 130,
SIGTERM with 0, each after a clean stop (common/cli.py has the rule).

With --control, stdin and stdout are a control channel (the protocol is described in
common/cli.py): ops `stats`, `rescan`, `metrics` and `quit`; end of input quits too, and the exit
status is 0 however it stops. This is how the launcher (launcher/) drives broker processes.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.config import BrokerConfig
from broker.service import Broker
from common.cli import (
    Command,
    finish_control,
    on_sighup,
    run_guarded,
    say,
    serve_control,
    setup_logging,
    stop_event_on_signals,
)


def ready_line(broker: Broker) -> dict[str, Any]:
    """The one machine-readable line printed when ready, so that scripts find ports the OS chose."""
    return {
        "event": "ready",
        "tracker": broker.tracker_endpoint,
        "heartbeat": broker.heartbeat_endpoint,
        "origin": broker.origin_endpoint,
        "files": len(broker.catalog.entries()),
    }


def control_ops(broker: Broker) -> dict[str, Any]:
    def rescan(cmd: Command) -> list[str]:
        return broker.rescan()

    return {
        "stats": lambda cmd: broker.stats(),
        "rescan": rescan,
        "metrics": lambda cmd: broker.metrics_snapshot().flat(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zswarm-broker", description="Run a zswarm broker.")
    parser.add_argument("-c", "--config", required=True, help="broker YAML config")
    parser.add_argument("--log-level", help="override the config's log_level")
    parser.add_argument(
        "--control", action="store_true", help="serve JSON-lines commands on stdin (for programs)"
    )
    args = parser.parse_args(argv)

    def body() -> int:
        config = BrokerConfig.from_yaml(args.config)
        setup_logging(args.log_level or config.log_level)
        stop = stop_event_on_signals()
        broker = Broker(config)
        on_sighup(broker.rescan, "rescan")  # installed first: a SIGHUP never kills the broker
        if args.control:
            with broker:
                server = serve_control(control_ops(broker), ready_line(broker), stop)
            return finish_control(server)
        with broker:
            say(json.dumps(ready_line(broker)))
            while not stop.wait(0.5):
                pass
        say(json.dumps({"event": "stopped"}))
        return stop.exit_status()  # 130 after Ctrl-C, 0 after SIGTERM

    return run_guarded(body)
