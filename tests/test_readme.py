"""The README's quick start, run as written, in a clean copy of the repository.

The repository's files (those git tracks, plus new ones it does not ignore: what a fresh clone
would hold) are copied into a temporary folder named `zswarm`; `demo-run/` and `.venv/` are not,
as on a fresh clone. Then, in that folder:

1. The `sh` block of the quick start: its first line installs (`python3 -m venv .venv &&
   .venv/bin/pip install -e .`). That needs the package index, so by default it is replaced by
   what it leaves behind, made offline: a venv of this interpreter, the copy on its path, this
   venv's packages for the dependencies, and the console scripts of pyproject.toml. With
   ZSWARM_README_INSTALL=1 the line itself runs. Every other line runs verbatim in bash.
2. The three `console` blocks, each in a terminal of its own (a pseudo-terminal): the broker, a
   peer's prompt (the `zswarm> X` lines are typed), and, while that prompt is open, the one-shot
   get. What each terminal shows must be what the README shows: the same lines other than log
   lines, in the same order, and each log line the README shows among those logged. Times, ports
   and the repository's path may differ (`/home/you/zswarm` in the README).
3. `quit` at the prompt (exit status 0) and Ctrl-C to the broker (130), as the README says.
4. The config examples of "Configs": the bad file written where the README says, the command
   run, the output as shown (exit status 2); the port-in-use example while the broker runs.
5. The Python API example, written to `example.py` and run with `.venv/bin/python`: its output
   must be the `text` block that follows it, and nothing on stderr.

The bundled configs use the fixed ports 5555 to 5557; if something else holds them when this
runs, the copy's configs are moved to free ports (nothing else changes). Every process is
stopped by its PID, every wait has a deadline. The config tables are checked against the
config classes too: every field, with its default.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import BrokerConfig
from peer.config import PeerConfig
from tests.cli_procs import PtyCli, Screen, write_yaml
from tests.conftest import Stoppable

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOME = "/home/you/zswarm"  # where the README pretends the clone is
PROMPT = "zswarm> "
INSTALL = "python3 -m venv .venv && .venv/bin/pip install -e ."
BAR = re.compile(r"\d+%\|")


# --------------------------------------------------------------------------------- the README


@dataclass
class Block:
    lang: str
    lines: list[str]


@dataclass
class Session:
    """A console block: the command after `$ `, the lines shown, and what is typed at a prompt."""

    command: str
    shown: list[str]
    typed: list[str] = field(default_factory=list)


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def blocks(text: str) -> list[Block]:
    return [
        Block(m.group(1), m.group(2).splitlines()) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)
    ]


def session(block: Block) -> Session:
    assert block.lang == "console" and block.lines[0].startswith("$ "), block
    shown = block.lines[1:]
    typed = [line[len(PROMPT) :] for line in shown if line.startswith(PROMPT) and line != PROMPT.rstrip()]
    return Session(block.lines[0][2:], shown, typed)


def normalize(line: str, clone: Path) -> str:
    line = line.replace(str(clone), HOME)
    line = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "<time> ", line)
    line = re.sub(r"\b\d+\.\d+ s\b", "<t> s", line)
    line = re.sub(r"tcp://127\.0\.0\.1:\d+", "tcp://127.0.0.1:<port>", line)
    line = re.sub(r"port \d+ on", "port <n> on", line)
    return line.rstrip()


def is_log(line: str) -> bool:
    """A log line, once normalized."""
    return bool(re.match(r"<time> (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line))


def compare(session: Session, screen_lines: list[str], clone: Path) -> None:
    """Non-log lines equal and in order (progress bars aside); shown log lines among those logged."""
    actual = [normalize(line, clone) for line in screen_lines if not BAR.search(line)]
    shown = [normalize(line, clone) for line in session.shown]
    assert [line for line in shown if not is_log(line)] == [line for line in actual if not is_log(line)], (
        f"$ {session.command}: the terminal shows other lines than the README"
    )
    logged = {line for line in actual if is_log(line)}
    missing = [line for line in shown if is_log(line) and line not in logged]
    assert not missing, f"$ {session.command}: the README shows log lines never logged: {missing} ({logged})"


# --------------------------------------------------------------------------------- a clean clone


def repository_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def make_clone(folder: Path) -> Path:
    for name in repository_files():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    assert not (folder / "demo-run").exists() and not (folder / ".venv").exists()
    return folder


def install_offline(clone: Path) -> None:
    """What `python3 -m venv .venv && .venv/bin/pip install -e .` leaves, without the index."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", ".venv"], cwd=clone, check=True, timeout=120
    )
    venv = clone / ".venv"
    [site] = list(venv.glob("lib/python*/site-packages"))
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site / "zswarm-readme-test.pth").write_text("\n".join([str(clone), *ours]) + "\n")
    scripts = tomllib.loads((clone / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, function = target.split(":")
        script = venv / "bin" / name
        python = venv / "bin" / "python"
        body = f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n"
        script.write_text(f"#!{python}\n{body}")
        script.chmod(0o755)


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def move_ports_if_taken(clone: Path) -> None:
    configs = clone / "configs"
    broker = yaml.safe_load((configs / "broker.yaml").read_text())
    keys = ("tracker_port", "heartbeat_port", "origin_port")
    if all(port_free(broker[k]) for k in keys):
        return
    broker.update({k: free_port() for k in keys})
    write_yaml(configs / "broker.yaml", broker)
    for path in configs.glob("peer*.yaml"):
        fields = yaml.safe_load(path.read_text())
        fields["broker"] = f"tcp://127.0.0.1:{broker['tracker_port']}"
        write_yaml(path, fields)


@pytest.fixture
def clone(tmp_path: Path) -> Iterator[Path]:
    folder = make_clone(tmp_path / "zswarm")
    yield folder


# --------------------------------------------------------------------------------- the test


def bash(command: str, cwd: Path, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def terminal(clone: Path, command: str, processes: list[Stoppable]) -> PtyCli:
    term = PtyCli(["bash", "-c", f"exec {command}"], cwd=clone, label=command)
    processes.append(term)
    return term


def answered(typed: str, screen: Screen) -> Callable[[Screen], bool]:
    """True once `typed` was echoed one more time than now and the prompt waits again."""
    echoed = screen.lines.count(PROMPT + typed)

    def done(s: Screen) -> bool:
        return s.lines.count(PROMPT + typed) > echoed and s.current == PROMPT

    return done


def lines_of(screen: Screen) -> list[str]:
    return [*screen.lines, screen.current.rstrip()] if screen.current.strip() else list(screen.lines)


def test_the_quick_start_works_as_written(clone: Path, processes: list[Stoppable]) -> None:
    text = README.read_text()
    quick = blocks(section(text, "Quick start"))
    setup, broker_block, prompt_block, get_block = quick
    assert setup.lang == "sh" and setup.lines[0] == INSTALL, "the install line changed: update this test"

    # 1. install, then the other setup lines verbatim
    if os.environ.get("ZSWARM_README_INSTALL") == "1":
        run = bash(INSTALL, clone)
        assert run.returncode == 0, run.stderr
    else:
        install_offline(clone)
    move_ports_if_taken(clone)
    for line in setup.lines[1:]:
        run = bash(line, clone, 60)
        assert run.returncode == 0, f"{line}: {run.stderr}"

    # 2. terminal 1: the broker
    broker_session = session(broker_block)
    broker = terminal(clone, broker_session.command, processes)
    broker.wait_for(lambda s: any(line.startswith('{"event": "ready"') for line in s.lines), 60, "ready")
    compare(broker_session, lines_of(broker.screen), clone)

    # terminal 2: the prompt, each typed line once the prompt waits
    prompt_session = session(prompt_block)
    assert prompt_session.typed == ["remote", "get hello.txt"] and prompt_session.shown[-1] == PROMPT.rstrip()
    prompt = terminal(clone, prompt_session.command, processes)
    prompt.wait_for(lambda s: s.current == PROMPT, 60, "the prompt")
    prompt.wait_for(lambda s: any("registered with the broker" in line for line in s.lines), 30, "registered")
    for typed in prompt_session.typed:
        done = answered(typed, prompt.screen)  # counted before typing
        prompt.type_line(typed)
        prompt.wait_for(done, 60, f"the answer to {typed}")

    # terminal 3, while the prompt is open: the one-shot get, from peer1
    get_session = session(get_block)
    one_shot = terminal(clone, get_session.command, processes)
    assert one_shot.finish(60) == 0
    compare(get_session, lines_of(one_shot.screen), clone)
    compare(prompt_session, lines_of(prompt.screen), clone)

    # 4. the config examples of "Configs", while the broker runs
    configs = blocks(section(text, "Configs"))
    example_yaml, typo, port_taken = configs[0], session(configs[1]), session(configs[2])
    assert example_yaml.lang == "yaml"
    bad_path = typo.command.split(" -c ")[1]
    (clone / bad_path).write_text("\n".join(example_yaml.lines) + "\n")
    for example in (typo, port_taken):
        term = terminal(clone, example.command, processes)
        assert term.finish(60) == 2
        compare(example, lines_of(term.screen), clone)

    # 3. quit at the prompt, Ctrl-C to the broker
    prompt.type_line("quit")
    assert prompt.finish(30) == 0
    broker.signal(signal.SIGINT)
    assert broker.finish(30) == 130


def test_the_python_api_example_runs_as_written(clone: Path) -> None:
    api = section(README.read_text(), "Python API")
    code, output = [b for b in blocks(api) if b.lang in ("python", "text")][:2]
    assert (code.lang, output.lang) == ("python", "text")
    install_offline(clone)
    (clone / "example.py").write_text("\n".join(code.lines) + "\n")
    run = subprocess.run(
        [str(clone / ".venv" / "bin" / "python"), "example.py"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (run.returncode, run.stderr) == (0, "")
    assert run.stdout.splitlines() == output.lines


# --------------------------------------------------------------------------------- the config tables


def table(text: str, title: str) -> dict[str, str]:
    """key -> default of the README's table under `### title`."""
    part = text[text.index(f"### {title}") :]
    part = part[: part.index("\n\n", part.index("| key |"))]
    rows = [line.split("|")[1:3] for line in part.splitlines() if line.startswith("| `")]
    return {key.strip().strip("`"): default.strip() for key, default in rows}


def shown_default(value: Any) -> str | None:
    if value is None:
        return None  # described in words ("bind host")
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"{value // (1024 * 1024)} MiB"
    return str(value)


@pytest.mark.parametrize(("title", "model"), [("Broker", BrokerConfig), ("Peer", PeerConfig)])
def test_the_config_tables_list_every_field_with_its_default(title: str, model: Any) -> None:
    rows = table(README.read_text(), title)
    fields = model.model_fields
    assert sorted(rows) == sorted(fields), f"README {title} table vs {model.__name__}"
    for name, info in fields.items():
        expected = "required" if info.is_required() else shown_default(info.default)
        if expected is not None:
            assert rows[name] == expected, f"{name}: README says {rows[name]}, the default is {expected}"
