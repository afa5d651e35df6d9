"""Issue 8, "a new user's first hour": each rough edge a new user met, as a test. Where the item is
about processes, the processes are real: the command-line tools started as a user starts them
(tests/cli_procs.py) or through the launcher's process mode. The README quick start has its own
test (tests/test_readme.py); the terminal and the exit statuses are in tests/test_cli.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.catalog import MAX_SHARED_SIZE, Catalog
from common.errors import ConfigError
from common.manifest import DIGEST_SIZE, SEGMENT_SIZE, check_name
from common.protocol import DEFAULT_MAX_HEADER_BYTES
from launcher import ProcessBroker, ProcessPeer, Swarm
from launcher.handles import port_of
from peer import GetFuture, Peer, PeerConfig
from tests.cli_procs import LOG_LINE, Cli, listening_socket, write_yaml
from tests.conftest import Stoppable
from tests.helpers import wait_until, write_random

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB


def never(predicate: Callable[[], object], duration: float, what: str, interval: float = 0.05) -> None:
    """Fail as soon as `predicate` holds; pass once `duration` went by without it holding."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        assert not predicate(), what
        time.sleep(interval)
    assert not predicate(), what


def error_lines(lines: list[str]) -> list[str]:
    """What a CLI said on stderr besides its log lines."""
    return [line for line in lines if line.strip() and not LOG_LINE.match(line)]


def peer_config(path: Path, name: str, broker: str, data_dir: Path, **fields: Any) -> Path:
    return write_yaml(path, {"name": name, "broker": broker, "data_dir": str(data_dir), **fields})


def peer_cli(path: Path, *args: str) -> list[str]:
    return ["-m", "peer", "-c", str(path), *args]


# --------------------------------------------------------------------------------- 1. bad names


def test_bad_name_at_the_prompt_is_one_plain_line_and_leaves_no_trace(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    write_random(process_swarm.share_dir / "f.bin", 3 * SEGMENT_SIZE, seed=1)
    broker = process_swarm.start_broker()
    config = peer_config(tmp_path / "p1.yaml", "p1", broker.tracker, tmp_path / "p1", broker_timeout_s=1.0)
    prompt = Cli(peer_cli(config), label="prompt")
    processes.append(prompt)
    prompt.ready()
    prompt.send("get ../x")
    prompt.wait_line(lambda s: s.startswith("error:"), what="the error")
    assert prompt.out[1:] == ["error: invalid name '../x': '..' is not allowed as a path component"]
    # Nothing was sent, so nothing times out later (broker_timeout_s is 1 s here).
    never(lambda: any("did not answer" in line for line in prompt.out + prompt.err), 2.5, "a late timeout")
    prompt.send("status")
    prompt.wait_line(lambda s: s == "}", what="the status")
    status = json.loads("\n".join(prompt.out[2:]))
    assert status["downloads"] == {} and status["registered"] is True
    prompt.send("quit")
    assert prompt.finish() == 0
    assert error_lines(prompt.err) == []  # no traceback, no warning
    assert "p1" not in broker.stats()["live_peers"]  # the bye went out as usual


def test_bad_name_in_a_one_shot_get_exits_1_with_one_line(tmp_path: Path, process_swarm: Swarm) -> None:
    broker = process_swarm.start_broker()
    config = peer_config(tmp_path / "p1.yaml", "p1", broker.tracker, tmp_path / "p1")
    for name, problem in [
        ("../x", "'..' is not allowed as a path component"),
        ("/etc/passwd", "absolute paths are not allowed"),
        ("a\\b", "backslashes are not allowed (the separator is '/')"),
    ]:
        run = subprocess.run(
            [sys.executable, *peer_cli(config, "get", name)], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 1, run.stderr
        assert error_lines(run.stderr.splitlines()) == [f"error: invalid name {name!r}: {problem}"]
        assert run.stdout == ""
    assert not (tmp_path / "x").exists()


def test_check_name_messages_read_after_invalid_name_and_are_distinct() -> None:
    names = ["", "a" * 1100, "/x", "a//b", "./a", "../a", "a\\b", "a\x01b", ".zswarm-x/y"]
    problems = [check_name(n) for n in names]
    assert all(problems)
    assert len(set(problems)) == len(problems)  # one message per problem
    assert problems[5] == "'..' is not allowed as a path component"
    assert not any(p and ("bad path" in p or "_" in p) for p in problems)  # no internal terms


# --------------------------------------------------------------------------------- 2. bye is final


def test_bye_after_a_ping_exchange_is_final(process_swarm: Swarm) -> None:
    broker = process_swarm.start_broker()  # heartbeats every 0.5 s: a silent broker is pinged
    assert isinstance(broker, ProcessBroker)
    # broker_timeout_s of 1 s: by the time of the ping (1.5 s of silence) a re-registration would
    # be due at once, as it was when the bug was seen (bye -> ok, then register 2 ms later).
    p1 = process_swarm.add_peer("p1", broker_timeout_s=1.0)
    assert isinstance(p1, ProcessPeer)
    wait_until(
        lambda: broker.stats()["requests"].get("ping", 0) >= 1, timeout=15, what="a ping answered by a pong"
    )
    registers = broker.stats()["requests"].get("register", 0)
    assert p1.call("quit") == "bye"
    assert p1.wait(10) == 0
    # Within several heartbeat intervals it never shows up again, and never asks to.
    never(lambda: "p1" in broker.stats()["live_peers"], 3.0, "p1 registered again after its bye")
    assert broker.stats()["requests"].get("register", 0) == registers
    log = broker.log_path.read_text()
    assert "peer p1 said bye" in log and "p1 re-registered" not in log


# --------------------------------------------------------------------------------- 4. make demo


def test_demo_with_a_broker_running_says_so_and_touches_nothing(tmp_path: Path, process_swarm: Swarm) -> None:
    running = process_swarm.start_broker()
    ports = {
        "tracker_port": port_of(running.tracker),
        "heartbeat_port": port_of(running.heartbeat),
        "origin_port": port_of(running.origin),
    }
    configs = tmp_path / "configs"
    for source in sorted((ROOT / "configs").glob("*.yaml")):
        fields = yaml.safe_load(source.read_text())
        if source.stem == "broker":
            fields.update(ports)
        else:
            fields["broker"] = running.tracker
        write_yaml(configs / source.name, fields)
    run_dir = tmp_path / "demo-run"  # where the copied configs point, as ../demo-run
    kept = [run_dir / f"peer{i}" / "kept.txt" for i in (1, 2, 3)]
    for path in kept:
        path.parent.mkdir(parents=True)
        path.write_text("still here")
    run = subprocess.run(
        [sys.executable, "examples/demo.py", "--configs", str(configs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"error: port {ports['tracker_port']} is in use: is a broker already running?"
    ]
    assert run.stdout == ""
    assert all(path.read_text() == "still here" for path in kept)
    assert sorted(p.name for p in run_dir.iterdir()) == ["peer1", "peer2", "peer3"]  # no share, no logs
    assert running.stats()["live_peers"] == []  # and nothing talked to the running broker


# --------------------------------------------------------------------------------- 5. 32 GiB


def test_the_size_limit_comes_from_the_header_size() -> None:
    segments = MAX_SHARED_SIZE // SEGMENT_SIZE
    assert MAX_SHARED_SIZE % SEGMENT_SIZE == 0
    assert segments * DIGEST_SIZE <= DEFAULT_MAX_HEADER_BYTES - 1024 * 1024  # room for the rest
    assert 31 * GiB < MAX_SHARED_SIZE < 32 * GiB


def test_files_over_the_limit_are_refused_at_scan_with_one_line(
    share: Path, start_broker: Any, start_peer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    write_random(share / "small.bin", 100, seed=5)
    huge = share / "disk.img"
    with open(huge, "wb") as f:
        f.truncate(40 * GiB)  # sparse: nothing is written, and nothing is hashed
    caplog.set_level(logging.WARNING, logger="broker.catalog")
    broker = start_broker()
    p1 = start_peer("p1", broker)
    assert [f.name for f in p1.list_remote()] == ["small.bin"]
    expected = (
        f"not sharing {huge}: 40.0 GiB is over the 31.5 GiB limit of protocol 2 (manifests in one frame)"
    )
    assert [r.getMessage() for r in caplog.records if r.name == "broker.catalog"] == [expected]
    broker.rescan()
    broker.rescan()
    assert [r.getMessage() for r in caplog.records if r.name == "broker.catalog"] == [expected]  # once
    with open(huge, "r+b") as again:
        again.truncate(MAX_SHARED_SIZE + 1)  # just over: refused too, and said again (a new size)
    broker.rescan()
    messages = [r.getMessage() for r in caplog.records if r.name == "broker.catalog"]
    assert len(messages) == 2 and "31.5 GiB is over the 31.5 GiB limit" in messages[1]
    assert "disk.img" not in broker.rescan()


def test_catalog_refuses_without_a_broker(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    with open(share / "big", "wb") as f:
        f.truncate(MAX_SHARED_SIZE + SEGMENT_SIZE)
    catalog = Catalog(share, tmp_path / "manifests")
    assert catalog.scan() == [] and catalog.entries() == []


# --------------------------------------------------------------------------------- 6. cancel


SLOW = 6 * MiB  # from a broker capped at 2 MiB/s: about 3 s
SLOW_SEGMENTS = SLOW // SEGMENT_SIZE


@pytest.fixture
def slow_peer(share: Path, start_broker: Any, start_peer: Any) -> Peer:
    write_random(share / "slow.bin", SLOW, seed=6)
    broker = start_broker(upload_limit_mib_s=2)
    peer: Peer = start_peer("dl", broker)
    return peer


def first_progress(future: GetFuture, timeout: float = 30.0) -> int:
    """Block until some segments of the download verified; their number."""
    deadline = time.monotonic() + timeout
    subscription = future.progress()
    while time.monotonic() < deadline:
        snap = subscription.get(deadline - time.monotonic())
        if snap.done > 0:
            return snap.done
    raise AssertionError("no progress")


def stopped(peer: Peer, name: str = "slow.bin") -> None:
    wait_until(lambda: name not in peer.status()["downloads"], timeout=5, what=f"{name} to stop")


def test_future_cancel_stops_the_download_and_keeps_the_verified_part(slow_peer: Peer) -> None:
    future = slow_peer.start_get("slow.bin", timeout=60)
    assert first_progress(future) < SLOW_SEGMENTS
    assert future.cancel()
    stopped(slow_peer)
    with pytest.raises(CancelledError):
        future.result(5)
    assert not (slow_peer.store.data_dir / "slow.bin").exists()  # visible only when complete
    again = slow_peer.get("slow.bin", timeout=60)
    assert 0 < again.sources.get("local", 0) < SLOW_SEGMENTS  # only the rest was fetched
    assert sum(again.sources.values()) == SLOW_SEGMENTS


def test_cancelling_the_asyncio_task_that_awaits_it_stops_the_download(slow_peer: Peer) -> None:
    async def scenario() -> GetFuture:
        future = slow_peer.start_get("slow.bin", timeout=60)

        async def wait_for_it() -> Any:
            return await future

        task = asyncio.ensure_future(wait_for_it())
        await asyncio.get_running_loop().run_in_executor(None, first_progress, future)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        return future

    future = asyncio.run(scenario())
    stopped(slow_peer)
    assert future.cancelled()
    assert slow_peer.get("slow.bin", timeout=60).sources.get("local", 0) > 0


def test_every_waiter_of_a_cancelled_get_gets_cancelled_error(slow_peer: Peer) -> None:
    first = slow_peer.start_get("slow.bin", timeout=60)
    second = slow_peer.start_get("slow.bin", timeout=60)  # the same transfer
    first_progress(first)
    assert first.cancel() and second.cancel()
    for future in (first, second):
        with pytest.raises(CancelledError):
            future.result(5)
    stopped(slow_peer)


def test_one_waiter_cancelling_leaves_the_others_download_running(slow_peer: Peer) -> None:
    leaving = slow_peer.start_get("slow.bin", timeout=60)
    staying = slow_peer.start_get("slow.bin", timeout=60)
    first_progress(staying)
    assert leaving.cancel()
    with pytest.raises(CancelledError):
        leaving.result(1)
    assert staying.result(60).size == SLOW


# --------------------------------------------------------------------------------- 7. one data_dir


def test_a_second_peer_on_the_same_data_dir_fails_at_start(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    broker = process_swarm.start_broker()
    data_dir = tmp_path / "shared-data"
    first = Cli(peer_cli(peer_config(tmp_path / "a.yaml", "a", broker.tracker, data_dir), "serve"), label="a")
    processes.append(first)
    first.ready()
    assert (data_dir / ".zswarm" / "lock").read_text().strip() == str(first.pid)
    b_config = peer_config(tmp_path / "b.yaml", "b", broker.tracker, data_dir)
    for args in (("get", "f.bin"), ("serve",), ()):
        second = Cli(peer_cli(b_config, *args), label="b")
        processes.append(second)
        second.close_stdin()
        assert second.finish() == 2
        assert error_lines(second.err) == [
            f"error: data_dir {data_dir} is in use by another zswarm peer (pid {first.pid})"
        ]
    assert broker.stats()["live_peers"] == ["a"]
    first.signal(signal.SIGKILL)  # however the holder ends, the folder is free again
    first.wait(10)
    third = Cli(peer_cli(b_config, "serve"), label="b again")
    processes.append(third)
    third.ready()
    third.signal(signal.SIGTERM)
    assert third.finish() == 0


def test_two_peers_on_one_data_dir_in_one_process(tmp_path: Path, share: Path, start_broker: Any) -> None:
    broker = start_broker()
    config = PeerConfig(name="a", broker=broker.tracker_endpoint, data_dir=str(tmp_path / "d"))
    in_use = rf"data_dir .*/d is in use by another zswarm peer \(pid {os.getpid()}\)"
    with Peer(config), pytest.raises(ConfigError, match=in_use):
        Peer(config.model_copy(update={"name": "b"})).start()
    with Peer(config.model_copy(update={"name": "c"})) as again:  # released at close
        assert again.running


def test_a_name_live_elsewhere_is_refused_and_the_get_says_why(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    write_random(process_swarm.share_dir / "f.bin", 10, seed=7)
    broker = process_swarm.start_broker()
    first = Cli(peer_cli(peer_config(tmp_path / "a.yaml", "p1", broker.tracker, tmp_path / "a"), "serve"))
    processes.append(first)
    serving = first.ready()["serve"]
    wait_until(lambda: "p1" in broker.stats()["live_peers"], what="the first p1")
    config = peer_config(tmp_path / "b.yaml", "p1", broker.tracker, tmp_path / "b", broker_timeout_s=1.0)
    second = Cli(peer_cli(config, "get", "f.bin"), label="second p1")
    processes.append(second)
    assert second.finish(30) == 1
    stderr = "\n".join(second.err)
    assert "registration refused: the name 'p1' is in use by another live peer" in stderr
    assert error_lines(second.err) == [
        "error: not registered with the broker: the name 'p1' is taken by another live peer"
        f" (serving at {serving}); give this one another name, or stop the other"
    ]
    stats = broker.stats()
    assert stats["peers"]["p1"]["endpoint"] == serving  # the first one was not taken over
    assert stats["requests"]["registers_refused"] >= 1
    assert not (tmp_path / "b" / "f.bin").exists()


# --------------------------------------------------------------------------------- 8. rough edges


@pytest.mark.parametrize("module", ["broker", "peer"])
def test_a_port_in_use_is_one_line_naming_the_key_exit_2(tmp_path: Path, module: str) -> None:
    busy = listening_socket()
    port = busy.getsockname()[1]
    try:
        if module == "broker":
            (tmp_path / "share").mkdir()
            fields: dict[str, Any] = {
                "share_dir": "share",
                "manifest_dir": "manifests",
                "tracker_port": port,
                "heartbeat_port": 0,
                "origin_port": 0,
            }
            config, key, args = tmp_path / "b.yaml", "tracker_port", []
        else:
            fields = {"name": "p1", "broker": "tcp://127.0.0.1:9", "data_dir": "d", "serve_port": port}
            config, key, args = tmp_path / "p.yaml", "serve_port", ["serve"]
        write_yaml(config, fields)
        run = subprocess.run(
            [sys.executable, "-m", module, "-c", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        busy.close()
    assert run.returncode == 2
    assert error_lines(run.stderr.splitlines()) == [
        f"error: {key}: port {port} on 127.0.0.1 is in use: is another zswarm already running?"
    ]


def test_json_get_answers_with_counts_and_runs_and_segments_on_request(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    size = 8 * MiB  # 512 segments: the list of every segment's source alone would be ~6,000 chars
    write_random(process_swarm.share_dir / "big.bin", size, seed=8)
    broker = process_swarm.start_broker()
    config = peer_config(tmp_path / "p1.yaml", "p1", broker.tracker, tmp_path / "p1")
    prompt = Cli(["-m", "peer", "-c", str(config), "--json"], label="json prompt")
    processes.append(prompt)
    prompt.ready()
    prompt.send("get big.bin")
    line = prompt.wait_line(lambda s: s.startswith('{"ok"'), what="the answer")
    answer = json.loads(line)
    assert answer["ok"] and len(line) < 1000
    assert answer["result"]["sources"] == {"broker": 512}
    assert answer["result"]["source_runs"] == {"broker": [[0, 512]]}
    assert "segment_sources" not in answer["result"]
    prompt.send("get big.bin --segments")
    line = prompt.wait_line(lambda s: s.startswith('{"ok"') and "segment_sources" in s, what="the list")
    assert json.loads(line)["result"]["segment_sources"] == ["local"] * 512
    prompt.send("quit")
    assert prompt.finish() == 0
    # The one-shot get answers the same way with --json.
    run = subprocess.run(
        [sys.executable, "-m", "peer", "-c", str(config), "--json", "get", "big.bin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    [line] = run.stdout.splitlines()
    assert len(line) < 1000 and json.loads(line)["result"]["sources"] == {"local": 512}


def test_prompt_names_with_spaces_rescan_by_name_and_help(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    write_random(process_swarm.share_dir / "sub dir" / "x.bin", 3 * SEGMENT_SIZE, seed=9)
    broker = process_swarm.start_broker()
    config = peer_config(tmp_path / "p1.yaml", "p1", broker.tracker, tmp_path / "p1")
    prompt = Cli(peer_cli(config), label="prompt")
    processes.append(prompt)
    prompt.ready()
    prompt.send("get sub dir/x.bin")  # the rest of the line is the name
    prompt.wait_line(lambda s: s.startswith("sub dir/x.bin: "), what="the first get")
    prompt.send("get 'sub dir/x.bin' --segments")  # quoted works too (--segments: for --json)
    prompt.wait_line(lambda s: "(segments from local: 3)" in s, what="the quoted get")
    prompt.send("rescan")
    line = prompt.wait_line(lambda s: "verified" in s, what="the rescan")
    assert re.fullmatch(r"sub dir/x\.bin +3 segments verified", line)
    prompt.send("help")
    prompt.wait_line(lambda s: "quotes work too" in s, what="help on names")
    prompt.send("get")
    prompt.wait_line(lambda s: s == "error: usage: get NAME", what="usage")
    prompt.close_stdin()  # Ctrl-D
    assert prompt.finish() == 0
    assert (tmp_path / "p1" / "sub dir" / "x.bin").is_file()


def test_the_library_logs_and_never_prints(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from broker import Broker, BrokerConfig
        from common.errors import NotFound
        from peer import Peer, PeerConfig

        b = BrokerConfig(share_dir={str(tmp_path / "share")!r}, manifest_dir={str(tmp_path / "m")!r},
                         tracker_port=0, heartbeat_port=0, origin_port=0)
        with Broker(b) as broker:
            p = PeerConfig(name="p1", broker=broker.tracker_endpoint, data_dir={str(tmp_path / "p1")!r})
            with Peer(p) as peer:
                peer.wait_registered(10)
                try:
                    peer.get("nope.bin", timeout=10)
                except NotFound:
                    print("caught NotFound")
        """
    )
    (tmp_path / "share").mkdir()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert (run.returncode, run.stdout, run.stderr) == (0, "caught NotFound\n", "")


# --------------------------------------------------------------------------------- 8i. a changing share


def test_a_file_added_to_the_share_shows_up_in_remote_by_itself(process_swarm: Swarm) -> None:
    process_swarm.start_broker()  # rescan_interval_s: the default 2 s
    p1 = process_swarm.add_peer("p1")
    assert p1.list_remote() == []
    write_random(process_swarm.share_dir / "new.bin", 5 * SEGMENT_SIZE, seed=10)
    wait_until(
        lambda: [f["name"] for f in p1.list_remote()] == ["new.bin"], timeout=10, what="new.bin in remote"
    )
    assert p1.get("new.bin", timeout=30).sources == {"broker": 5}


def test_sighup_makes_the_broker_rescan_at_once(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    config = write_yaml(
        tmp_path / "broker.yaml",
        {
            "share_dir": str(share),
            "manifest_dir": str(tmp_path / "manifests"),
            "tracker_port": 0,
            "heartbeat_port": 0,
            "origin_port": 0,
            "rescan_interval_s": 0,  # no periodic rescan: only SIGHUP can find the new file
        },
    )
    broker = Cli(["-m", "broker", "-c", str(config)], label="broker")
    processes.append(broker)
    ready = broker.ready()
    p1 = process_swarm.add_peer("p1", broker=ready["tracker"])
    write_random(share / "late.bin", 7, seed=11)
    assert p1.list_remote() == []
    broker.signal(signal.SIGHUP)
    wait_until(lambda: [f["name"] for f in p1.list_remote()] == ["late.bin"], timeout=3, what="late.bin")
    broker.signal(signal.SIGHUP)  # again: nothing changes, it keeps running
    broker.wait_line(lambda s: "SIGHUP: rescan" in s, stream="err", what="the second SIGHUP")
    assert broker.alive
    process_swarm.close()  # the peer leaves first
    broker.signal(signal.SIGTERM)
    assert broker.finish() == 0
