"""The command-line tools as a person meets them: prompt parsing (names with spaces), log lines
kept off the prompt line and out of the progress bar, the bar itself (bytes, MiB/s, time left, on
a terminal only), and one exit-status rule for Ctrl-C and SIGTERM in every mode."""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common import cli as common_cli
from common.cli import EXIT_INTERRUPTED, Console, ConsoleHandler, StopEvent
from launcher import Swarm
from peer import cli as peer_cli
from peer.cli import Line, parse_line, render
from tests.cli_procs import LOG_LINE, Cli, PtyCli, write_yaml
from tests.conftest import Stoppable
from tests.helpers import wait_until, write_random

pytestmark = pytest.mark.timeout(90)

MiB = 1024 * 1024


# --------------------------------------------------------------------------------- the prompt line


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("get movie.bin", Line("get", ["movie.bin"])),
        ("get sub dir/x.bin", Line("get", ["sub dir/x.bin"])),
        ("  GET   sub dir/x.bin  ", Line("get", ["sub dir/x.bin"])),
        ("get 'sub dir/x.bin'", Line("get", ["sub dir/x.bin"])),
        ('get "it\'s here.bin"', Line("get", ["it's here.bin"])),
        ("get ' leading space.bin'", Line("get", [" leading space.bin"])),
        ("get a b.bin --segments", Line("get", ["a b.bin"], segments=True)),
        ("get --segments a b.bin", Line("get", ["a b.bin"], segments=True)),
        ("ls", Line("ls", [])),
        ("rescan", Line("rescan", [])),
        ("", None),
        ("   ", None),
    ],
)
def test_parse_line(line: str, expected: Line | None) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", ["get", "get --segments", "get 'a' 'b'", "get 'unbalanced"])
def test_parse_line_refuses(line: str) -> None:
    with pytest.raises(ValueError):
        parse_line(line)


def test_rescan_and_help_read_as_text() -> None:
    text = render("rescan", {"b.bin": 3, "a dir/a.bin": 12})
    assert text.splitlines() == [
        f"{'a dir/a.bin':<40} {12:>12} segments verified",
        f"{'b.bin':<40} {3:>12} segments verified",
    ]
    assert render("rescan", {}) == "(nothing held)"
    assert "the rest of the line is the name" in peer_cli.HELP and "quotes" in peer_cli.HELP


# --------------------------------------------------------------------------------- log lines


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def console_logger() -> Iterator[tuple[logging.Logger, FakeTerminal, Console]]:
    """A logger writing through a fresh Console to a fake terminal."""
    stream = FakeTerminal()
    console = Console()
    handler = ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("zswarm-test-console")
    logger.propagate = False
    logger.addHandler(handler)
    saved = common_cli.console
    common_cli.console = console  # the handler writes through the module's console
    try:
        yield logger, stream, console
    finally:
        common_cli.console = saved
        logger.removeHandler(handler)


def test_a_log_line_during_a_bar_goes_through_tqdm_write(
    console_logger: tuple[logging.Logger, FakeTerminal, Console], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tqdm import tqdm

    logger, stream, console = console_logger
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: calls.append((s, file))))
    bar = tqdm(total=10, file=io.StringIO())
    with console.showing_bar(bar):
        logger.warning("while the bar runs")
    bar.close()
    logger.warning("after it")
    assert calls == [("WARNING while the bar runs", stream)]
    assert stream.getvalue() == "WARNING after it\n"


def test_a_real_bar_is_redrawn_below_a_log_line(
    console_logger: tuple[logging.Logger, FakeTerminal, Console],
) -> None:
    from tqdm import tqdm

    logger, stream, console = console_logger
    bar = tqdm(total=100, file=stream, desc="movie.bin", ncols=80, mininterval=0)
    bar.update(40)
    with console.showing_bar(bar):
        logger.warning("a log line")
    bar.close()
    out = stream.getvalue()
    before, after = out.split("WARNING a log line\n")
    assert "movie.bin:  40%" in before and "movie.bin:  40%" in after  # cleared, written, redrawn


def test_a_log_line_before_a_delayed_bar_shows_leaves_no_bar_behind(
    console_logger: tuple[logging.Logger, FakeTerminal, Console],
) -> None:
    """A download that ends before the bar's delay: its "done" log line must not draw the bar
    (tqdm.write redraws every bar, shown or not, and close leaves such a bar on the screen, so
    the result line was printed on the same line as a 0% bar: seen in the README test)."""
    from tqdm import tqdm

    logger, stream, console = console_logger
    bar = tqdm(total=13, file=stream, desc="hello.txt", ncols=80, delay=60.0)
    with console.showing_bar(bar):
        logger.warning("hello.txt: done")
    bar.close()
    stream.write("hello.txt: 13 bytes\n")
    assert stream.getvalue() == "WARNING hello.txt: done\nhello.txt: 13 bytes\n"


def test_a_log_line_at_the_prompt_clears_it_and_redraws_it(
    console_logger: tuple[logging.Logger, FakeTerminal, Console], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, stream, console = console_logger
    stdout = FakeTerminal()
    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(common_cli, "_line_buffer", lambda: "get mov")
    with console.at_prompt("zswarm> "):
        logger.warning("registered")
    logger.warning("not at the prompt")
    assert stream.getvalue() == "\r\x1b[KWARNING registered\nWARNING not at the prompt\n"
    assert stdout.getvalue() == "zswarm> get mov"  # the prompt again, with what was typed


def test_without_a_terminal_log_lines_are_plain(
    console_logger: tuple[logging.Logger, FakeTerminal, Console],
) -> None:
    logger, _, console = console_logger
    plain = io.StringIO()
    handler = logger.handlers[0]
    assert isinstance(handler, ConsoleHandler)
    handler.setStream(plain)
    with console.at_prompt("zswarm> "):
        logger.warning("x")
    assert plain.getvalue() == "WARNING x\n"


class InterruptingTerminal(FakeTerminal):
    """A terminal where, at the first write, another thread logs a line (as the driver thread
    logs "registered" while the prompt prints its banner)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.interrupted = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self.interrupted:
            self.interrupted = True
            other = threading.Thread(target=self.logger.warning, args=("registered",))
            other.start()
            other.join(0.2)  # with the line under the console's lock, the log line waits for it
        return written


def test_a_line_for_the_user_is_never_split_by_a_log_line(
    console_logger: tuple[logging.Logger, FakeTerminal, Console], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The banner of the prompt once showed `...lists commands2026-11-30 ... registered`: print()
    writes the text and the newline apart (unbuffered, as under PYTHONUNBUFFERED)."""
    logger, _, _ = console_logger
    terminal = InterruptingTerminal(logger)
    handler = logger.handlers[0]
    assert isinstance(handler, ConsoleHandler)
    handler.setStream(terminal)  # stdout and stderr are one terminal, as on a pty
    monkeypatch.setattr(sys, "stdout", terminal)
    common_cli.say("peer p1 serving at tcp://127.0.0.1:1; 'help' lists commands")
    wait_until(lambda: terminal.getvalue().count("\n") == 2, timeout=10, what="the log line")
    assert terminal.getvalue().splitlines() == [
        "peer p1 serving at tcp://127.0.0.1:1; 'help' lists commands",
        "WARNING registered",
    ]


def test_a_console_lock_left_taken_delays_a_log_line_but_never_stops_it(
    console_logger: tuple[logging.Logger, FakeTerminal, Console],
) -> None:
    """Ctrl-C between taking the console's lock and entering the `with` that releases it leaves
    the lock taken for good; the driver thread then logged nothing more and the peer's clean
    stop, which waits for that thread, hung (an interactive prompt ignoring Ctrl-C)."""
    logger, stream, console = console_logger
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with console._lock:
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(10)
        # Another thread logs, as the driver thread does: it must get through while the lock
        # stays taken (the holder lets go only at the end of the test).
        driver = threading.Thread(target=logger.warning, args=("still written",))
        driver.start()
        wait_until(lambda: not driver.is_alive(), timeout=10, what="the log line past the lock")
        assert stream.getvalue() == "WARNING still written\n"
    finally:
        release.set()
        holder.join(10)


# --------------------------------------------------------------------------------- the bar


@pytest.fixture
def slow_broker(process_swarm: Swarm) -> str:
    """A broker process capped at 2 MiB/s sharing slow.bin (4 MiB: about 2 s); its endpoint."""
    write_random(process_swarm.share_dir / "slow.bin", 4 * MiB, seed=21)
    return process_swarm.start_broker(upload_limit_mib_s=2).tracker


def test_one_shot_get_on_a_terminal_shows_bytes_rate_and_time_left(
    tmp_path: Path, slow_broker: str, processes: list[Stoppable]
) -> None:
    config = write_yaml(tmp_path / "p.yaml", {"name": "p1", "broker": slow_broker, "data_dir": "p1"})
    get = PtyCli([sys.executable, "-m", "peer", "-c", str(config), "get", "slow.bin"], label="get on a tty")
    processes.append(get)
    assert get.finish(60) == 0
    bar = [line for line in get.screen.lines if line.startswith("slow.bin:") and "%|" in line]
    assert bar, get.raw
    assert re.search(r"slow\.bin: 100%\|.*\| 4\.0/4\.0 MiB \[\d\d:\d\d<\d\d:\d\d, +[\d.]+MiB/s\]", bar[-1])
    running = re.findall(
        r"slow\.bin: +(\d+)%\|.*?\| \d\.\d/4\.0 MiB \[\d\d:\d\d<\d\d:\d\d, +[\d.]+MiB/s\]", get.raw
    )
    assert any(int(percent) < 100 for percent in running), get.raw  # while running: rate, time left
    assert get.screen.lines[-1].startswith("slow.bin: 4194304 bytes in ")
    # Log lines never share a line with the bar.
    assert all(not (LOG_LINE.match(line) and "%|" in line) for line in get.screen.lines)


def test_one_shot_get_on_a_pipe_prints_no_bar(tmp_path: Path, slow_broker: str) -> None:
    config = write_yaml(tmp_path / "p.yaml", {"name": "p1", "broker": slow_broker, "data_dir": "p1"})
    run = subprocess.run(
        [sys.executable, "-m", "peer", "-c", str(config), "get", "slow.bin"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0
    assert "%|" not in run.stderr and "\r" not in run.stderr and "MiB/s" not in run.stderr
    assert all(LOG_LINE.match(line) for line in run.stderr.splitlines())
    assert run.stdout.startswith("slow.bin: 4194304 bytes in ")


# --------------------------------------------------------------------------------- exit status


def test_stop_event_exit_status() -> None:
    stop = StopEvent()
    assert stop.exit_status() == 0
    stop.signum = signal.SIGINT
    assert stop.exit_status() == EXIT_INTERRUPTED == 130
    stop.signum = signal.SIGTERM
    assert stop.exit_status() == 0


def _partial_started(data_dir: Path) -> bool:
    return any((data_dir / ".zswarm" / "partial").glob("*.part"))


# (mode, signal, exit status): Ctrl-C is 130 everywhere; SIGTERM is a clean stop (0), except for a
# one-shot get, whose file is not there (1).
CASES = [
    ("broker", signal.SIGINT, 130),
    ("broker", signal.SIGTERM, 0),
    ("serve", signal.SIGINT, 130),
    ("serve", signal.SIGTERM, 0),
    ("prompt", signal.SIGINT, 130),
    ("prompt", signal.SIGTERM, 0),
    ("get", signal.SIGINT, 130),
    ("get", signal.SIGTERM, 1),
]


@pytest.mark.parametrize(("mode", "signum", "status"), CASES, ids=[f"{m}-{s.name}" for m, s, _ in CASES])
def test_one_exit_status_rule_for_signals(
    tmp_path: Path,
    process_swarm: Swarm,
    processes: list[Stoppable],
    mode: str,
    signum: signal.Signals,
    status: int,
) -> None:
    if mode == "broker":
        (tmp_path / "share").mkdir()
        config = write_yaml(
            tmp_path / "b.yaml",
            {
                "share_dir": "share",
                "manifest_dir": "m",
                "tracker_port": 0,
                "heartbeat_port": 0,
                "origin_port": 0,
            },
        )
        child = Cli(["-m", "broker", "-c", str(config)], label="broker")
        processes.append(child)
        child.ready()
    else:
        write_random(process_swarm.share_dir / "slow.bin", 8 * MiB, seed=22)
        broker = process_swarm.start_broker(upload_limit_mib_s=1)
        config = write_yaml(tmp_path / "p.yaml", {"name": "p1", "broker": broker.tracker, "data_dir": "p1"})
        args = {"serve": ["serve"], "prompt": [], "get": ["get", "slow.bin"]}[mode]
        child = Cli(["-m", "peer", "-c", str(config), *args], label=mode)
        processes.append(child)
        if mode == "get":
            wait_until(lambda: _partial_started(tmp_path / "p1"), timeout=20, what="the download to start")
        else:
            child.ready()
        wait_until(lambda: "p1" in broker.stats()["live_peers"], timeout=20, what="p1 registered")
    child.signal(signum)
    assert child.finish(15) == status
    assert not any("Traceback" in line for line in child.err), child.err
    if mode != "broker":
        assert "p1" not in broker.stats()["live_peers"]  # it said bye on the way out
    if mode == "get" and signum == signal.SIGTERM:
        assert child.err[-1] == "error: slow.bin: stopped by SIGTERM before it finished"
    if mode == "broker":
        assert child.out[-1] == '{"event": "stopped"}'


def test_ctrl_c_at_an_interactive_prompt_exits_130(
    tmp_path: Path, process_swarm: Swarm, processes: list[Stoppable]
) -> None:
    broker = process_swarm.start_broker()
    config = write_yaml(tmp_path / "p.yaml", {"name": "p1", "broker": broker.tracker, "data_dir": "p1"})
    prompt = PtyCli([sys.executable, "-m", "peer", "-c", str(config)], label="prompt on a tty")
    processes.append(prompt)
    prompt.wait_for(lambda screen: screen.current == "zswarm> ", what="the prompt")
    wait_until(lambda: "p1" in broker.stats()["live_peers"], timeout=20, what="p1 registered")
    prompt.type_line("remote")
    prompt.wait_for(lambda s: "(no files)" in s.lines and s.current == "zswarm> ", what="an answer")
    prompt.signal(signal.SIGINT)  # what Ctrl-C sends
    assert prompt.finish(15) == 130
    assert "Traceback" not in prompt.raw
    assert "p1" not in broker.stats()["live_peers"]
