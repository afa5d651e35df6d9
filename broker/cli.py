"""zswarm-broker: run a broker from a YAML config until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys

from broker.config import BrokerConfig
from broker.service import Broker
from common.cli import run_guarded, setup_logging, stop_event_on_signals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zswarm-broker", description="Run a zswarm broker.")
    parser.add_argument("-c", "--config", required=True, help="broker YAML config")
    parser.add_argument("--log-level", help="override the config's log_level")
    args = parser.parse_args(argv)

    def body() -> int:
        config = BrokerConfig.from_yaml(args.config)
        setup_logging(args.log_level or config.log_level)
        stop = stop_event_on_signals()
        with Broker(config) as broker:
            # One machine-readable line, so that scripts can find ports chosen by the OS.
            print(
                json.dumps(
                    {
                        "event": "ready",
                        "tracker": broker.tracker_endpoint,
                        "heartbeat": broker.heartbeat_endpoint,
                        "origin": broker.origin_endpoint,
                        "files": len(broker.catalog.entries()),
                    }
                ),
                flush=True,
            )
            while not stop.wait(0.5):
                pass
        print(json.dumps({"event": "stopped"}), file=sys.stdout, flush=True)
        return 0

    return run_guarded(body)
