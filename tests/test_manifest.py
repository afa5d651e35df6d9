"""Unit tests for common/manifest.py: hashing real files, verification, consistency, names."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from blake3 import blake3

from common.manifest import (
    DIGEST_SIZE,
    SEGMENT_SIZE,
    Manifest,
    check_name,
    digest,
    hash_file,
    segment_count,
)

pytestmark = pytest.mark.timeout(30)

S = SEGMENT_SIZE
MIB = 1024 * 1024


def expected_digests(data: bytes) -> bytes:
    """Digests computed independently: blake3 over each 16 KiB slice, the last one shorter."""
    return b"".join(blake3(data[off : off + 16384]).digest() for off in range(0, len(data), 16384))


def write(tmp_path: Path, size: int, seed: int) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / f"f{size}.bin"
    path.write_bytes(data)
    return path, data


def make(data: bytes, name: str = "f.bin") -> Manifest:
    return Manifest(name=name, size=len(data), digests=expected_digests(data))


def test_constants() -> None:
    assert SEGMENT_SIZE == 16 * 1024
    assert DIGEST_SIZE == 32


@pytest.mark.parametrize(
    "size",
    [0, 1, S - 1, S, S + 1, 2 * S, MIB - 1, MIB, MIB + 1, 3 * MIB + 12345, 5 * MIB],
    ids=lambda n: f"{n}B",
)
def test_hash_file_matches_independent_digests(tmp_path: Path, size: int) -> None:
    path, data = write(tmp_path, size, seed=size)
    m = hash_file(path, "dir/name.bin")
    want = expected_digests(data)
    assert m.name == "dir/name.bin"
    assert m.size == size
    assert m.segment_size == S
    assert m.digests == want
    assert m.segment_count == (size + S - 1) // S == len(want) // 32
    assert m.file_id == blake3(want).digest()
    assert m.consistency_error() is None


def test_empty_file_has_no_segments(tmp_path: Path) -> None:
    path, _ = write(tmp_path, 0, seed=1)
    m = hash_file(path, "empty")
    assert m.digests == b""
    assert m.segment_count == 0
    assert m.file_id == blake3(b"").digest()
    assert m.verify_run(0, b"") == []


def test_file_id_depends_on_content_not_name(tmp_path: Path) -> None:
    path, data = write(tmp_path, 2 * S + 5, seed=3)
    a = hash_file(path, "a")
    b = hash_file(path, "b/c")
    assert a.file_id == b.file_id
    other = tmp_path / "other"
    other.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    c = hash_file(other, "a")
    assert c.file_id != a.file_id
    assert c.digests[:-32] == a.digests[:-32]
    assert c.digests[-32:] != a.digests[-32:]


def test_hash_file_accepts_str_path(tmp_path: Path) -> None:
    path, data = write(tmp_path, S + 1, seed=4)
    assert hash_file(str(path), "x").digests == expected_digests(data)


def test_segment_count_function() -> None:
    assert [segment_count(n) for n in (0, 1, S - 1, S, S + 1, 2 * S)] == [0, 1, 1, 1, 2, 2]
    assert segment_count(10, segment_size=3) == 4


def test_segment_lengths_and_offsets() -> None:
    data = random.Random(5).randbytes(3 * S + 100)
    m = make(data)
    assert m.segment_count == 4
    assert [m.segment_length(i) for i in range(4)] == [S, S, S, 100]
    assert m.run_length(0, 4) == len(data)
    assert m.run_length(1, 2) == 2 * S
    assert m.run_length(2, 2) == S + 100
    assert m.run_length(3, 1) == 100
    assert m.run_length(3, 50) == 100  # clipped at the end of the file
    exact = make(b"\x00" * (2 * S))
    assert exact.segment_length(1) == S
    assert exact.run_length(0, 2) == 2 * S


def test_digest_of() -> None:
    data = random.Random(6).randbytes(2 * S + 1)
    m = make(data)
    assert m.digest_of(0) == blake3(data[:S]).digest()
    assert m.digest_of(2) == blake3(data[2 * S :]).digest()
    assert digest(data[S : 2 * S]) == m.digest_of(1)


def test_verify_single_segments() -> None:
    data = random.Random(7).randbytes(2 * S + 10)
    m = make(data)
    segs = [data[0:S], data[S : 2 * S], data[2 * S :]]
    for i, seg in enumerate(segs):
        assert m.verify(i, seg)
        assert m.verify(i, memoryview(seg))
    assert not m.verify(0, segs[1])  # right length, wrong index
    corrupt = bytearray(segs[0])
    corrupt[1234] ^= 0x40
    assert not m.verify(0, bytes(corrupt))
    assert not m.verify(2, segs[2][:-1])  # short
    assert not m.verify(2, segs[2] + b"\x00")  # long
    assert not m.verify(0, b"")


def test_verify_run_all_good() -> None:
    data = random.Random(8).randbytes(5 * S + 77)
    m = make(data)
    assert m.verify_run(0, data) == [True] * 6
    assert m.verify_run(2, data[2 * S : 4 * S]) == [True, True]
    assert m.verify_run(4, memoryview(data)[4 * S :]) == [True, True]  # ends with the short segment
    assert m.verify_run(5, data[5 * S :]) == [True]


def test_verify_run_flags_only_the_corrupted_slice() -> None:
    data = random.Random(9).randbytes(6 * S + 3)
    m = make(data)
    for bad in range(7):
        corrupt = bytearray(data)
        corrupt[bad * S] ^= 0xFF  # first byte of segment `bad`
        flags = m.verify_run(0, bytes(corrupt))
        assert flags == [i != bad for i in range(7)]
    # a run starting mid-file, corrupt in its middle segment
    run = bytearray(data[S : 4 * S])
    run[S + 100] ^= 1
    assert m.verify_run(1, bytes(run)) == [True, False, True]


def test_verify_run_with_misaligned_or_excess_data() -> None:
    data = random.Random(10).randbytes(3 * S + 1)
    m = make(data)
    # the right bytes at the wrong starting index fail
    assert m.verify_run(1, data[:S]) == [False]
    # a run cut short: its last piece has the wrong length
    assert m.verify_run(0, data[: 2 * S - 1]) == [True, False]
    # more bytes than the file holds: the piece past the end fails
    assert m.verify_run(3, data[3 * S :] + b"x") == [False]
    assert m.verify_run(3, data[3 * S :] + b"x" * S) == [False, False]
    assert m.verify_run(2, data[2 * S :] + b"y" * S) == [True, False, False]
    assert m.verify_run(0, b"") == []


def test_manifest_computes_file_id_unless_given() -> None:
    data = random.Random(11).randbytes(S + 1)
    m = make(data)
    assert m.file_id == blake3(expected_digests(data)).digest()
    given = Manifest("f", len(data), expected_digests(data), file_id=b"\x01" * 32)
    assert given.file_id == b"\x01" * 32
    assert given.consistency_error() == "file_id does not match the digests"


def test_consistency_error_cases() -> None:
    data = random.Random(12).randbytes(2 * S + 1)
    d = expected_digests(data)
    assert Manifest("ok", len(data), d).consistency_error() is None
    assert Manifest("empty", 0, b"").consistency_error() is None
    assert "segment size" in (Manifest("f", len(data), d, segment_size=S * 2).consistency_error() or "")
    assert "whole number" in (Manifest("f", len(data), d + b"\x00").consistency_error() or "")
    assert "3 digests for" in (Manifest("f", 2 * S, d).consistency_error() or "")  # one too many
    assert "3 digests for" in (Manifest("f", 3 * S + 1, d).consistency_error() or "")  # one too few
    assert "digests for 0 bytes" in (Manifest("f", 0, d).consistency_error() or "")
    assert "1 digests for 0 bytes" in (Manifest("f", 0, d[:32]).consistency_error() or "")
    bad_id = Manifest("f", len(data), d, file_id=blake3(b"other").digest())
    assert bad_id.consistency_error() == "file_id does not match the digests"
    bad_name = Manifest("../escape", len(data), d).consistency_error()
    assert bad_name is not None
    assert bad_name.startswith("bad name:")
    assert Manifest("", len(data), d).consistency_error() == "bad name: empty name"


@pytest.mark.parametrize("size", [1, S - 1, S, S + 1, 10 * S])
def test_consistency_accepts_every_size_with_matching_digests(size: int) -> None:
    assert make(random.Random(size).randbytes(size)).consistency_error() is None


@pytest.mark.parametrize(
    "name",
    ["a", "a/b/c", "dir/file.bin", "x.zswarm", "a..b", "...", "space name", "日本語", "a" * 1024],
)
def test_check_name_accepts(name: str) -> None:
    assert check_name(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("/abs", "absolute"),
        ("../x", "component"),
        ("a/../b", "component"),
        ("a/..", "component"),
        ("./a", "component"),
        ("a//b", "component"),
        ("a/", "component"),
        ("a\\b", "backslash"),
        ("a\x00b", "control"),
        ("a\nb", "control"),
        ("a\x1f", "control"),
        ("\tb", "control"),
        (".zswarm", "reserved"),
        ("d/.zswarm-part", "reserved"),
        ("a" * 1025, "longer"),
        ("é" * 513, "longer"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_check_name_rejects(name: str, why: str) -> None:
    problem = check_name(name)
    assert problem is not None
    assert why in problem
