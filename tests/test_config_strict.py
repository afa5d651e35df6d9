"""Strict config loading: every problem of a file at once, each on one line with file:line:column and key.

In-process through `from_yaml` (fast); two tests run a CLI to see what a user sees.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker import BrokerConfig
from common.config import ConfigModel
from common.errors import ConfigError
from peer import PeerConfig

pytestmark = pytest.mark.timeout(60)

PEER = "name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: d\n"
BROKER = "share_dir: s\nmanifest_dir: m\n"
LEVELS = "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"


def problems(model: type[ConfigModel], path: Path, text: str | bytes) -> list[str]:
    """The lines of the ConfigError that loading `text` from `path` raises."""
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    with pytest.raises(ConfigError) as info:
        model.from_yaml(path)
    return str(info.value).splitlines()


def one_problem(model: type[ConfigModel], path: Path, text: str | bytes) -> str:
    lines = problems(model, path, text)
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------------------------- 1. encoding


def test_not_utf8_is_one_clear_line(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, b"name: p1\nbro\xffker: tcp://127.0.0.1:1\n")
    assert line == f"{x}:2:4: not UTF-8 text (byte 0xff at offset 12)"


def test_utf16_file_is_not_utf8(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, PEER.encode("utf-16"))
    assert line.startswith(f"{x}:1:1: not UTF-8 text (byte 0xff at offset 0)")


def test_utf8_bom_is_fine(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    x.write_bytes(b"\xef\xbb\xbf" + PEER.encode())
    assert PeerConfig.from_yaml(x).name == "p1"


def test_control_character_is_one_line(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, "name: p1\nbroker: tcp://x:1\x00\n")
    assert line == f"{x}:2:18: character #x0000 is not allowed in YAML"


def test_not_utf8_through_the_cli(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    x.write_bytes(b"name: p\xe9\n")
    done = subprocess.run(
        [sys.executable, "-m", "peer", "-c", str(x)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {x}:1:8: not UTF-8 text (byte 0xe9 at offset 7)\n"


# ----------------------------------------------------------------------------------- 2. duplicates


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    text = "name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: d\n\n# later\nserve_port: 0\ndata_dir: e\n"
    assert one_problem(PeerConfig, x, text) == f"{x}:7:1: duplicate key 'data_dir' (first at line 3)"


def test_duplicate_quoted_and_plain_key(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, PEER + '"name": p2\n')
    assert line == f"{x}:4:1: duplicate key 'name' (first at line 1)"


# -------------------------------------------------------------------------------- 3. YAML 1.1 traps


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("serve_port", "0777", "octal in YAML 1.1"),
        ("serve_port", "-0777", "octal in YAML 1.1"),
        ("serve_port", "00", "octal in YAML 1.1"),
        ("serve_port", "0x1F", "decimal (31)"),
        ("serve_port", "0o17", "decimal (15)"),
        ("serve_port", "0b101", "decimal (5)"),
        ("serve_port", "1_000", "write 1000"),
        ("serve_port", "1:30", "base-60"),
        ("request_timeout_s", "1:30:00", "base-60"),
        ("request_timeout_s", ".inf", "finite"),
        ("request_timeout_s", "-.Inf", "finite"),
        ("request_timeout_s", ".nan", "finite"),
        ("request_timeout_s", ".NaN", "finite"),
        ("request_timeout_s", "1e999", "too large"),
        ("request_timeout_s", "1_0.5", "write 10.5"),
        ("advertise_host", "yes", "boolean in YAML 1.1"),
        ("advertise_host", "No", "boolean in YAML 1.1"),
        ("advertise_host", "on", "boolean in YAML 1.1"),
        ("advertise_host", "OFF", "boolean in YAML 1.1"),
        ("advertise_host", "y", "boolean in YAML 1.1"),
        ("advertise_host", "n", "boolean in YAML 1.1"),
    ],
)
def test_yaml11_surprises_are_errors(tmp_path: Path, key: str, value: str, expected: str) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, PEER + f"{key}: {value}\n")
    column = len(key) + 3
    assert line.startswith(f"{x}:4:{column}: {key}: {value}")
    assert expected in line
    assert f"quote it ('{value}')" in line or "finite" in line or "too large" in line


@pytest.mark.parametrize("value", ["'0777'", '"yes"', "'1:30'", "'.inf'", "|\n  on", "'true'", "'123'"])
def test_quoted_scalars_are_strings(tmp_path: Path, value: str) -> None:
    x = tmp_path / "x.yaml"
    x.write_text(PEER + f"advertise_host: {value}\n")
    host = PeerConfig.from_yaml(x).advertise_host
    assert isinstance(host, str) and host.strip() in value


@pytest.mark.parametrize(
    ("text", "field", "expected"),
    [
        ("request_timeout_s: 1e1\n", "request_timeout_s", 10.0),
        ("request_timeout_s: .5\n", "request_timeout_s", 0.5),
        ("request_timeout_s: +3\n", "request_timeout_s", 3.0),
        ("serve_port: +80\n", "serve_port", 80),
        ("serve_port: 0\n", "serve_port", 0),
        ("advertise_host: ~\n", "advertise_host", None),
        ("advertise_host: null\n", "advertise_host", None),
        ("advertise_host:\n", "advertise_host", None),
        ("advertise_host: 10.0.0.1\n", "advertise_host", "10.0.0.1"),
        ("advertise_host: ::1\n", "advertise_host", "::1"),
        ("advertise_host: 2001-01-01\n", "advertise_host", "2001-01-01"),
    ],
)
def test_core_schema_values(tmp_path: Path, text: str, field: str, expected: Any) -> None:
    x = tmp_path / "x.yaml"
    x.write_text(PEER + text)
    value = getattr(PeerConfig.from_yaml(x), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("serve_port: &p 1\nbatch_segments: *p\n", ["4:13: anchors (&p)", "5:17: aliases (*p)"]),
        ("serve_port: !!int 5\n", ["4:13: serve_port: tags (!!int)"]),
        ("advertise_host: !!str 5\n", ["4:17: advertise_host: tags (!!str)"]),
        ("advertise_host: !custom x\n", ["4:17: advertise_host: tags (!custom)"]),
        ("<<: {serve_port: 1}\n", ["4:1: merge keys (<<)"]),
        ("[a]: 1\n", ["4:1: a key must be a name, not a list"]),
    ],
)
def test_anchors_aliases_tags_merge_keys_are_refused(tmp_path: Path, text: str, expected: list[str]) -> None:
    x = tmp_path / "x.yaml"
    lines = problems(PeerConfig, x, PEER + text)
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert line.startswith(f"{x}:{want}"), line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("share_dir: [unclosed\n", "2:1: invalid YAML: expected ',' or ']'"),
        ("a: b\n  c: d\n", "2:4: invalid YAML: mapping values are not allowed here"),
        ("share_dir: s\n---\nmanifest_dir: m\n", "2:1: invalid YAML:"),
        ("- a list\n", "1:1: expected a mapping of keys to values at the top level"),
        ("just text\n", "1:1: expected a mapping"),
    ],
)
def test_syntax_errors_have_a_place(tmp_path: Path, text: str, expected: str) -> None:
    x = tmp_path / "x.yaml"
    assert one_problem(BrokerConfig, x, text).startswith(f"{x}:{expected}")


def test_empty_file_reports_the_required_keys(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    assert problems(BrokerConfig, x, "# nothing\n") == [
        f"{x}: share_dir: required key is missing",
        f"{x}: manifest_dir: required key is missing",
    ]


# -------------------------------------------------------------------------------- 4. strict types


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tracker_port: true\n", "3:15: tracker_port: expected an integer (got true)"),
        ("tracker_port: '5555'\n", "3:15: tracker_port: expected an integer (got the text '5555')"),
        ("tracker_port: 5555.0\n", "3:15: tracker_port: expected an integer (got 5555.0)"),
        ("heartbeat_interval_s: '1'\n", "3:23: heartbeat_interval_s: expected a number (got the text '1')"),
        ("heartbeat_interval_s: false\n", "3:23: heartbeat_interval_s: expected a number (got false)"),
        ("bind_host: 5\n", "3:12: bind_host: expected a string (got 5: quote it if it is meant as text)"),
        ("bind_host: true\n", "3:12: bind_host: expected a string (got true: quote it"),
        ("bind_host: [a]\n", "3:12: bind_host: expected a string (got a list)"),
        ("log_level:\n", f"3:11: log_level: must be {LEVELS} (got null)"),
    ],
)
def test_strict_types(tmp_path: Path, text: str, expected: str) -> None:
    x = tmp_path / "x.yaml"
    assert one_problem(BrokerConfig, x, BROKER + text).startswith(f"{x}:{expected}")


def test_ints_are_accepted_for_floats(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    x.write_text(BROKER + "heartbeat_interval_s: 1\nbench_s: 0\n")
    config = BrokerConfig.from_yaml(x)
    assert config.heartbeat_interval_s == 1.0 and config.bench_s == 0.0


def test_direct_construction_is_strict_but_takes_numbers(tmp_path: Path) -> None:
    fields: dict[str, Any] = dict(share_dir=str(tmp_path / "s"), manifest_dir=str(tmp_path / "m"))
    config = BrokerConfig(**fields, tracker_port=0, heartbeat_port=0, origin_port=0, heartbeat_interval_s=1)
    assert config.tracker_port == 0 and config.heartbeat_interval_s == 1.0
    for bad in ({"tracker_port": True}, {"tracker_port": "0"}, {"heartbeat_interval_s": math.nan}):
        with pytest.raises(ValidationError):
            BrokerConfig(**fields, **bad)


def test_validated_refuses_infinity() -> None:
    with pytest.raises(ConfigError) as info:
        BrokerConfig.validated({"share_dir": "s", "manifest_dir": "m", "bench_s": math.inf})
    assert str(info.value) == "config: bench_s: must be a finite number (got inf)"


# --------------------------------------------------------------------------------------- 5. bounds

BROKER_BOUNDS = {
    "tracker_port": (0, 65535),
    "heartbeat_port": (0, 65535),
    "origin_port": (0, 65535),
    "heartbeat_interval_s": (0.01, 3600.0),
    "heartbeat_liveness": (1, 100),
    "plan_block_segments": (1, 1024),
    "origin_lanes": (1, 64),
    "relay_fanout": (1, 64),
    "slow_relay_factor": (0.0, 100.0),
    "download_idle_s": (None, 86400.0),
    "strike_limit": (1, 1000),
    "bench_s": (0.0, 86400.0),
    "upload_limit_mib_s": (0.0, 1_000_000.0),
    "max_request_bytes": (4096, 64 * 1024 * 1024),
}
PEER_BOUNDS = {
    "serve_port": (0, 65535),
    "batch_segments": (1, 1024),
    "lanes_per_source": (1, 32),
    "request_timeout_s": (None, 600.0),
    "broker_timeout_s": (None, 600.0),
    "have_flush_interval_s": (0.0, 60.0),
    "replan_interval_s": (None, 600.0),
    "upload_limit_mib_s": (0.0, 1_000_000.0),
}


@pytest.mark.parametrize(
    ("model", "text", "key", "low", "high"),
    [(BrokerConfig, BROKER, k, lo, hi) for k, (lo, hi) in BROKER_BOUNDS.items()]
    + [(PeerConfig, PEER, k, lo, hi) for k, (lo, hi) in PEER_BOUNDS.items()],
)
def test_every_number_is_bounded(
    tmp_path: Path, model: type[ConfigModel], text: str, key: str, low: float | None, high: float
) -> None:
    x = tmp_path / "x.yaml"
    for ok in (high,) if low is None else (low, high):
        x.write_text(text + f"{key}: {ok!r}\n")
        assert getattr(model.from_yaml(x), key) == ok
    too_big = high * 2 if isinstance(high, float) else high + 1
    line = one_problem(model, x, text + f"{key}: {too_big!r}\n")
    assert line.startswith(f"{x}:") and f"{key}: must be at most" in line
    too_small = -1 if low is None or isinstance(low, int) else low - 0.001
    if low is None:
        too_small = 0  # a strict lower bound: greater than 0
    line = one_problem(model, x, text + f"{key}: {too_small!r}\n")
    assert f"{key}: must be " in line


def test_max_request_bytes_of_1e11_is_refused(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(BrokerConfig, x, BROKER + "max_request_bytes: 100000000000\n")
    assert line == f"{x}:3:20: max_request_bytes: must be at most 67108864 (got 100000000000)"


def test_defaults_are_unchanged(tmp_path: Path) -> None:
    broker = BrokerConfig(share_dir=str(tmp_path / "s"), manifest_dir=str(tmp_path / "m"))
    assert broker.model_dump(exclude={"share_dir", "manifest_dir"}) == {
        "bind_host": "127.0.0.1",
        "advertise_host": None,
        "tracker_port": 5555,
        "heartbeat_port": 5556,
        "origin_port": 5557,
        "heartbeat_interval_s": 1.0,
        "heartbeat_liveness": 3,
        "plan_policy": "swarm",
        "plan_block_segments": 64,
        "origin_lanes": 2,
        "relay_fanout": 4,
        "slow_relay_factor": 3.0,
        "download_idle_s": 2.0,
        "strike_limit": 3,
        "bench_s": 30.0,
        "upload_limit_mib_s": 0.0,
        "max_request_bytes": 16 * 1024 * 1024,
        "rescan_interval_s": 2.0,
        "secret_key_file": None,
        "allow_dir": None,
        "log_level": "INFO",
    }
    peer = PeerConfig(name="p1", broker="tcp://127.0.0.1:5555", data_dir=str(tmp_path / "d"))
    assert peer.model_dump(exclude={"name", "broker", "data_dir"}) == {
        "bind_host": "127.0.0.1",
        "advertise_host": None,
        "serve_port": 0,
        "batch_segments": 64,
        "lanes_per_source": 2,
        "request_timeout_s": 2.0,
        "broker_timeout_s": 5.0,
        "have_flush_interval_s": 0.1,
        "replan_interval_s": 1.0,
        "upload_limit_mib_s": 0.0,
        "secret_key_file": None,
        "broker_public_key_file": None,
        "allow_dir": None,
        "log_level": "INFO",
    }


# ------------------------------------------------------------------------------------ 6. log_level


def test_log_level_must_be_a_level(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, PEER + "log_level: LOUD\n")
    assert line == f"{x}:4:12: log_level: must be {LEVELS} (got the text 'LOUD')"


@pytest.mark.parametrize("written", ["debug", "Warning", "ERROR", "critical"])
def test_log_level_any_case_stored_upper(tmp_path: Path, written: str) -> None:
    x = tmp_path / "x.yaml"
    x.write_text(PEER + f"log_level: {written}\n")
    assert PeerConfig.from_yaml(x).log_level == written.upper()


# ------------------------------------------------------------------- 7. unknown and missing together


def test_unknown_key_suggests_and_missing_key_is_reported_too(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    assert problems(PeerConfig, x, "name: p1\nbrokr: tcp://127.0.0.1:5555\ndata_dir: d\n") == [
        f"{x}:2:1: brokr: unknown key (did you mean 'broker'?)",
        f"{x}: broker: required key is missing",
    ]


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    assert one_problem(PeerConfig, x, PEER + "colour: blue\n") == f"{x}:4:1: colour: unknown key"


def test_unknown_key_suggestion_ignores_case_and_dashes(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(BrokerConfig, x, BROKER + "Heartbeat-Interval-S: 2\n")
    assert line == f"{x}:3:1: Heartbeat-Interval-S: unknown key (did you mean 'heartbeat_interval_s'?)"


def test_all_problems_at_once_in_file_order(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    text = (
        "log_level: LOUD\n"  # 1
        "brokr: tcp://127.0.0.1:5555\n"  # 2
        "serve_port: 0777\n"  # 3
        "lanes_per_source: 0\n"  # 4
        "data_dir: d\n"  # 5
        "request_timeout_s: yes\n"  # 6
        "data_dir: e\n"  # 7
    )
    lines = problems(PeerConfig, x, text)
    assert [line.split(": ", 1)[0] for line in lines] == [
        f"{x}:1:12",
        f"{x}:2:1",
        f"{x}:3:13",
        f"{x}:4:19",
        f"{x}:6:20",
        f"{x}:7:1",
        f"{x}",
        f"{x}",
    ]
    assert lines[-2:] == [f"{x}: name: required key is missing", f"{x}: broker: required key is missing"]


def test_many_problems_through_the_cli(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    x.write_text("share_dir: s\nmanifest_dir: m\ntracker_port: yes\nbogus: 1\nlog_level: LOUD\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "-c", str(x)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 3 and "Traceback" not in done.stderr
    assert lines[0].startswith(f"error: {x}:3:15: tracker_port: yes is a boolean in YAML 1.1")
    assert lines[1] == f"{x}:4:1: bogus: unknown key"
    assert lines[2].startswith(f"{x}:5:12: log_level: must be")


# ----------------------------------------------------------------------------------------- 8. paths


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    (tmp_path / "f").write_text("")
    text = "name: p1\nbroker: tcp://127.0.0.1:5555\nserve_port: 0\ndata_dir: f\n"
    assert (
        one_problem(PeerConfig, x, text) == f"{x}:4:11: data_dir: {tmp_path / 'f'} exists and is not a folder"
    )


def test_data_dir_under_a_file(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    (tmp_path / "f").write_text("")
    line = one_problem(PeerConfig, x, "name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: f/sub/d\n")
    assert (
        line
        == f"{x}:3:11: data_dir: {tmp_path / 'f/sub/d'} cannot be created: {tmp_path / 'f'} is not a folder"
    )


def test_dangling_symlink_is_not_a_folder(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    line = one_problem(PeerConfig, x, "name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: link\n")
    assert line.endswith("data_dir: " + str(tmp_path / "link") + " exists and is not a folder")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    line = one_problem(PeerConfig, x, "name: p1\nbroker: tcp://127.0.0.1:5555\ndata_dir: /proc/nope/d\n")
    assert line.startswith(f"{x}:3:11: data_dir: /proc/nope/d cannot be created: /proc ")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_broker_paths(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    (tmp_path / "f").write_text("")
    assert problems(BrokerConfig, x, "share_dir: f\nmanifest_dir: /proc/nope\n") == [
        f"{x}:1:12: share_dir: {tmp_path / 'f'} exists and is not a folder",
        f"{x}:2:15: manifest_dir: /proc/nope cannot be created: /proc does not accept new folders"
        if os.geteuid() == 0
        else f"{x}:2:15: manifest_dir: /proc/nope cannot be created: /proc is not writable",
    ]


def test_missing_share_dir_loads_but_check_share_dir_refuses(tmp_path: Path) -> None:
    x = tmp_path / "x.yaml"
    x.write_text("manifest_dir: m\nshare_dir: share\n")
    config = BrokerConfig.from_yaml(x)  # examples/demo.py creates the share after loading
    assert not (tmp_path / "m").exists() and not (tmp_path / "share").exists()  # nothing created
    with pytest.raises(ConfigError) as info:
        config.check_share_dir()
    assert str(info.value) == (
        f"{x}:2:12: share_dir: {tmp_path / 'share'} does not exist"
        " (the broker shares this folder, it does not create it)"
    )
    (tmp_path / "share").mkdir()
    config.check_share_dir()


def test_check_share_dir_in_code(tmp_path: Path) -> None:
    config = BrokerConfig(share_dir=str(tmp_path / "s"), manifest_dir=str(tmp_path / "m"))
    with pytest.raises(ConfigError, match=r"^share_dir: .* does not exist"):
        config.check_share_dir()


def test_existing_folders_are_fine(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    x = tmp_path / "x.yaml"
    x.write_text(PEER)
    assert PeerConfig.from_yaml(x).data_dir == str(tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.yaml"]  # no probe left behind


# ---------------------------------------------------------------------------- 9, 10. API, wording


def test_validated_reports_everything_without_places() -> None:
    with pytest.raises(ConfigError) as info:
        PeerConfig.validated({"name": "local", "broker": "localhost:1", "data_dir": "d", "lanes": 2}, "api")
    assert str(info.value).splitlines() == [
        "api: name: 'local' is reserved for the protocol",
        "api: broker: must be a tracker endpoint like tcp://127.0.0.1:5555 (got the text 'localhost:1')",
        "api: lanes: unknown key (did you mean 'lanes_per_source'?)",
    ]


INTERNALS = ("should", "pattern", "http", "[type=", "Value error", "validation error", "^[A-Za-z")


@pytest.mark.parametrize(
    "text",
    [
        "name: 'bad name'\nbroker: tcp://x:1\ndata_dir: d\n",
        "name: p1\nbroker: nope\ndata_dir: ''\nlanes_per_source: 0\nrequest_timeout_s: 0\n",
        "name: p1\nbroker: tcp://x:1\ndata_dir: d\nserve_port: 1.5\nupload_limit_mib_s: abc\nlog_level: 3\n",
        "name: [p1]\nbroker: {a: 1}\ndata_dir: 5\nadvertise_host: 7\n",
    ],
)
def test_no_pydantic_internals_in_messages(tmp_path: Path, text: str) -> None:
    lines = problems(PeerConfig, tmp_path / "x.yaml", text)
    assert len(lines) >= 1
    for line in lines:
        assert line.startswith(str(tmp_path / "x.yaml"))
        for internal in INTERNALS:
            assert internal not in line, line
