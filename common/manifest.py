"""Segments and manifests.

A file is cut into 16 KiB segments (the last one shorter, none for an empty file); each segment has
a 32-byte blake3 digest. A manifest holds the file's relative name, its size, the segment size and
the concatenated digests; its `file_id` is blake3 over the concatenated digests, so one content
version has one identity whatever its name. Segments are the unit of checksums and availability;
the wire moves runs of them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from blake3 import blake3

Run = tuple[int, int]  # (first, count), as in common.ranges

SEGMENT_SIZE = 16 * 1024
DIGEST_SIZE = 32
_READ_CHUNK = 64 * SEGMENT_SIZE  # 1 MiB reads when hashing whole files

_NAME_PART = re.compile(r"^[^\x00-\x1f/\\]+$")
# Bidirectional controls make a name display as another (file\u202eexe.txt shows as filetxt.exe).
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_NAME_BYTES = 1024


def digest(data: bytes | memoryview) -> bytes:
    return blake3(data).digest()


def segment_count(size: int, segment_size: int = SEGMENT_SIZE) -> int:
    return (size + segment_size - 1) // segment_size


def check_name(name: str) -> str | None:
    """Why `name` cannot be a shared file's relative name, or None when it can.

    Names come from the network and become paths under a peer's data folder, so anything that
    could step outside that folder (absolute paths, '..', backslashes, control bytes) is refused.
    """
    if not name:
        return "empty name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes in UTF-8"
    if name.startswith("/"):
        return "absolute paths are not allowed"
    if BIDI_CONTROLS.search(name):
        return "bidirectional control characters (such as U+202E) are not allowed"
    for part in name.split("/"):
        if part == "":
            return "empty path components ('a//b', a trailing '/') are not allowed"
        if part in (".", ".."):
            return f"{part!r} is not allowed as a path component"
        if not _NAME_PART.fullmatch(part):
            if "\\" in part:
                return "backslashes are not allowed (the separator is '/')"
            return "control characters are not allowed"
        if part.startswith(".zswarm"):
            return "names starting with '.zswarm' are reserved"
    return None


@dataclass(frozen=True, slots=True)
class Manifest:
    name: str
    size: int
    digests: bytes
    segment_size: int = SEGMENT_SIZE
    file_id: bytes = field(default=b"")

    def __post_init__(self) -> None:
        if not self.file_id:
            object.__setattr__(self, "file_id", digest(self.digests))

    @property
    def segment_count(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def segment_length(self, index: int) -> int:
        return min(self.segment_size, self.size - index * self.segment_size)

    def run_length(self, first: int, count: int) -> int:
        """Bytes in segments [first, first + count)."""
        end = min(self.size, (first + count) * self.segment_size)
        return end - first * self.segment_size

    def digest_of(self, index: int) -> bytes:
        return self.digests[index * DIGEST_SIZE : (index + 1) * DIGEST_SIZE]

    def verify(self, index: int, data: bytes | memoryview) -> bool:
        return len(data) == self.segment_length(index) and digest(data) == self.digest_of(index)

    def verify_run(self, first: int, data: bytes | memoryview) -> list[bool]:
        """Verify consecutive segments starting at `first` held in `data` (one flag each)."""
        view = memoryview(data)
        size = self.segment_size
        digests = self.digests
        ok: list[bool] = []
        for k in range((len(view) + size - 1) // size):
            i = first + k
            piece = view[k * size : (k + 1) * size]
            ok.append(
                len(piece) == self.segment_length(i)
                and blake3(piece).digest() == digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE]
            )
        return ok

    def split_verified(self, first: int, count: int, data: bytes | memoryview) -> tuple[list[Run], list[Run]]:
        """Verify segments [first, first + count) held consecutively in `data`.

        Returns (runs that verified, runs that did not), each in index order. Segments whose bytes
        are absent (short data) or wrong are in the second list. This is the one routine every
        reader and writer uses: the origin before serving, a peer before serving and at start,
        a downloader before writing.
        """
        flags = self.verify_run(first, data)
        flags += [False] * (count - len(flags))
        good: list[Run] = []
        bad: list[Run] = []
        k = 0
        while k < count:
            j = k
            ok = flags[k]
            while j < count and flags[j] == ok:
                j += 1
            (good if ok else bad).append((first + k, j - k))
            k = j
        return good, bad

    def segment_size_error(self) -> str | None:
        return (
            f"segment size {self.segment_size} is not {SEGMENT_SIZE}"
            if self.segment_size != SEGMENT_SIZE
            else None
        )

    def consistency_error(self) -> str | None:
        """Why the fields contradict each other, or None (used on manifests from disk or wire)."""
        problem = self.segment_size_error()
        if problem:
            return problem
        if len(self.digests) % DIGEST_SIZE:
            return "digest list is not a whole number of digests"
        if self.segment_count != segment_count(self.size, self.segment_size):
            return f"{self.segment_count} digests for {self.size} bytes"
        if self.file_id != digest(self.digests):
            return "file_id does not match the digests"
        problem = check_name(self.name)
        return f"bad name: {problem}" if problem else None


def hash_file(path: str | os.PathLike[str] | int, name: str) -> Manifest:
    """Build the manifest of a file on disk, given its path or an open descriptor (read once, in
    1 MiB chunks; a descriptor is left open and read from offset 0 with pread)."""
    if isinstance(path, int):
        return _hash_fd(path, name)
    with open(path, "rb", buffering=0) as f:
        return _hash_fd(f.fileno(), name)


def _hash_fd(fd: int, name: str) -> Manifest:
    parts: list[bytes] = []
    size = 0
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    while True:
        n = os.preadv(fd, [buf], size)
        if not n:
            break
        for off in range(0, n, SEGMENT_SIZE):
            parts.append(blake3(view[off : min(off + SEGMENT_SIZE, n)]).digest())
        size += n
        if n % SEGMENT_SIZE:
            # A short read mid-file would misalign every later segment: only the last may be short.
            if os.pread(fd, 1, size):
                raise OSError(f"{name}: short read in the middle of the file")
            break
    return Manifest(name=name, size=size, digests=b"".join(parts))


# --------------------------------------------------------------------------- manifest files

MANIFEST_FORMAT = 1


def write_manifest_file(path: Path, manifest: Manifest, **extra: Any) -> None:
    """Write a manifest file atomically and durably: a temporary file in the same folder, fsync,
    `os.replace`. `extra` keys (e.g. the source file's mtime) are stored beside the manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = msgpack.packb(
        {
            "format": MANIFEST_FORMAT,
            "name": manifest.name,
            "size": manifest.size,
            "segment_size": manifest.segment_size,
            "file_id": manifest.file_id,
            "digests": manifest.digests,
            **extra,
        },
        use_bin_type=True,
    )
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest_file(path: Path) -> tuple[Manifest, dict[str, Any]]:
    """Read a manifest file; returns it with the extra keys. Raises FileNotFoundError when absent
    and ValueError when the file is damaged or inconsistent (a manifest is rebuilt, never trusted)."""
    raw = path.read_bytes()
    try:
        data = msgpack.unpackb(raw, raw=False)
    except Exception as exc:
        raise ValueError(f"not a manifest file: {type(exc).__name__}") from None
    if type(data) is not dict or data.get("format") != MANIFEST_FORMAT:
        raise ValueError("not a manifest file of format 1")
    try:
        # segment_size and file_id are absent from manifests written by zswarm 0.1 peers: derived.
        manifest = Manifest(
            name=data.pop("name"),
            size=data.pop("size"),
            digests=data.pop("digests"),
            segment_size=data.pop("segment_size", SEGMENT_SIZE),
            file_id=data.pop("file_id", b""),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"manifest file lacks {exc}") from None
    if type(manifest.size) is not int or type(manifest.digests) is not bytes:
        raise ValueError("manifest file has fields of the wrong type")
    problem = manifest.consistency_error()
    if problem:
        raise ValueError(problem)
    data.pop("format")
    return manifest, data
