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

from blake3 import blake3

SEGMENT_SIZE = 16 * 1024
DIGEST_SIZE = 32
_READ_CHUNK = 64 * SEGMENT_SIZE  # 1 MiB reads when hashing whole files

_NAME_PART = re.compile(r"^[^\x00-\x1f/\\]+$")
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
        return f"name longer than {MAX_NAME_BYTES} bytes"
    if name.startswith("/"):
        return "absolute name"
    for part in name.split("/"):
        if part in ("", ".", ".."):
            return f"bad path component {part!r}"
        if not _NAME_PART.fullmatch(part):
            return "control character or backslash in name"
        if part.startswith(".zswarm"):
            return "reserved name"
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

    def consistency_error(self) -> str | None:
        """Why the fields contradict each other, or None (used on manifests from disk or wire)."""
        if self.segment_size != SEGMENT_SIZE:
            return f"segment size {self.segment_size} is not {SEGMENT_SIZE}"
        if len(self.digests) % DIGEST_SIZE:
            return "digest list is not a whole number of digests"
        if self.segment_count != segment_count(self.size, self.segment_size):
            return f"{self.segment_count} digests for {self.size} bytes"
        if self.file_id != digest(self.digests):
            return "file_id does not match the digests"
        problem = check_name(self.name)
        return f"bad name: {problem}" if problem else None


def hash_file(path: str | os.PathLike[str], name: str) -> Manifest:
    """Build the manifest of a file on disk (reads it once, in 1 MiB chunks)."""
    parts: list[bytes] = []
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_READ_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            size += n
            for off in range(0, n, SEGMENT_SIZE):
                parts.append(blake3(view[off : min(off + SEGMENT_SIZE, n)]).digest())
            if n % SEGMENT_SIZE:
                # A short read mid-file would misalign every later segment: only the last may be short.
                rest = f.read(1)
                if rest:
                    raise OSError(f"{path}: short read in the middle of the file")
                break
    return Manifest(name=name, size=size, digests=b"".join(parts))
