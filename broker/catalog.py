"""Catalog: the broker's shared files and their manifests, kept current while the broker runs.

Theory of operation
-------------------
At start the broker scans `share_dir` (regular files only: symlinks and special files are never
shared) and keeps one manifest per file in `manifest_dir` (same relative path plus `.manifest`,
written atomically and fsynced, see common/manifest.py), reused while the file's size, mtime and
inode are unchanged. After that, a `CatalogWorker` thread keeps the catalog current: every
`rescan_interval_s`, or at once on `rescan()`, it lists the folder, hashes files that are new or
whose stat changed, drops files that vanished, and reports each change to the tracker, which
never waits on a disk. A file the origin found changed behind its manifest (a slice that does
not verify, even with the same size and mtime: `cp -p`, bit rot) is hashed again too, ignoring
the cached manifest, and gets a new `file_id`; while that happens, GETs for it wait.

The catalog is also the origin's segment reader. Every open is `O_NOFOLLOW | O_NONBLOCK` and
checked to be the very file that was scanned (same device and inode, a regular file), so a
symlink or a FIFO swapped in later is never read. Every slice served is verified against the
manifest handed out. Only evidence (bytes that fail their digest, a file whose identity or
stat changed) marks a file for a rebuild; a transient error (no file descriptor free, no memory,
an interrupted call) is answered `busy` and changes nothing.

Thread use: the tracker and origin threads read it, the worker swaps whole entries under a lock;
manifests themselves are immutable.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.manifest import (
    DIGEST_SIZE,
    SEGMENT_SIZE,
    Manifest,
    check_name,
    hash_file,
    read_manifest_file,
    write_manifest_file,
)
from common.protocol import DEFAULT_MAX_HEADER_BYTES, PROTOCOL_VERSION
from common.ranges import Run
from common.segserver import SourceBusy
from common.threads import worker_thread

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest"
# Protocol 2 sends a file's whole manifest in the header of one `file` reply, whose size a peer
# caps at DEFAULT_MAX_HEADER_BYTES: 32 bytes of digest per 16 KiB segment, with 1 MiB kept for
# the name, the sources and the plan. Larger files are not shared (31.5 GiB).
HEADER_RESERVE_BYTES = 1024 * 1024
MAX_SHARED_SIZE = (DEFAULT_MAX_HEADER_BYTES - HEADER_RESERVE_BYTES) // DIGEST_SIZE * SEGMENT_SIZE
GiB = 1024**3
# Errors that say "not now", not "this file changed": they must never drop a manifest.
TRANSIENT_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS, errno.EBUSY}
)


@dataclass(frozen=True, slots=True)
class FileStat:
    size: int
    mtime_ns: int
    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStat:
        return cls(st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    manifest: Manifest
    path: Path
    stat: FileStat

    @property
    def mtime_ns(self) -> int:
        return self.stat.mtime_ns


@dataclass(frozen=True, slots=True)
class Change:
    """A file that was added, changed or removed; `old_file_id`: the version it replaced."""

    name: str
    old_file_id: bytes | None


def is_transient(exc: OSError) -> bool:
    return exc.errno in TRANSIENT_ERRNOS


def _raise_if_transient(exc: OSError) -> None:
    """A listing that failed for a transient reason (no descriptor to open a folder with) is no
    listing: abort the scan (nothing changes; the next one retries) rather than drop every file."""
    if is_transient(exc):
        raise SourceBusy(f"cannot list the share now: {exc.strerror}")


class Catalog:
    def __init__(self, share_dir: Path, manifest_dir: Path) -> None:
        self.share_dir = Path(share_dir)
        self.manifest_dir = Path(manifest_dir)
        self._lock = threading.Lock()
        self._by_name: dict[str, CatalogEntry] = {}
        self._by_id: dict[bytes, CatalogEntry] = {}
        self._suspect: set[str] = set()  # failed verification when served: rehash, no cache
        self._rebuilding: set[str] = set()  # GETs wait for these
        self.on_suspect: Callable[[], None] | None = None  # wakes the worker
        self.built = 0
        self.reused = 0
        self._too_big: dict[str, int] = {}  # name -> size already warned about (once per size)
        self._twins: dict[str, str] = {}  # name -> the NFC twin shared instead (warned once)

    # ---- scanning

    def scan(self) -> list[Change]:
        """Bring the catalog in line with the folder (blocking: run it at start or on the worker).
        Returns what changed."""
        if not self.share_dir.is_dir():
            raise FileNotFoundError(f"share_dir {self.share_dir} is not a folder")
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        found = self._list_files()
        with self._lock:
            suspect, self._suspect = self._suspect, set()
            known = dict(self._by_name)
        changes: list[Change] = []
        for name, (path, file_stat) in sorted(found.items()):
            old = known.get(name)
            if old is not None and old.stat == file_stat and name not in suspect:
                continue
            if old is not None or name in suspect:
                self._mark_rebuilding(name)
            try:
                entry = self._load_or_build(name, path, file_stat, trust_cache=name not in suspect)
            except SourceBusy:
                with self._lock:
                    self._rebuilding.discard(name)
                    if name in suspect:
                        self._suspect.add(name)  # try again next time
                continue
            self._install(name, entry)
            if entry is None or old is None or entry.manifest.file_id != old.manifest.file_id:
                changes.append(Change(name, old.manifest.file_id if old else None))
        for name, old in known.items():
            if name not in found:
                self._install(name, None)
                changes.append(Change(name, old.manifest.file_id))
        return changes

    def _list_files(self) -> dict[str, tuple[Path, FileStat]]:
        found: dict[str, tuple[Path, FileStat]] = {}
        by_nfc: dict[str, str] = {}  # NFC form -> the name shared under it
        twins: dict[str, str] = {}
        too_big: dict[str, int] = {}
        for folder, dirs, files in os.walk(self.share_dir, onerror=_raise_if_transient, followlinks=False):
            dirs.sort()
            for file_name in sorted(files):
                path = Path(folder) / file_name
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    _raise_if_transient(exc)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue  # symlinks, FIFOs, sockets, devices: never shared
                name = path.relative_to(self.share_dir).as_posix()
                problem = check_name(name)
                if problem:
                    log.warning("not sharing %s: %s", path, problem)
                    continue
                if st.st_size > MAX_SHARED_SIZE:
                    too_big[name] = st.st_size
                    if self._too_big.get(name) != st.st_size:  # once, not at every rescan
                        log.warning(
                            "not sharing %s: %.1f GiB is over the %g GiB limit of protocol %d"
                            " (manifests in one frame)",
                            path,
                            st.st_size / GiB,
                            MAX_SHARED_SIZE / GiB,
                            PROTOCOL_VERSION,
                        )
                    continue
                # Names equal once normalized (NFC/NFD twins) would be one file to a peer: keep the first.
                twin = by_nfc.setdefault(unicodedata.normalize("NFC", name), name)
                if twin != name:
                    twins[name] = twin
                    if self._twins.get(name) != twin:  # once, not at every rescan
                        log.warning("not sharing %s: its name normalizes (NFC) to the shared %r", path, twin)
                    continue
                found[name] = (path, FileStat.of(st))
        self._too_big = too_big
        self._twins = twins
        return found

    def _mark_rebuilding(self, name: str) -> None:
        with self._lock:
            self._rebuilding.add(name)

    def _install(self, name: str, entry: CatalogEntry | None) -> None:
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_id.pop(old.manifest.file_id, None)
            if entry is not None:
                self._by_name[name] = entry
                self._by_id[entry.manifest.file_id] = entry
            self._rebuilding.discard(name)

    def _manifest_path(self, name: str) -> Path:
        return self.manifest_dir / (name + MANIFEST_SUFFIX)

    def _load_or_build(
        self, name: str, path: Path, file_stat: FileStat, trust_cache: bool
    ) -> CatalogEntry | None:
        if trust_cache:
            cached = self._read_manifest(name, file_stat)
            if cached is not None:
                self.reused += 1
                return CatalogEntry(cached, path, file_stat)
        try:
            fd = _open_regular(path)
        except OSError as exc:
            if is_transient(exc):
                raise SourceBusy(str(exc)) from None
            log.warning("not sharing %s: %s", path, exc.strerror or exc)
            return None
        try:
            opened = FileStat.of(os.fstat(fd))
            if (opened.dev, opened.ino) != (file_stat.dev, file_stat.ino):
                log.warning("not sharing %s: it was replaced while being read", path)
                return None
            manifest = hash_file(fd, name)
            after = FileStat.of(os.fstat(fd))
        except OSError as exc:
            if is_transient(exc):
                raise SourceBusy(str(exc)) from None
            log.warning("not sharing %s: %s", path, exc)
            return None
        finally:
            os.close(fd)
        if (after.size, after.mtime_ns) != (manifest.size, opened.mtime_ns):
            log.warning("not sharing %s yet: it changed while it was being hashed", path)
            return None
        try:
            write_manifest_file(
                self._manifest_path(name), manifest, mtime_ns=after.mtime_ns, ino=after.ino, dev=after.dev
            )
        except OSError as exc:
            log.warning("cannot save the manifest of %s (it is rebuilt on restart): %s", name, exc)
        self.built += 1
        return CatalogEntry(manifest, path, after)

    def _read_manifest(self, name: str, file_stat: FileStat) -> Manifest | None:
        try:
            manifest, extra = read_manifest_file(self._manifest_path(name))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # a damaged manifest is rebuilt, never trusted
            log.warning("rebuilding the manifest of %s: %s", name, exc)
            return None
        if (
            manifest.name != name
            or manifest.size != file_stat.size
            or extra.get("mtime_ns") != file_stat.mtime_ns
            or extra.get("ino") != file_stat.ino
        ):
            return None
        return manifest

    # ---- lookups (no disk)

    def by_name(self, name: str) -> CatalogEntry | None:
        with self._lock:
            return self._by_name.get(name)

    def by_id(self, file_id: bytes) -> CatalogEntry | None:
        with self._lock:
            return self._by_id.get(file_id)

    def entries(self) -> list[CatalogEntry]:
        with self._lock:
            return sorted(self._by_name.values(), key=lambda e: e.manifest.name)

    def rebuilding(self, name: str) -> bool:
        with self._lock:
            return name in self._rebuilding or name in self._suspect

    def suspect(self, name: str) -> None:
        """The origin found this file changed behind its manifest: rehash it (new file_id)."""
        with self._lock:
            if name in self._suspect:
                return
            self._suspect.add(name)
        if self.on_suspect is not None:
            self.on_suspect()

    # ---- origin reads (SegmentReader)

    def fetching(self, file_id: bytes) -> bool:
        return False  # the origin fetches nothing: what it lacks, it lacks

    def expecting(self, file_id: bytes) -> bool:
        return False

    def holds(self, file_id: bytes, first: int, count: int) -> bool:
        entry = self.by_id(file_id)
        return entry is not None and first + count <= entry.manifest.segment_count

    def read_run(self, file_id: bytes, first: int, count: int) -> tuple[bytes, list[Run]] | None:
        entry = self.by_id(file_id)
        if entry is None:
            return None
        manifest = entry.manifest
        if first + count > manifest.segment_count:
            raise ValueError(f"segments [{first}, {first + count}) beyond {manifest.segment_count}")
        length = manifest.run_length(first, count)
        try:
            fd = _open_regular(entry.path)
        except OSError as exc:
            if is_transient(exc):
                raise SourceBusy(str(exc)) from None
            data = b""  # gone, or not a regular file any more
        else:
            try:
                opened = FileStat.of(os.fstat(fd))
                data = os.pread(fd, length, first * SEGMENT_SIZE) if opened == entry.stat else b""
            except OSError as exc:
                if is_transient(exc):
                    raise SourceBusy(str(exc)) from None
                data = b""
            finally:
                os.close(fd)
        good, bad = manifest.split_verified(first, count, data)
        if not bad:
            return data, []
        # The file no longer matches the manifest handed out: serve only what still verifies.
        self.suspect(manifest.name)
        parts = [
            data[(f - first) * SEGMENT_SIZE : (f - first) * SEGMENT_SIZE + manifest.run_length(f, c)]
            for f, c in good
        ]
        return b"".join(parts), bad


def _open_regular(path: Path) -> int:
    """Open for reading without following a symlink or blocking on a FIFO; a regular file only."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


class CatalogWorker:
    """The thread that keeps the catalog current: a periodic rescan, an immediate one on
    request, and the rebuild of files the origin found changed. It owns no socket; it reports
    changes through `on_changes` (the broker posts them to the tracker thread)."""

    def __init__(
        self,
        catalog: Catalog,
        rescan_interval_s: float,
        on_changes: Callable[[list[Change]], None],
    ) -> None:
        self.catalog = catalog
        self.rescan_interval_s = rescan_interval_s
        self.on_changes = on_changes
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._scans_done = 0
        self._scan_done = threading.Condition()
        self._thread = worker_thread(self._main, "zswarm-catalog")
        catalog.on_suspect = self._wake.set

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("catalog worker did not stop within %.1f s (a file is being hashed)", timeout)

    def rescan(self, timeout: float = 600.0) -> bool:
        """Scan now and wait for the scan to finish (True) or `timeout` (False)."""
        with self._scan_done:
            target = self._scans_done + 1
            self._wake.set()
            return self._scan_done.wait_for(
                lambda: self._scans_done >= target or self._stop.is_set(), timeout
            )

    def _main(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.rescan_interval_s if self.rescan_interval_s > 0 else None)
            if self._stop.is_set():
                return
            self._wake.clear()
            try:
                changes = self.catalog.scan()
            except Exception:
                log.exception("catalog rescan failed (it is tried again)")
                changes = []
            if changes:
                for change in changes:
                    entry = self.catalog.by_name(change.name)
                    log.info(
                        "%s: %s",
                        change.name,
                        "no longer shared"
                        if entry is None
                        else ("new version " if change.old_file_id else "now shared, ")
                        + f"{entry.manifest.file_id.hex()[:16]}",
                    )
                try:
                    self.on_changes(changes)
                except Exception:
                    log.exception("reporting catalog changes failed")
            with self._scan_done:
                self._scans_done += 1
                self._scan_done.notify_all()
