"""Store: a peer's files on disk, what it holds of each, and verified reads and writes.

Layout of `data_dir`:

    <name>                                   complete, verified files (subfolders kept)
    .zswarm/manifests/<file_id hex>.manifest the manifest of every file held or being fetched
    .zswarm/partial/<file_id hex>.part       downloads in progress (sparse, segment-aligned)

A file appears under its name only when every segment verified (`os.replace` from the partial
file, same filesystem). A segment counts as held only after its verified bytes were written
without error, so a full disk never leaves a segment that is claimed but absent.

Nothing on disk is trusted: `scan()` hashes every held file and partial file against its manifest
at start (and on rescan), and `read_run()` verifies every slice before it is served. A slice that
no longer verifies is dropped from the holdings and handed to `on_lost`, so the owner can tell the
broker. The store is shared by the peer's agent thread, its server thread and API callers: state
changes happen under one lock, file I/O outside it.

Only evidence drops a holding: bytes that fail their digest, or a file that is gone or is no
longer a regular file of the data folder. Reads never follow a symlink (`O_NOFOLLOW`), never block
on a FIFO (`O_NONBLOCK`, then the descriptor must be a regular file), and must resolve inside
`data_dir`. A transient failure (no file descriptor free, no memory, an interrupted call) raises
`SourceBusy`: the request is answered `busy` and nothing held is dropped or reported lost.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.errors import DiskFull, StorageError
from common.manifest import SEGMENT_SIZE, Manifest, read_manifest_file, write_manifest_file
from common.ranges import Run, SegmentSet
from common.segserver import SourceBusy

log = logging.getLogger(__name__)

META_DIR = ".zswarm"
# Errors that say "not now", not "this segment is gone": they must never drop a holding.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS, errno.EBUSY}
)


def is_transient(exc: OSError) -> bool:
    return exc.errno in TRANSIENT_ERRNOS


@dataclass
class Entry:
    manifest: Manifest
    held: SegmentSet
    path: Path  # the partial file until complete, then the final file

    @property
    def complete(self) -> bool:
        return len(self.held) == self.manifest.segment_count


class Store:
    def __init__(self, data_dir: Path, on_lost: Callable[[bytes, list[Run]], None] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.meta_dir = self.data_dir / META_DIR
        self.manifest_dir = self.meta_dir / "manifests"
        self.partial_dir = self.meta_dir / "partial"
        self.on_lost = on_lost
        self.on_held: Callable[[bytes], None] | None = None  # segments written: wakes the server
        self._lock = threading.Lock()
        self._entries: dict[bytes, Entry] = {}
        self._fetching: set[bytes] = set()  # files being downloaded now (their server relays)
        self._planning: set[str] = set()  # gets whose manifest is not known yet (by name)
        for folder in (self.data_dir, self.manifest_dir, self.partial_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._real_root = os.path.realpath(self.data_dir)

    def _open_data(self, path: Path) -> int:
        """Open a data file for reading: no symlink followed, no blocking on a FIFO, a regular
        file whose folder resolves inside data_dir. OSError otherwise (ELOOP, EINVAL, EXDEV)."""
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(path))
            folder = os.path.realpath(path.parent)
            if folder != self._real_root and not folder.startswith(self._real_root + os.sep):
                raise OSError(errno.EXDEV, "outside the data folder", str(path))
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- paths

    def final_path(self, manifest: Manifest) -> Path:
        return self.data_dir.joinpath(*manifest.name.split("/"))

    def partial_path(self, manifest: Manifest) -> Path:
        return self.partial_dir / f"{manifest.file_id.hex()}.part"

    def _manifest_path(self, file_id: bytes) -> Path:
        return self.manifest_dir / f"{file_id.hex()}.manifest"

    # ---- manifests

    def save_manifest(self, manifest: Manifest) -> None:
        target = self._manifest_path(manifest.file_id)
        if target.exists():
            return
        try:
            write_manifest_file(target, manifest)
        except OSError as exc:
            raise _storage_error(exc, f"cannot save the manifest of {manifest.name}") from None

    def load_manifest(self, file_id: bytes) -> Manifest | None:
        try:
            manifest, _ = read_manifest_file(self._manifest_path(file_id))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring damaged manifest %s: %s", file_id.hex()[:16], exc)
            return None
        if manifest.file_id != file_id:
            log.warning("ignoring inconsistent manifest %s", file_id.hex()[:16])
            return None
        return manifest

    def _cached_manifests(self) -> list[Manifest]:
        found: list[Manifest] = []
        for path in sorted(self.manifest_dir.glob("*.manifest")):
            try:
                file_id = bytes.fromhex(path.stem)
            except ValueError:
                continue
            manifest = self.load_manifest(file_id)
            if manifest is not None:
                found.append(manifest)
        return found

    # ---- scanning

    def scan(self) -> dict[bytes, int]:
        """Verify everything on disk against the cached manifests; returns segments held per file."""
        entries: dict[bytes, Entry] = {}
        for manifest in self._cached_manifests():
            final = self.final_path(manifest)
            partial = self.partial_path(manifest)
            held = self._verify_file(manifest, final) if final.is_file() else SegmentSet()
            path = final
            if len(held) < manifest.segment_count and partial.is_file():
                from_partial = self._verify_file(manifest, partial)
                if len(from_partial) > len(held):
                    held, path = from_partial, partial
            if manifest.segment_count == 0 and final.is_file():
                path = final
            elif not held and not partial.is_file():
                continue
            entries[manifest.file_id] = Entry(manifest, held, path)
        with self._lock:
            self._entries = entries
        return {fid: len(e.held) for fid, e in entries.items()}

    @staticmethod
    def _verify_file(manifest: Manifest, path: Path, runs: list[Run] | None = None) -> SegmentSet:
        """The segments of `path` that verify (only those in `runs`, if given). Opened like a
        served file: no symlink, no FIFO, a regular file."""
        held = SegmentSet()
        chunk_segments = 64
        if runs is None:
            runs = [(0, manifest.segment_count)] if manifest.segment_count else []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot verify %s: %s", path, exc.strerror)
            return held
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                log.warning("cannot verify %s: not a regular file", path)
                return held
            for run_first, run_count in runs:
                for first in range(run_first, run_first + run_count, chunk_segments):
                    count = min(chunk_segments, run_first + run_count - first)
                    data = os.pread(fd, manifest.run_length(first, count), first * SEGMENT_SIZE)
                    for good_first, good_count in manifest.split_verified(first, count, data)[0]:
                        held.add(good_first, good_count)
        except OSError as exc:
            log.warning("cannot verify %s: %s", path, exc.strerror)
        finally:
            os.close(fd)
        return held

    # ---- queries

    def entry(self, file_id: bytes) -> Entry | None:
        with self._lock:
            return self._entries.get(file_id)

    def manifest_named(self, name: str) -> Manifest | None:
        with self._lock:
            for entry in self._entries.values():
                if entry.manifest.name == name:
                    return entry.manifest
        return None

    def holdings(self) -> list[tuple[bytes, list[Run]]]:
        with self._lock:
            return [(fid, e.held.runs()) for fid, e in self._entries.items() if e.held]

    def holds(self, file_id: bytes, first: int, count: int) -> bool:
        with self._lock:
            entry = self._entries.get(file_id)
            return entry is not None and entry.held.covers(first, count)

    def fetching(self, file_id: bytes) -> bool:
        with self._lock:
            return file_id in self._fetching

    def expect(self, name: str) -> None:
        """A get of `name` started: until its manifest is known (`unexpect`), requests for files
        this store does not know may be for it (`expecting`)."""
        with self._lock:
            self._planning.add(name)

    def unexpect(self, name: str) -> None:
        with self._lock:
            self._planning.discard(name)

    def expecting(self, file_id: bytes) -> bool:
        with self._lock:
            return bool(self._planning) and file_id not in self._entries

    def stop_fetching(self, file_id: bytes) -> None:
        """The download ended (done, failed, cancelled): missing segments are missing again."""
        with self._lock:
            self._fetching.discard(file_id)

    def held_runs(self, file_id: bytes) -> list[Run]:
        with self._lock:
            entry = self._entries.get(file_id)
            return entry.held.runs() if entry is not None else []

    def reverify(self, file_id: bytes) -> list[Run]:
        """Read and verify every held segment of a file again (blocking: a worker's job). What
        fails is dropped and handed to `on_lost`; returns the runs held afterwards. A file being
        downloaded is left alone (its segments were verified as they arrived)."""
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None or file_id in self._fetching:
                return entry.held.runs() if entry is not None else []
            manifest, path, runs = entry.manifest, entry.path, entry.held.runs()
        good = self._verify_file(manifest, path, runs)
        bad = SegmentSet(runs)
        bad.difference_update(good)
        if bad:
            with self._lock:
                entry = self._entries.get(file_id)
                if entry is not None:
                    entry.held.difference_update(bad)
            log.warning(
                "%d segments of %s failed verification on disk: no longer served", len(bad), manifest.name
            )
            if self.on_lost is not None:
                self.on_lost(file_id, bad.runs())
        return self.held_runs(file_id)

    def held_copy(self, file_id: bytes) -> SegmentSet:
        with self._lock:
            entry = self._entries.get(file_id)
            return entry.held.copy() if entry else SegmentSet()

    def files(self) -> list[dict[str, object]]:
        with self._lock:
            return [
                {
                    "name": e.manifest.name,
                    "size": e.manifest.size,
                    "file_id": e.manifest.file_id.hex(),
                    "segments": e.manifest.segment_count,
                    "held": len(e.held),
                    "complete": e.complete,
                }
                for e in sorted(self._entries.values(), key=lambda e: e.manifest.name)
            ]

    # ---- downloading

    def begin(self, manifest: Manifest) -> SegmentSet:
        """Prepare to download; returns the segments already held (a resumed download)."""
        with self._lock:
            entry = self._entries.get(manifest.file_id)
            if entry is not None and entry.path.is_file():
                return entry.held.copy()
            self._entries.pop(manifest.file_id, None)  # its file vanished: start over
        self.save_manifest(manifest)
        partial = self.partial_path(manifest)
        held = self._verify_file(manifest, partial) if partial.exists() else SegmentSet()
        try:
            with open(partial, "ab") as f:
                if f.tell() < manifest.size:
                    f.truncate(manifest.size)  # sparse: space is taken as segments arrive
        except OSError as exc:
            raise _storage_error(exc, f"cannot create {partial}") from None
        with self._lock:
            entry = self._entries.setdefault(manifest.file_id, Entry(manifest, held, partial))
            self._fetching.add(manifest.file_id)
            return entry.held.copy()

    def open_for_write(self, file_id: bytes) -> int:
        entry = self.entry(file_id)
        if entry is None:
            raise StorageError("no download in progress for this file")
        try:
            return os.open(entry.path, os.O_WRONLY)
        except OSError as exc:
            raise _storage_error(exc, f"cannot open {entry.path}") from None

    def write_run(self, fd: int, file_id: bytes, first: int, data: memoryview) -> None:
        """Write verified consecutive segments, then count as held those that were written.

        A short write (the disk filled up mid-run) keeps the segments written whole before the
        error is raised, so a retry does not fetch them again.
        """
        try:
            written = os.pwrite(fd, data, first * SEGMENT_SIZE)
        except OSError as exc:
            raise _storage_error(exc, "cannot write segments") from None
        count = (
            (len(data) + SEGMENT_SIZE - 1) // SEGMENT_SIZE
            if written == len(data)
            else written // SEGMENT_SIZE
        )
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is not None:
                entry.held.add(first, count)
        if count and self.on_held is not None:
            self.on_held(file_id)
        if written != len(data):
            raise _storage_error(OSError(errno.ENOSPC, "short write"), "cannot write segments")

    def finish(self, file_id: bytes) -> Path:
        """Move a complete download to its final name."""
        entry = self.entry(file_id)
        if entry is None or not entry.complete:
            raise StorageError("download is not complete")
        final = self.final_path(entry.manifest)
        self.stop_fetching(file_id)
        if entry.path == final:
            return final
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            if entry.manifest.size == 0:
                final.write_bytes(b"")
                entry.path.unlink(missing_ok=True)
            else:
                os.replace(entry.path, final)
        except OSError as exc:
            raise _storage_error(exc, f"cannot move the download to {final}") from None
        with self._lock:
            entry.path = final
        return final

    def copy_complete(self, source: Entry, manifest: Manifest) -> Path:
        """The same content under another name: copy it locally instead of downloading it."""
        final = self.final_path(manifest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.path, final)
        except OSError as exc:
            raise _storage_error(exc, f"cannot copy to {final}") from None
        return final

    # ---- serving (SegmentReader)

    def read_run(self, file_id: bytes, first: int, count: int) -> tuple[bytes, list[Run]] | None:
        with self._lock:
            entry = self._entries.get(file_id)
            if entry is None:
                return None
            manifest, path = entry.manifest, entry.path
            wanted = entry.held.intersect_run(first, count)
        if first + count > manifest.segment_count:
            raise ValueError(f"segments [{first}, {first + count}) beyond {manifest.segment_count}")
        parts: list[bytes] = []
        present = SegmentSet()
        lost: list[Run] = []
        gone = False
        for run_first, run_count in wanted:
            data = self._pread(path, file_id, manifest, run_first, run_count)
            if data is None:
                # The file is gone from where it was kept, or is not a regular file of the data
                # folder any more: every segment held of it is lost, not just these.
                with self._lock:
                    entry = self._entries.get(file_id)
                    lost = entry.held.runs() if entry is not None else list(wanted)
                parts, present, gone = [], SegmentSet(), True
                break
            good, bad = manifest.split_verified(run_first, run_count, data)
            for good_first, good_count in good:
                start = (good_first - run_first) * SEGMENT_SIZE
                parts.append(data[start : start + manifest.run_length(good_first, good_count)])
                present.add(good_first, good_count)
            lost.extend(bad)
        if lost:
            with self._lock:
                entry = self._entries.get(file_id)
                if entry is not None and gone:
                    entry.held = SegmentSet()
                elif entry is not None:
                    for lost_first, lost_count in lost:
                        entry.held.remove(lost_first, lost_count)
            log.warning(
                "%d segments of %s failed verification on disk: no longer served",
                sum(c for _, c in lost),
                manifest.name,
            )
            if self.on_lost is not None:
                self.on_lost(file_id, lost)
        return b"".join(parts), present.missing_in_run(first, count)

    def _pread(self, path: Path, file_id: bytes, manifest: Manifest, first: int, count: int) -> bytes | None:
        """The bytes of a run (b"" if the read failed); None when the file is gone or is no longer
        a regular file of the data folder (evidence: all its segments are lost). SourceBusy on a
        transient error."""
        for attempt in range(2):
            try:
                fd = self._open_data(path)
            except FileNotFoundError:
                # The download may have just been moved to its final name: look once more.
                entry = self.entry(file_id)
                if attempt or entry is None or entry.path == path:
                    return None
                path = entry.path
                continue
            except OSError as exc:
                if is_transient(exc):
                    raise SourceBusy(f"{path}: {exc.strerror}") from None
                return None
            try:
                return os.pread(fd, manifest.run_length(first, count), first * SEGMENT_SIZE)
            except OSError as exc:
                if is_transient(exc):
                    raise SourceBusy(f"{path}: {exc.strerror}") from None
                return b""
            finally:
                os.close(fd)
        return None


def _storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"{what}: no space left on device")
    return StorageError(f"{what}: {exc.strerror or exc}")
