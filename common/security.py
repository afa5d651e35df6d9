"""CURVE keys, an allow-list of client keys, and the ZAP handler that enforces it.

Theory of operation
-------------------
CURVE (RFC 26) encrypts every connection and proves the *server's* identity to the client: a client
that knows the wrong server key never completes the handshake. It does not, by itself, authenticate
*clients*: libzmq asks a ZAP handler (RFC 27) whether to accept each client key, and with no
handler running a CURVE server accepts any key at all. So every server socket here is configured
with `apply_server`, which also sets ZAP_DOMAIN and ZAP_ENFORCE_DOMAIN: without a ZAP handler in
the socket's context the handshake then fails (fail closed) instead of admitting everybody.

The ZAP handler is `Authenticator`: one thread per zmq context (libzmq calls the handler bound to
`inproc://zeromq.zap.01` *in the same context*), owning one REP socket. For each handshake libzmq
sends it a request [version, request id, domain, address, routing id, mechanism, credentials...];
it accepts a CURVE client whose 32-byte key is on the `AllowList` and answers with user id = that
key in Z85, and refuses everything else with status 400. libzmq attaches the user id to every
message received on that connection as the "User-Id" property, so `peer_identity(frame)` names the
sender of any frame received on a ROUTER or SUB (receive with copy=False). That, never a field in a
message body, is what a peer's identity must be taken from.

ZAP runs once per connection, at the handshake: adding or removing a key file changes the answer
for *new* connections (within the allow-list's check interval); an established connection is not
cut. A refusal is final for that connection: libzmq (4.3.5, measured) reports
EVENT_HANDSHAKE_FAILED_AUTH (value 400) on the client's monitor, disconnects and does NOT reconnect,
so a refused client waits forever unless it watches its monitor or times out, and only a new
connection (a new socket, or disconnect + connect) is asked about again. Refusals are logged
rate-limited anyway, since anyone who can reach the port can trigger them.
Sockets in the same context that use the NULL mechanism and set no ZAP_DOMAIN never reach the
handler (measured with libzmq 4.3.5), so plain inproc plumbing keeps working next to it.

Wiring, in short: per zmq context that binds a server socket, start one `Authenticator` before
binding; call `apply_server` before bind() and `apply_client` before connect(); read identities with
`peer_identity` on frames received with copy=False.

Key files
---------
The ZeroMQ certificate format (ZPL text, as written by czmq's zcert and pyzmq's
`zmq.auth.create_certificates`, read by `zmq.auth.load_certificate`):

    NAME.key          (mode 0644)           NAME.key_secret   (mode 0600)
    metadata                                metadata
        name = "NAME"                           name = "NAME"
    curve                                   curve
        public-key = "<40 chars of Z85>"        public-key = "<40 chars of Z85>"
                                                secret-key = "<40 chars of Z85>"

Lines starting with '#' are comments. Chosen over a bespoke format because operators and other
ZeroMQ tools already know it: keys made by czmq or pyzmq can be dropped into an allow-list folder
unchanged (after a `chmod 600` of the secret file, which this module insists on, like ssh), and
ours can be read by them. The secret file carries the public key too, so one file configures a node.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
from zmq.utils import z85

from common.errors import ConfigError
from common.service import RateLimitedLog, ServiceThread, make_socket

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: libzmq looks for the handler here
ZAP_VERSION = b"1.0"
DEFAULT_DOMAIN = "zswarm"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
KEY_LENGTH = 32  # raw CURVE25519 key
Z85_LENGTH = 40  # the same key in Z85
MAX_KEY_FILE_BYTES = 64 * 1024  # a certificate is ~300 bytes: a bigger file is not one of ours

_Z85_CHARS = frozenset(z85.Z85CHARS)
_Z85_TEXT = frozenset(z85.Z85CHARS.decode("ascii"))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_KEY_LINE = re.compile(r"(public-key|secret-key)\s*=\s*(.*)")


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyPair:
    """A node's CURVE keys, both in Z85 (what libzmq's socket options take)."""

    public: bytes
    secret: bytes = field(repr=False)  # kept out of repr so that it never lands in a log line

    @property
    def public_text(self) -> str:
        return self.public.decode("ascii")


def _is_z85_text(text: str) -> bool:
    return len(text) == Z85_LENGTH and _Z85_TEXT.issuperset(text)


def z85_key(key: str | bytes) -> bytes:
    """A CURVE key as 40 bytes of Z85, from Z85 (str or bytes) or the raw 32 bytes.

    Raises ValueError for anything else (wrong length, characters outside Z85)."""
    if isinstance(key, str):
        if _is_z85_text(key):
            return key.encode("ascii")
    elif len(key) == KEY_LENGTH:
        return z85.encode(key)
    elif len(key) == Z85_LENGTH and _Z85_CHARS.issuperset(key):
        return bytes(key)
    raise ValueError(f"not a CURVE key: expected {Z85_LENGTH} Z85 characters or {KEY_LENGTH} raw bytes")


def _read_key_file(path: Path, secret: bool) -> tuple[bytes | None, bytes | None]:
    """(public, secret) Z85 keys found in a certificate file; ConfigError names the file and the fault.

    The file is opened once and checked through its descriptor (fstat), so what is checked is what is
    read even if the name is swapped meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        hint = " (make one with: zswarm-keygen NAME --dir DIR)" if secret else ""
        raise ConfigError(f"{path}: no such key file{hint}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if secret and st.st_mode & 0o077:
            # Like ssh: a secret others can read is not secret any more, and using it would hide that.
            raise ConfigError(
                f"{path}: secret key file is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_KEY_FILE_BYTES and (chunk := os.read(fd, MAX_KEY_FILE_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"{path}: too big for a key file (over {MAX_KEY_FILE_BYTES} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a key file (not UTF-8 text)") from None

    found: dict[str, bytes] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        match = _KEY_LINE.fullmatch(raw.strip())
        if match is None:
            continue  # comments, section names, metadata: the format allows them, we need none
        kind, value = match.group(1), match.group(2).strip().strip("\"'")
        if kind in found:
            raise ConfigError(f"{path}:{number}: second {kind} line")
        if not _is_z85_text(value):
            raise ConfigError(f"{path}:{number}: {kind} is not a {Z85_LENGTH}-character Z85 key")
        found[kind] = value.encode("ascii")
    return found.get("public-key"), found.get("secret-key")


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The Z85 public key in a public certificate file (NAME.key)."""
    path = Path(path)
    public, secret = _read_key_file(path, secret=False)
    if secret is not None:
        # A secret in a file meant to be handed around is a leak in the making: refuse to use it.
        raise ConfigError(f"{path}: holds a secret key; use the public file (NAME{PUBLIC_SUFFIX}) here")
    if public is None:
        raise ConfigError(f"{path}: no public-key line (not a ZeroMQ certificate)")
    return public


def load_secret(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair in a secret certificate file (NAME.key_secret), which must be mode 0600 (or 0400)."""
    path = Path(path)
    public, secret = _read_key_file(path, secret=True)
    if secret is None:
        raise ConfigError(f"{path}: no secret-key line (is this the public {PUBLIC_SUFFIX} file?)")
    derived = zmq.curve_public(secret)
    if public is None:
        public = derived
    elif public != derived:
        raise ConfigError(f"{path}: public-key does not belong to secret-key (file edited by hand?)")
    return KeyPair(public=public, secret=secret)


def _certificate(name: str, public: bytes, secret: bytes | None) -> bytes:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if secret is None:
        banner = (
            f"#   ****  Generated on {now} by zswarm  ****\n"
            "#   ZeroMQ CURVE Public Certificate\n"
            "#   Give it to the servers that should accept this node (their allow-list folder).\n"
        )
    else:
        banner = (
            f"#   ****  Generated on {now} by zswarm  ****\n"
            "#   ZeroMQ CURVE **Secret** Certificate\n"
            "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n"
        )
    lines = [banner, "metadata", f'    name = "{name}"', "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode("ascii")


def _create_file(path: Path, data: bytes, mode: int) -> None:
    """Write a new file; fails if the name exists (O_EXCL), so nothing is ever overwritten.

    The mode is given to open(): the file never exists, even empty, with wider permissions (the umask
    can only narrow it; a public file is widened back to `mode` with fchmod, it holds no secret)."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
    try:
        if mode & 0o077:
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def generate_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Make a new key pair: DIRECTORY/NAME.key (0644) and DIRECTORY/NAME.key_secret (0600).

    Creates DIRECTORY (0700) if missing; refuses to overwrite either file. Returns (public, secret)."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"bad key name {name!r}: use 1-64 letters, digits, '.', '_', '-' (first a letter or digit)"
        )
    folder = Path(directory)
    public_path, secret_path = folder / f"{name}{PUBLIC_SUFFIX}", folder / f"{name}{SECRET_SUFFIX}"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot create the key folder: {exc.strerror}") from None
    for path in (public_path, secret_path):
        if os.path.lexists(path):
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key (remove it first)")
    public, secret = zmq.curve_keypair()
    try:
        _create_file(secret_path, _certificate(name, public, secret), 0o600)
    except FileExistsError:
        raise ConfigError(f"{secret_path}: already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"{secret_path}: cannot write: {exc.strerror}") from None
    try:
        _create_file(public_path, _certificate(name, public, None), 0o644)
    except OSError as exc:
        # Half a pair is worse than none: the next attempt would refuse to overwrite the secret.
        with contextlib.suppress(OSError):
            os.unlink(secret_path)
        if isinstance(exc, FileExistsError):
            raise ConfigError(f"{public_path}: already exists; refusing to overwrite a key") from None
        raise ConfigError(f"{public_path}: cannot write: {exc.strerror}") from None
    log.info("new key pair %s: public %s, secret %s", name, public_path, secret_path)
    return public_path, secret_path


# --------------------------------------------------------------------------- allow-list


@dataclass
class _FileState:
    signature: tuple[int, int, int, int]  # (dev, inode, size, mtime_ns): any rewrite changes it
    key: bytes | None  # None: the file is bad (already logged for this signature)


class AllowList:
    """The client keys a server accepts: every NAME.key file in one folder.

    The folder is checked again on a lookup when `check_interval_s` has passed since the last check
    (lookups happen once per connection handshake, so this costs nothing between connections): a
    file added, changed or removed takes effect within the interval. Only a file whose (inode, size,
    mtime) changed is read again. A bad file is logged once per version and skipped; a secret key
    file in the folder is logged and never read. If the folder cannot be listed, no key is accepted
    (fail closed) until it can. Thread-safe."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        check_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ConfigError(f"{self.directory}: allow-list folder does not exist (or is not a folder)")
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._files: dict[str, _FileState] = {}
        self._keys: frozenset[bytes] = frozenset()
        self._names: dict[bytes, str | None] = {}  # key -> NAME of its NAME.key (None: ambiguous)
        self._next_check = 0.0
        self._folder_errors = RateLimitedLog(log, interval_s=10.0)
        self.reloads = 0  # times the key set changed
        self.reload()

    def contains(self, key: str | bytes) -> bool:
        """Is this key (Z85 str/bytes, or raw 32 bytes) allowed? A malformed key is not."""
        try:
            wanted = z85_key(key)
        except ValueError:
            return False
        with self._lock:
            if self._clock() >= self._next_check:
                self._reload_locked()
            return wanted in self._keys

    __contains__ = contains

    def keys(self) -> frozenset[bytes]:
        """The allowed keys (Z85) as of the last check."""
        with self._lock:
            return self._keys

    def name_of(self, key: str | bytes) -> str | None:
        """The NAME of the allow-list file NAME.key holding this key (raw or Z85): the one name a
        peer with this key may use. None for a key not listed, or listed under several names."""
        try:
            wanted = z85_key(key)
        except ValueError:
            return None
        with self._lock:
            if self._clock() >= self._next_check:
                self._reload_locked()
            return self._names.get(wanted)

    def __len__(self) -> int:
        return len(self.keys())

    def reload(self) -> None:
        """Check the folder now, whatever the interval."""
        with self._lock:
            self._reload_locked()

    def _reload_locked(self) -> None:
        self._next_check = self._clock() + self.check_interval_s
        try:
            entries = list(os.scandir(self.directory))
        except OSError as exc:
            self._folder_errors.warning(
                "allow-list %s cannot be read (%s): accepting no key until it can", self.directory, exc
            )
            self._files = {}
            self._names = {}
            self._set_keys(frozenset())
            return
        files: dict[str, _FileState] = {}
        for entry in entries:
            name = entry.name
            if name.startswith(".") or not (name.endswith(PUBLIC_SUFFIX) or name.endswith(SECRET_SUFFIX)):
                continue  # editor backups, READMEs, hidden temporary files of a copy in progress
            try:
                st = entry.stat()  # follows symlinks: a linked key file is fine
            except OSError:
                continue  # removed between listing and stat
            if not stat.S_ISREG(st.st_mode):
                continue
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            previous = self._files.get(name)
            if previous is not None and previous.signature == signature:
                files[name] = previous
                continue
            files[name] = _FileState(signature, self._read(Path(entry.path)))
        self._files = files
        names: dict[bytes, str | None] = {}
        for file_name, state in sorted(files.items()):
            if state.key is None or not file_name.endswith(PUBLIC_SUFFIX):
                continue
            name = file_name[: -len(PUBLIC_SUFFIX)]
            names[state.key] = name if state.key not in names else None
        self._names = names
        self._set_keys(frozenset(state.key for state in files.values() if state.key is not None))

    def _read(self, path: Path) -> bytes | None:
        if path.name.endswith(SECRET_SUFFIX):
            log.warning("allow-list: %s is a secret key file: skipped; move it out of this folder", path)
            return None
        try:
            return load_public(path)
        except ConfigError as exc:
            # Also what a file still being copied looks like: its next write changes its signature,
            # and it is read again then.
            log.warning("allow-list: skipped %s", exc)
            return None

    def _set_keys(self, keys: frozenset[bytes]) -> None:
        if keys == self._keys:
            return
        added, removed = len(keys - self._keys), len(self._keys - keys)
        self._keys = keys
        self.reloads += 1
        log.info("allow-list %s: %d keys (%d added, %d removed)", self.directory, len(keys), added, removed)


# --------------------------------------------------------------------------- ZAP handler


@dataclass(frozen=True)
class ZapDecision:
    status: bytes  # b"200" accepted, b"400" refused, b"500" the handler failed
    text: str
    user_id: bytes = b""


class Authenticator(ServiceThread):
    """The ZAP handler of one zmq context: accepts CURVE clients whose key is on the allow-list.

    `start()` returns once the handler is bound (ConfigError if the context already has one);
    `stop()` is idempotent and joins the thread, which closes its socket with linger 0. Stop it
    before terminating the context. Usable as a context manager."""

    def __init__(
        self,
        context: zmq.Context[Any],
        allow_list: AllowList,
        domain: str | None = DEFAULT_DOMAIN,
        name: str = "zswarm-zap",
    ) -> None:
        super().__init__(name, context)
        self.allow_list = allow_list
        self.domain = None if domain is None else domain.encode()  # None: answer any domain
        self.accepted = 0
        self.refused = 0
        self._sock: zmq.Socket[Any] | None = None
        self._refusals = RateLimitedLog(log, interval_s=5.0)

    def __enter__(self) -> Authenticator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- service side

    def setup(self) -> None:
        # REP, not ROUTER: libzmq sends one request per handshake and waits for its reply, and REP keeps
        # the envelope for us. Each request is answered before the next is read.
        sock = make_socket(self.context, zmq.REP)
        try:
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    "this zmq context already has a ZAP handler (inproc://zeromq.zap.01)"
                ) from None
            raise ConfigError(f"cannot bind the ZAP handler: {exc.strerror}") from None
        self._sock = sock
        self.poller.register(sock, zmq.POLLIN)
        log.debug("%s: ZAP handler bound", self.name)

    def run_once(self, timeout_ms: int) -> None:
        sock = self._sock
        assert sock is not None
        events = dict(self.poller.poll(timeout_ms))
        if sock not in events:
            return
        for _ in range(100):  # bounded, so that stop() is seen even under a connection storm
            try:
                request = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            decision = self.decide(request)
            request_id = request[1] if len(request) > 1 else b""
            sock.send_multipart(
                [ZAP_VERSION, request_id, decision.status, decision.text.encode(), decision.user_id, b""]
            )

    def teardown(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def decide(self, request: list[bytes]) -> ZapDecision:
        """The answer to one ZAP request (RFC 27): accept a listed CURVE key, refuse all else."""
        try:
            decision = self._decide(request)
        except Exception:
            # Fail closed: an answer must go back (REP), and it must not be a yes.
            log.exception("%s: error deciding on a ZAP request", self.name)
            decision = ZapDecision(b"500", "internal error")
        address = request[3].decode("utf-8", "replace") if len(request) > 3 else "?"
        if decision.status == b"200":
            self.accepted += 1
            log.debug("%s: accepted %s from %s", self.name, decision.user_id.decode(), address)
        else:
            self.refused += 1
            self._refusals.warning("%s: refused a client from %s: %s", self.name, address, decision.text)
        return decision

    def _decide(self, request: list[bytes]) -> ZapDecision:
        if len(request) < 6:
            return ZapDecision(b"400", "malformed ZAP request")
        version, _request_id, domain, _address, _routing_id, mechanism, *credentials = request
        if version != ZAP_VERSION:
            return ZapDecision(b"400", "unsupported ZAP version")
        if self.domain is not None and domain != self.domain:
            return ZapDecision(b"400", f"unknown ZAP domain {domain!r}")
        if mechanism != b"CURVE":
            return ZapDecision(
                b"400", f"mechanism {mechanism.decode('ascii', 'replace')} refused: CURVE required"
            )
        if len(credentials) != 1 or len(credentials[0]) != KEY_LENGTH:
            return ZapDecision(b"400", "malformed CURVE credentials")
        key = z85.encode(credentials[0])
        if not self.allow_list.contains(key):
            return ZapDecision(b"400", f"key {key.decode()} is not on the allow-list")
        return ZapDecision(b"200", "OK", user_id=key)


# --------------------------------------------------------------------------- sockets


def apply_server(sock: zmq.Socket[Any], keys: KeyPair, domain: str = DEFAULT_DOMAIN) -> None:
    """Make `sock` a CURVE server that authenticates clients through ZAP. Call before bind().

    ZAP_ENFORCE_DOMAIN makes the handshake fail when the context has no ZAP handler, instead of
    accepting any client key (libzmq's default)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def apply_client(sock: zmq.Socket[Any], keys: KeyPair, server_public_key: str | bytes) -> None:
    """Make `sock` a CURVE client of the server whose public key is given. Call before connect()."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, z85_key(server_public_key))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def peer_identity(frame: zmq.Frame) -> str | None:
    """The sender's public key (Z85) that ZAP attached to a received frame, or None without one.

    Receive with copy=False to get Frames. None on a connection that ZAP did not vouch for."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None  # EINVAL: no such property (NULL mechanism, no ZAP)
    if not isinstance(user_id, str) or not user_id:
        return None
    return user_id


@dataclass(frozen=True)
class SecurityConfig:
    """Where a node's CURVE material lives. Servers need `allow_dir`; clients of a known server
    (peers of the broker) need `server_key_file`."""

    secret_key_file: Path  # this node's NAME.key_secret (mode 0600)
    public_key_file: Path | None = None  # this node's NAME.key: checked against the secret if given
    allow_dir: Path | None = None  # folder of client NAME.key files this node's servers accept
    server_key_file: Path | None = None  # the public NAME.key of the server this node connects to
    domain: str = DEFAULT_DOMAIN

    def load_keys(self) -> KeyPair:
        keys = load_secret(self.secret_key_file)
        if self.public_key_file is not None and load_public(self.public_key_file) != keys.public:
            raise ConfigError(f"{self.public_key_file}: not the public key of {self.secret_key_file}")
        return keys

    def load_server_key(self) -> bytes:
        if self.server_key_file is None:
            raise ConfigError("no server public key file configured")
        return load_public(self.server_key_file)

    def allow_list(self, check_interval_s: float = 0.5) -> AllowList:
        if self.allow_dir is None:
            raise ConfigError("no allow-list folder configured (needed to accept clients)")
        return AllowList(self.allow_dir, check_interval_s)
