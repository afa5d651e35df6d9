"""Catalog: the broker's shared files and their manifests.

At start the broker scans `share_dir` recursively and keeps one manifest per file in
`manifest_dir` (same relative path plus `.manifest`), written atomically (temporary file, then
`os.replace`) and reused on restart while the file's size and mtime are unchanged.

The catalog is also the origin's segment reader: every slice it serves is verified against the
manifest it handed out. When a file changed on disk behind the manifest, the slice is refused
(never served) and the file is queued for a rebuild, which gives it a new `file_id`.

Thread use: the tracker thread reads it, the origin thread reads it, rebuilds swap whole entries
under a lock; manifests themselves are immutable.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import msgpack

from common.manifest import SEGMENT_SIZE, Manifest, check_name, hash_file
from common.ranges import Run

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    manifest: Manifest
    path: Path
    mtime_ns: int


class Catalog:
    def __init__(self, share_dir: Path, manifest_dir: Path) -> None:
        self.share_dir = Path(share_dir)
        self.manifest_dir = Path(manifest_dir)
        self._lock = threading.Lock()
        self._by_name: dict[str, CatalogEntry] = {}
        self._by_id: dict[bytes, CatalogEntry] = {}
        self._stale: set[str] = set()
        self.built = 0
        self.reused = 0

    # ---- scanning

    def scan(self) -> None:
        """Build or reuse the manifest of every file under share_dir (blocking)."""
        if not self.share_dir.is_dir():
            raise FileNotFoundError(f"share_dir {self.share_dir} is not a folder")
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        found: dict[str, CatalogEntry] = {}
        for path in sorted(self.share_dir.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            name = path.relative_to(self.share_dir).as_posix()
            problem = check_name(name)
            if problem:
                log.warning("not sharing %s: %s", path, problem)
                continue
            entry = self._load_or_build(name, path)
            if entry is not None:
                found[name] = entry
        with self._lock:
            self._by_name = found
            self._by_id = {e.manifest.file_id: e for e in found.values()}
            self._stale.clear()
        log.info(
            "catalog: %d files (%d manifests built, %d reused) from %s",
            len(found),
            self.built,
            self.reused,
            self.share_dir,
        )

    def _manifest_path(self, name: str) -> Path:
        return self.manifest_dir / (name + MANIFEST_SUFFIX)

    def _load_or_build(self, name: str, path: Path) -> CatalogEntry | None:
        try:
            st = path.stat()
        except OSError as exc:
            log.warning("not sharing %s: %s", path, exc.strerror)
            return None
        cached = self._read_manifest(name, st.st_size, st.st_mtime_ns)
        if cached is not None:
            self.reused += 1
            return CatalogEntry(cached, path, st.st_mtime_ns)
        try:
            manifest = hash_file(path, name)
            after = path.stat()
        except OSError as exc:
            log.warning("not sharing %s: %s", path, exc)
            return None
        if (after.st_size, after.st_mtime_ns) != (manifest.size, st.st_mtime_ns):
            log.warning("not sharing %s: it changed while it was being hashed", path)
            return None
        self._write_manifest(manifest, st.st_mtime_ns)
        self.built += 1
        return CatalogEntry(manifest, path, st.st_mtime_ns)

    def _read_manifest(self, name: str, size: int, mtime_ns: int) -> Manifest | None:
        try:
            data = msgpack.unpackb(self._manifest_path(name).read_bytes(), raw=False)
            if (
                type(data) is not dict
                or data.get("format") != _FORMAT
                or data.get("name") != name
                or data.get("size") != size
                or data.get("mtime_ns") != mtime_ns
            ):
                return None
            manifest = Manifest(
                name=name,
                size=size,
                digests=data["digests"],
                segment_size=data["segment_size"],
                file_id=data["file_id"],
            )
        except FileNotFoundError:
            return None
        except Exception as exc:  # a damaged manifest is rebuilt, never trusted
            log.warning("rebuilding the manifest of %s: %s", name, exc)
            return None
        if manifest.consistency_error() is not None:
            return None
        return manifest

    def _write_manifest(self, manifest: Manifest, mtime_ns: int) -> None:
        target = self._manifest_path(manifest.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        data = msgpack.packb(
            {
                "format": _FORMAT,
                "name": manifest.name,
                "size": manifest.size,
                "mtime_ns": mtime_ns,
                "segment_size": manifest.segment_size,
                "file_id": manifest.file_id,
                "digests": manifest.digests,
            },
            use_bin_type=True,
        )
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    # ---- lookups

    def by_name(self, name: str) -> CatalogEntry | None:
        with self._lock:
            return self._by_name.get(name)

    def by_id(self, file_id: bytes) -> CatalogEntry | None:
        with self._lock:
            return self._by_id.get(file_id)

    def entries(self) -> list[CatalogEntry]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda e: e.manifest.name)

    def is_current(self, entry: CatalogEntry) -> bool:
        """False when the file changed on disk since its manifest was built (a stat: ~2 us)."""
        try:
            st = entry.path.stat()
        except OSError:
            return False
        return (st.st_size, st.st_mtime_ns) == (entry.manifest.size, entry.mtime_ns)

    def take_stale(self) -> list[str]:
        with self._lock:
            stale, self._stale = self._stale, set()
            return sorted(stale)

    def rebuild(self, name: str) -> CatalogEntry | None:
        """Hash a changed file again; its new manifest replaces the old one (new file_id)."""
        path = self.share_dir / name
        entry = self._load_or_build(name, path) if path.is_file() else None
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_id.pop(old.manifest.file_id, None)
            if entry is not None:
                self._by_name[name] = entry
                self._by_id[entry.manifest.file_id] = entry
        return entry

    # ---- origin reads (SegmentReader)

    def read_run(self, file_id: bytes, first: int, count: int) -> tuple[bytes, list[Run]] | None:
        entry = self.by_id(file_id)
        if entry is None:
            return None
        manifest = entry.manifest
        if first + count > manifest.segment_count:
            raise ValueError(f"segments [{first}, {first + count}) beyond {manifest.segment_count}")
        length = manifest.run_length(first, count)
        try:
            with open(entry.path, "rb", buffering=0) as f:
                data = os.pread(f.fileno(), length, first * SEGMENT_SIZE)
        except OSError:
            data = b""
        flags = manifest.verify_run(first, data) if data else []
        if len(flags) == count and all(flags):
            return data, []
        # The file no longer matches the manifest handed out: serve only what still verifies.
        flags += [False] * (count - len(flags))
        with self._lock:
            self._stale.add(manifest.name)
        parts: list[bytes] = []
        missing: list[Run] = []
        for k, ok in enumerate(flags):
            i = first + k
            if ok:
                offset = k * SEGMENT_SIZE
                parts.append(data[offset : offset + manifest.segment_length(i)])
            elif missing and missing[-1][0] + missing[-1][1] == i:
                missing[-1] = (missing[-1][0], missing[-1][1] + 1)
            else:
                missing.append((i, 1))
        return b"".join(parts), missing
