"""What one download costs the broker, in messages.

    python -m bench.messages                 # one 1 GiB download from the broker alone
    python -m bench.messages --size-mib 256

A broker and one peer (in this process, real sockets on 127.0.0.1: the launcher's thread mode); the
peer downloads a file that only the broker has. Counted from the broker's own statistics, before
and after: tracker messages by kind (get, have, heartbeats, ...) and origin segment requests. The
file is sparse (zeros): its content does not change the message count, and it needs no disk space
to share.
Baseline in the same run: the number of 16 KiB segments, i.e. the messages a one-segment-per-request
design would need for the data alone.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench._util import save
from common.manifest import SEGMENT_SIZE
from launcher import Swarm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.messages", description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--results-name", default="messages", help="bench/results/<name>.json")
    args = ap.parse_args(argv)
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="zswarm-bench-messages-") as tmp:
        work = Path(tmp)
        (work / "share").mkdir()
        with open(work / "share" / "big.bin", "wb") as f:
            f.truncate(size)
        with Swarm(work, "thread", broker_fields={"log_level": "WARNING"}) as swarm:
            broker = swarm.start_broker()
            peer = swarm.add_peer("p1", register_timeout=10)
            before = broker.stats()
            result = peer.get("big.bin", timeout=600)
            after = broker.stats()
    tracker = {k: v - before["requests"].get(k, 0) for k, v in after["requests"].items()}
    tracker = {k: v for k, v in tracker.items() if v}
    origin = after["origin"]["requests"] - before["origin"]["requests"]
    total = sum(tracker.values()) + origin
    segments = (size + SEGMENT_SIZE - 1) // SEGMENT_SIZE
    out = {
        "size_bytes": size,
        "seconds": round(result.seconds, 3),
        "tracker_messages": tracker,
        "origin_requests": origin,
        "broker_messages_total": total,
        "segments": segments,
        "messages_per_segment": round(total / segments, 5),
    }
    print(f"one {args.size_mib} MiB download from the broker alone ({result.seconds:.2f} s):")
    print(f"  tracker messages  {sum(tracker.values()):>8}  {tracker}")
    print(f"  origin requests   {origin:>8}")
    per_segment = total / segments
    print(f"  broker total      {total:>8}  (segments: {segments}; {per_segment:.4f} messages per segment)")
    save("messages", args, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
