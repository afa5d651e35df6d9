"""The launcher (launcher/): the same swarm in this process and as child processes, and the control
channel of the command-line tools that drives the children (several commands in flight, progress
streamed, cancel, typed errors, kill and restart, clean exits).

A capped source makes a download last: the seed's `upload_limit_mib_s` of 2 MiB/s over a 6 MiB
file gives about 3 s, long enough to see progress, ask something else meanwhile, or cancel."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.cli import BadCommand
from common.errors import InvalidName, NotFound
from common.manifest import SEGMENT_SIZE
from launcher import LauncherError, Mode, ProcessBroker, ProcessPeer, Result, Snapshot, Swarm
from peer.transfer import CancelledTransfer
from tests.helpers import wait_until, write_random

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024
SLOW_SIZE = 6 * MiB  # from a seed capped at 2 MiB/s: about 3 s
SLOW_SEGMENTS = SLOW_SIZE // SEGMENT_SIZE


def make_swarm(tmp_path: Path, mode: Mode) -> Swarm:
    return Swarm(tmp_path / mode, mode, broker_fields={"heartbeat_interval_s": 0.5})


# Process-mode-only tests use conftest's `process_swarm` (heartbeats every 0.5 s as here).
@pytest.fixture(params=["thread", "process"])
def swarm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Swarm]:
    with make_swarm(tmp_path, request.param) as s:
        yield s


def slow_swarm(swarm: Swarm) -> tuple[bytes, str]:
    """A broker, a seed capped at 2 MiB/s holding slow.bin, and the downloader "dl"; returns the
    file's bytes and the seed's name."""
    data = write_random(swarm.share_dir / "slow.bin", SLOW_SIZE, seed=7)
    swarm.start_broker()
    seed = swarm.add_peer("seed", upload_limit_mib_s=2)
    assert seed.get("slow.bin", timeout=30).sources == {"broker": SLOW_SEGMENTS}  # uncapped broker
    swarm.add_peer("dl")
    return data, "seed"


# --------------------------------------------------------------------------------- both modes


def test_the_same_scenario_in_both_modes(swarm: Swarm) -> None:
    data = write_random(swarm.share_dir / "a.bin", 40 * SEGMENT_SIZE + 5, seed=1)
    broker = swarm.start_broker()
    p1, p2 = swarm.add_peer("p1"), swarm.add_peer("p2")
    assert (broker.pid is not None) == (swarm.mode == "process") == (p1.pid is not None)

    r1 = p1.get("a.bin", timeout=30)
    assert isinstance(r1, Result) and r1.sources == {"broker": 41}
    assert r1.path == p1.data_dir / "a.bin" and r1.path.read_bytes() == data
    assert r1.size == len(data) and len(r1.file_id) == 64 and r1.seconds > 0
    r2 = p2.get("a.bin", timeout=30)
    assert r2.sources == {"p1": 41} and r2.source_runs == {"p1": [(0, 41)]}
    assert r2.segment_sources == ["p1"] * 41 and r2.file_id == r1.file_id

    # The other calls answer with the same JSON values in both modes.
    assert [(f["name"], f["complete"]) for f in p2.files()] == [("a.bin", True)]
    assert p2.list_remote() == [{"name": "a.bin", "size": len(data), "file_id": r1.file_id}]
    status = p2.status()
    assert status["registered"] is True and status["name"] == "p2"
    assert {"p1", "p2"} <= set(p2.broker_stats()["live_peers"])
    assert {"p1", "p2"} <= set(broker.stats()["live_peers"])
    assert p2.rescan() == {"a.bin": 41}
    assert broker.rescan() == ["a.bin"]
    assert isinstance(p2.metrics(), dict) and isinstance(broker.metrics(), dict)
    assert p1.wait_registered(5)


def test_errors_come_back_typed(swarm: Swarm) -> None:
    swarm.start_broker()
    p1 = swarm.add_peer("p1")
    with pytest.raises(NotFound, match=r"nope\.bin") as raised:
        p1.get("nope.bin", timeout=10)
    assert raised.value.code == "not_found"
    with pytest.raises(InvalidName):
        p1.start_get("../etc/passwd", timeout=10).result(10)
    with pytest.raises(LauncherError, match="no peer named"):
        swarm.peer("nobody")


def test_progress_streams_before_the_result(swarm: Swarm) -> None:
    data, _ = slow_swarm(swarm)
    get = swarm.peer("dl").start_get("slow.bin", timeout=60)
    seen: list[Snapshot] = []
    before_result = 0
    for snap in get.progress(timeout=60):
        before_result += not get.done()
        seen.append(snap)
    result = get.result(10)
    assert before_result >= 1, "no progress snapshot arrived before the result"
    assert any(0 < s.done < SLOW_SEGMENTS and s.state == "fetching" for s in seen)
    assert [s.done for s in seen] == sorted(s.done for s in seen)  # newest each time, never older
    assert all(s.name == "slow.bin" and s.segments in (0, SLOW_SEGMENTS) for s in seen)
    if swarm.mode == "process":
        assert len(seen) <= 12 * (result.seconds + 1)  # about ten a second at most
    assert result.sources == {"seed": SLOW_SEGMENTS} and result.path.read_bytes() == data


def test_cancel_stops_a_get(swarm: Swarm) -> None:
    slow_swarm(swarm)
    dl = swarm.peer("dl")
    get = dl.start_get("slow.bin", timeout=60)
    running = next(s for s in get.progress(timeout=30) if s.done > 0)  # some segments verified
    assert running.done < SLOW_SEGMENTS
    get.cancel()
    with pytest.raises(CancelledTransfer, match="cancelled"):
        get.result(10)
    wait_until(lambda: "slow.bin" not in dl.status()["downloads"], timeout=10, what="the transfer to stop")
    assert not (dl.data_dir / "slow.bin").exists()  # never visible unless complete
    assert dl.get("slow.bin", timeout=60).sources.get("local", 0) > 0  # what was verified is kept


# --------------------------------------------------------------------------------- process mode


def test_two_commands_in_flight(process_swarm: Swarm) -> None:
    slow_swarm(process_swarm)
    dl = process_swarm.peer("dl")
    assert isinstance(dl, ProcessPeer)
    get = dl.start_get("slow.bin", timeout=60)
    next(iter(get.progress(timeout=30)))  # it runs
    status = dl.status()  # answered while the get is still running
    assert not get.done()
    assert status["downloads"]["slow.bin"]["state"] in ("planning", "fetching")
    # Raw commands too: several requests in flight, each answered by its own id.
    pending = [dl.request("files"), dl.request("status"), dl.request("remote")]
    answers = [p.wait(10) for p in pending]
    assert answers[2][0]["name"] == "slow.bin" and answers[1]["name"] == "dl"
    assert not get.done()
    assert get.result(60).sources == {"seed": SLOW_SEGMENTS}


def test_control_cancel_op(process_swarm: Swarm) -> None:
    slow_swarm(process_swarm)
    dl = process_swarm.peer("dl")
    assert isinstance(dl, ProcessPeer)
    first = dl.request("get", name="slow.bin", timeout=60)
    second = dl.request("get", name="slow.bin", timeout=60)  # the same file twice: one transfer
    assert dl.call("cancel", name="slow.bin") == {"cancelled": 2}
    for pending in (first, second):
        with pytest.raises(CancelledTransfer, match="cancelled"):
            pending.wait(10)
    assert dl.call("cancel", name="slow.bin") == {"cancelled": 0}  # nothing left to cancel


def test_bad_commands_are_answered_not_fatal(process_swarm: Swarm) -> None:
    process_swarm.start_broker()
    p1 = process_swarm.add_peer("p1")
    assert isinstance(p1, ProcessPeer)
    with pytest.raises(BadCommand, match="unknown op"):
        p1.call("launch_missiles")
    with pytest.raises(BadCommand, match="missing argument 'name'"):
        p1.call("get")
    with pytest.raises(BadCommand, match="wrong type"):
        p1.call("get", name="x", timeout="soon")
    p1.client.send_line("this is not json")
    assert p1.status()["registered"] is True  # still serving


def test_kill_and_restart_a_broker_process(process_swarm: Swarm) -> None:
    write_random(process_swarm.share_dir / "f.bin", 20 * SEGMENT_SIZE, seed=3)
    broker = process_swarm.start_broker()
    assert isinstance(broker, ProcessBroker)
    p1 = process_swarm.add_peer("p1")
    endpoints = (broker.tracker_endpoint, broker.heartbeat_endpoint, broker.origin_endpoint)
    old_pid = broker.pid
    broker.kill()
    assert not broker.alive and broker.returncode == -signal.SIGKILL
    with pytest.raises(LauncherError, match="not running"):
        broker.stats()
    broker.restart()
    assert broker.alive and broker.pid != old_pid
    assert (broker.tracker_endpoint, broker.heartbeat_endpoint, broker.origin_endpoint) == endpoints
    wait_until(lambda: "p1" in broker.stats()["live_peers"], timeout=20, what="p1 to register again")
    assert p1.get("f.bin", timeout=30).sources == {"broker": 20}


def test_quit_eof_and_sigterm_leave_cleanly(process_swarm: Swarm) -> None:
    broker = process_swarm.start_broker()
    quitter, closer, termed = (process_swarm.add_peer(n) for n in ("quitter", "closer", "termed"))
    assert isinstance(quitter, ProcessPeer) and isinstance(closer, ProcessPeer)
    assert isinstance(termed, ProcessPeer) and isinstance(broker, ProcessBroker)

    assert quitter.call("quit") == "bye"
    assert quitter.wait(10) == 0
    assert "quitter" not in broker.stats()["live_peers"]  # it said bye: gone at once

    closer.client.close_stdin()  # end of input is a quit
    assert closer.wait(10) == 0

    termed.signal(signal.SIGTERM)
    assert termed.wait(10) == 0
    with pytest.raises(LauncherError):
        termed.status()

    assert broker.call("quit") == "bye"
    assert broker.wait(10) == 0
    assert (quitter.stop(), closer.stop(), broker.stop()) == (0, 0, 0)  # idempotent


def test_prefix_and_log_files(process_swarm: Swarm) -> None:
    # `env` execs its command like `ip netns exec` does: the PID is the peer's own.
    broker = process_swarm.start_broker(prefix=["env", "ZSWARM_TEST_PREFIX=1"])
    p1 = process_swarm.add_peer("p1", prefix=["env", "ZSWARM_TEST_PREFIX=1"])
    assert isinstance(p1, ProcessPeer) and isinstance(broker, ProcessBroker)
    with open(f"/proc/{p1.pid}/environ", "rb") as f:
        assert b"ZSWARM_TEST_PREFIX=1" in f.read().split(b"\0")
    assert p1.log_path == process_swarm.log_dir / "p1.log"
    wait_until(lambda: "registered" in p1.log_path.read_text(), timeout=10, what="p1's log")


def test_close_stops_everything_once(tmp_path: Path) -> None:
    with make_swarm(tmp_path, "process") as swarm:  # the with: stopped even if an assert fails
        broker = swarm.start_broker()
        peers = [swarm.add_peer(f"p{i}") for i in range(3)]
        assert isinstance(broker, ProcessBroker)
        process_peers = [p for p in peers if isinstance(p, ProcessPeer)]
        assert len(process_peers) == 3
        swarm.close()
        assert not broker.alive and not any(p.alive for p in process_peers)
        assert all(p.returncode == 0 for p in process_peers) and broker.returncode == 0
        swarm.close()  # idempotent
        with pytest.raises(LauncherError, match="closed"):
            swarm.add_peer("late")


def test_a_bad_config_fails_at_start_with_the_childs_message(process_swarm: Swarm) -> None:
    process_swarm.start_broker()
    with pytest.raises(LauncherError, match="lanes_per_source"):
        process_swarm.add_peer("bad", lanes_per_source=0)
