"""The launcher: one way to start a zswarm broker and peers, for the tests, the benchmarks and the
demo, either in this process or as child processes, with the same interface.

    from launcher import Swarm
    with Swarm(workdir, "process") as swarm:          # or "thread"
        swarm.start_broker()
        p1 = swarm.add_peer("p1")
        result = p1.get("movie.bin", timeout=60)       # a Result in both modes

- launcher/swarm.py: `Swarm`, which writes the configs and starts and stops everything.
- launcher/handles.py: `BrokerHandle`, `PeerHandle`, `GetHandle`, `Result`, `Snapshot`, each with
  a thread-mode and a process-mode implementation.
- launcher/process.py: the process driver (`ChildProcess`, `ControlClient`): children speaking
  JSON lines, driven over the control channel of the command-line tools (common/cli.py).
"""

import logging

from launcher.handles import (
    BrokerHandle,
    GetHandle,
    PeerHandle,
    ProcessBroker,
    ProcessPeer,
    Result,
    Snapshot,
    ThreadBroker,
    ThreadPeer,
)
from launcher.process import (
    ChildProcess,
    CommandFailed,
    ControlClient,
    LauncherError,
    LauncherTimeout,
    Pending,
)
from launcher.swarm import Mode, Swarm

# A library logs and leaves printing to the application: without this, records of WARNING and above
# would reach stderr through logging's last-resort handler in scripts that configure no logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BrokerHandle",
    "ChildProcess",
    "CommandFailed",
    "ControlClient",
    "GetHandle",
    "LauncherError",
    "LauncherTimeout",
    "Mode",
    "PeerHandle",
    "Pending",
    "ProcessBroker",
    "ProcessPeer",
    "Result",
    "Snapshot",
    "Swarm",
    "ThreadBroker",
    "ThreadPeer",
]
