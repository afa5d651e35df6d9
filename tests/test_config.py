"""Bad configs stop the CLIs with exit status 2 and one line naming the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from broker import BrokerConfig
from common.errors import ConfigError
from peer import PeerConfig

pytestmark = pytest.mark.timeout(60)


def run_cli(module: str, config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, "-c", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        ("broker", "share_dir: s\nmanifest_dir: m\nbogus: 1\n", "bogus: unknown key"),
        ("broker", "share_dir: s\nmanifest_dir: m\ntracker_port: abc\n", "tracker_port: "),
        ("broker", "share_dir: s\nmanifest_dir: m\ntracker_port: 70000\n", "tracker_port: "),
        ("broker", "manifest_dir: m\n", "share_dir: required key is missing"),
        ("broker", "share_dir: [unclosed\n", "invalid YAML"),
        ("broker", "- a list\n", "mapping"),
        ("peer", "name: p1\nbroker: tcp://127.0.0.1:1\n", "data_dir: required key is missing"),
        ("peer", "name: 'bad name'\nbroker: tcp://127.0.0.1:1\ndata_dir: d\n", "name: "),
        ("peer", "name: p1\nbroker: localhost:5555\ndata_dir: d\n", "broker: "),
        (
            "peer",
            "name: p1\nbroker: tcp://127.0.0.1:1\ndata_dir: d\nlanes_per_source: 0\n",
            "lanes_per_source: ",
        ),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path: Path, module: str, text: str, expected: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    done = run_cli(module, config)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(config) in lines[0] and expected in lines[0]


@pytest.mark.parametrize("module", ["broker", "peer"])
def test_missing_config_file(tmp_path: Path, module: str) -> None:
    done = run_cli(module, tmp_path / "nope.yaml")
    assert done.returncode == 2
    assert "nope.yaml" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_share_dir_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        "share_dir: not-there\nmanifest_dir: m\ntracker_port: 0\nheartbeat_port: 0\norigin_port: 0\n"
    )
    done = run_cli("broker", config)
    assert done.returncode == 2
    assert "not-there" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "p.yaml").write_text("name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: ../data\n")
    config = PeerConfig.from_yaml(folder / "p.yaml")
    assert Path(config.data_dir) == (tmp_path / "data").resolve()


def test_python_api_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="heartbeat_liveness"):
        BrokerConfig.validated({"share_dir": "s", "manifest_dir": "m", "heartbeat_liveness": 0})
