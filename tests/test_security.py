"""common.security: key files, the allow-list, and the ZAP handler with real CURVE sockets on 127.0.0.1.

Every test has its own zmq context (destroyed with linger 0 after its authenticators are stopped),
binds to ports the OS picks, and waits only through polls with deadlines."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.auth
from zmq.utils import z85

from common import keygen
from common.errors import ConfigError
from common.security import (
    AllowList,
    Authenticator,
    KeyPair,
    SecurityConfig,
    apply_client,
    apply_server,
    generate_keypair,
    load_public,
    load_secret,
    peer_identity,
    z85_key,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
QUIET_MS = 1000  # how long "no answer at all" is watched for


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@dataclass
class Node:
    name: str
    keys: KeyPair
    public_file: Path
    secret_file: Path


@dataclass
class World:
    root: Path
    allow_dir: Path
    server: Node

    def node(self, name: str, listed: bool = True) -> Node:
        public_file, secret_file = generate_keypair(self.root / "nodes", name)
        if listed:
            self.allow(public_file)
        return Node(name, load_secret(secret_file), public_file, secret_file)

    def allow(self, public_file: Path) -> None:
        shutil.copyfile(public_file, self.allow_dir / public_file.name)

    def disallow(self, public_file: Path) -> None:
        (self.allow_dir / public_file.name).unlink()


@pytest.fixture
def world(tmp_path: Path) -> World:
    allow_dir = tmp_path / "allow"
    allow_dir.mkdir()
    public_file, secret_file = generate_keypair(tmp_path / "server", "server")
    return World(tmp_path, allow_dir, Node("server", load_secret(secret_file), public_file, secret_file))


@pytest.fixture
def start_auth(zctx: zmq.Context[Any], world: World) -> Iterator[Callable[..., Authenticator]]:
    started: list[Authenticator] = []

    def start(**kwargs: Any) -> Authenticator:
        allow_list = kwargs.pop("allow_list", None) or AllowList(world.allow_dir)
        auth = Authenticator(zctx, allow_list, **kwargs)
        started.append(auth)
        auth.start()
        return auth

    yield start
    for auth in started:  # before zctx is destroyed: the thread must close its own socket
        auth.stop()


def curve_server(ctx: zmq.Context[Any], kind: int, server: Node) -> tuple[zmq.Socket[Any], str]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    apply_server(sock, server.keys)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    return sock, f"tcp://127.0.0.1:{port}"


def curve_client(
    ctx: zmq.Context[Any], kind: int, node: Node | None, server_key: bytes, endpoint: str
) -> zmq.Socket[Any]:
    """A client socket: CURVE with `node`'s keys, or NULL when node is None."""
    sock: zmq.Socket[Any] = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if node is not None:
        apply_client(sock, node.keys, server_key)
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket[Any], timeout_ms: int) -> list[zmq.Frame] | None:
    if not sock.poll(timeout_ms):
        return None
    return sock.recv_multipart(copy=False)


def ping_until_received(
    client: zmq.Socket[Any], server: zmq.Socket[Any], timeout: float
) -> list[zmq.Frame] | None:
    """Send a ping every 100 ms until the server receives one (drained afterwards) or the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client.send(b"ping", zmq.NOBLOCK)
        frames = receive(server, 100)
        if frames is not None:
            while server.poll(50):
                server.recv_multipart()
            return frames
    return None


def zap_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "zswarm-zap" and t.is_alive()]


# --------------------------------------------------------------------------- CURVE + ZAP with sockets


def test_listed_dealer_reaches_router_and_is_named_by_user_id(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    alice = world.node("alice")
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    dealer = curve_client(zctx, zmq.DEALER, alice, world.server.keys.public, endpoint)

    dealer.send_multipart([b"hello", b"body"])
    frames = receive(router, 10_000)
    assert frames is not None, "the listed client's message never arrived"
    assert [f.bytes for f in frames[1:]] == [b"hello", b"body"]
    # Every frame, the routing id included, carries the key ZAP vouched for.
    assert {peer_identity(f) for f in frames} == {alice.keys.public_text}

    router.send_multipart([frames[0].bytes, b"welcome"])
    assert dealer.poll(10_000), "no reply through the CURVE connection"
    assert dealer.recv_multipart() == [b"welcome"]
    assert auth.accepted == 1 and auth.refused == 0


def test_listed_pub_reaches_sub_server_and_is_named_by_user_id(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    bob = world.node("bob")
    start_auth()
    sub, endpoint = curve_server(zctx, zmq.SUB, world.server)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub = curve_client(zctx, zmq.PUB, bob, world.server.keys.public, endpoint)

    # PUB drops what it sends before the connection (and subscription) is up: repeat until seen.
    frames = ping_until_received(pub, sub, timeout=10.0)
    assert frames is not None, "the listed publisher's heartbeat never arrived"
    assert peer_identity(frames[0]) == bob.keys.public_text


def test_unlisted_client_gets_nothing_and_is_counted(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    mallory = world.node("mallory", listed=False)
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    dealer = curve_client(zctx, zmq.DEALER, mallory, world.server.keys.public, endpoint)

    dealer.send(b"let me in")
    assert receive(router, QUIET_MS) is None
    wait_for(lambda: auth.refused >= 1, 10.0, "the refusal to be counted")
    assert auth.accepted == 0


def test_null_client_gets_nothing(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    dealer = curve_client(zctx, zmq.DEALER, None, world.server.keys.public, endpoint)
    dealer.send(b"plain text")
    assert receive(router, QUIET_MS) is None
    assert auth.accepted == 0


def test_client_with_wrong_server_key_gets_nothing(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    carol = world.node("carol")  # listed: only the server key is wrong
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    impostor_key, _ = zmq.curve_keypair()
    dealer = curve_client(zctx, zmq.DEALER, carol, impostor_key, endpoint)
    dealer.send(b"hello?")
    assert receive(router, QUIET_MS) is None
    assert auth.accepted == 0


def test_without_a_zap_handler_the_server_fails_closed(zctx: zmq.Context[Any], world: World) -> None:
    # libzmq's default would accept any client key here; ZAP_ENFORCE_DOMAIN (apply_server) refuses.
    dave = world.node("dave")
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    dealer = curve_client(zctx, zmq.DEALER, dave, world.server.keys.public, endpoint)
    dealer.send(b"anyone home?")
    assert receive(router, QUIET_MS) is None


@pytest.mark.parametrize("mechanism", ["NULL", "PLAIN"])
def test_null_and_plain_are_refused_by_the_handler(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator], mechanism: str
) -> None:
    # A server socket that asks ZAP without CURVE (a wiring mistake) must not let anyone in.
    auth = start_auth()
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ZAP_DOMAIN, b"zswarm")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if mechanism == "PLAIN":
        router.setsockopt(zmq.PLAIN_SERVER, 1)
        dealer.setsockopt(zmq.PLAIN_USERNAME, b"admin")
        dealer.setsockopt(zmq.PLAIN_PASSWORD, b"secret")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    assert receive(router, QUIET_MS) is None
    wait_for(lambda: auth.refused >= 1, 10.0, f"the {mechanism} refusal to be counted")
    assert auth.accepted == 0


def test_plain_null_sockets_without_zap_domain_are_not_affected(
    zctx: zmq.Context[Any], start_auth: Callable[..., Authenticator]
) -> None:
    # Internal plumbing in the same context (no ZAP_DOMAIN) never reaches the handler.
    auth = start_auth()
    router = zctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"internal")
    frames = receive(router, 10_000)
    assert frames is not None
    assert peer_identity(frames[-1]) is None  # no ZAP: no identity
    assert auth.accepted == auth.refused == 0


def attempt(
    ctx: zmq.Context[Any], node: Node, server: Node, router: zmq.Socket[Any], endpoint: str, timeout_ms: int
) -> list[zmq.Frame] | None:
    """One new connection with `node`'s key: what the server received from it, or None."""
    dealer = curve_client(ctx, zmq.DEALER, node, server.keys.public, endpoint)
    try:
        dealer.send(b"attempt")
        return receive(router, timeout_ms)
    finally:
        dealer.close(linger=0)


def test_unlisted_client_is_not_retried_by_libzmq(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    # Why a refused client must reconnect by itself: the failed handshake is final.
    from zmq.utils.monitor import recv_monitor_message

    olga = world.node("olga", listed=False)
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    apply_client(dealer, olga.keys, world.server.keys.public)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    try:
        dealer.connect(endpoint)
        assert monitor.poll(10_000), "no handshake failure reported"
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400
        world.allow(olga.public_file)
        assert receive(router, QUIET_MS) is None  # listed now, but this connection is over
        assert auth.refused == 1
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)


def test_key_added_at_run_time_is_accepted_for_new_connections(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    erin = world.node("erin", listed=False)
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    assert attempt(zctx, erin, world.server, router, endpoint, 300) is None
    wait_for(lambda: auth.refused >= 1, 10.0, "erin to be refused")

    world.allow(erin.public_file)
    added = time.monotonic()
    while True:
        assert time.monotonic() - added < 5.0, "a key added to the allow-list was not accepted within 5 s"
        frames = attempt(zctx, erin, world.server, router, endpoint, 200)
        if frames is not None:
            break
    assert peer_identity(frames[-1]) == erin.keys.public_text
    logging.getLogger(__name__).info("key added -> accepted in %.2f s", time.monotonic() - added)


def test_key_removed_refuses_new_connections(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    frank = world.node("frank")
    auth = start_auth()
    router, endpoint = curve_server(zctx, zmq.ROUTER, world.server)
    old = curve_client(zctx, zmq.DEALER, frank, world.server.keys.public, endpoint)
    assert ping_until_received(old, router, timeout=10.0) is not None

    world.disallow(frank.public_file)
    removed = time.monotonic()
    while True:
        assert time.monotonic() - removed < 5.0, "a removed key was still accepted after 5 s"
        refused_before = auth.refused
        if attempt(zctx, frank, world.server, router, endpoint, 300) is None:
            assert auth.refused > refused_before
            break
    logging.getLogger(__name__).info("key removed -> refused in %.2f s", time.monotonic() - removed)
    # ZAP runs at the handshake only: the connection made while the key was listed stays up.
    assert ping_until_received(old, router, timeout=5.0) is not None


# --------------------------------------------------------------------------- Authenticator


def test_authenticator_stops_cleanly_and_context_terminates(world: World) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        auth = Authenticator(ctx, AllowList(world.allow_dir))
        auth.start()
        assert len(zap_threads()) == 1
        router, _ = curve_server(ctx, zmq.ROUTER, world.server)
        router.close(linger=0)
        auth.stop()
        auth.stop()  # idempotent
        assert zap_threads() == []
        terminator = threading.Thread(target=ctx.term, name="test-term", daemon=True)
        terminator.start()
        terminator.join(5.0)
        assert not terminator.is_alive(), "context did not terminate: a socket was left open"
    finally:
        if not ctx.closed:
            ctx.destroy(linger=0)


def test_authenticator_context_manager_and_stop_without_start(zctx: zmq.Context[Any], world: World) -> None:
    Authenticator(zctx, AllowList(world.allow_dir)).stop()  # never started: harmless
    with Authenticator(zctx, AllowList(world.allow_dir)) as auth:
        assert auth.alive
    assert not auth.alive and zap_threads() == []


def test_second_authenticator_in_one_context_is_a_config_error(
    zctx: zmq.Context[Any], world: World, start_auth: Callable[..., Authenticator]
) -> None:
    start_auth()
    second = Authenticator(zctx, AllowList(world.allow_dir))
    with pytest.raises(ConfigError, match="already has a ZAP handler"):
        second.start()
    second.stop()
    assert len(zap_threads()) == 1


def test_decide_refuses_malformed_and_foreign_requests(world: World, zctx: zmq.Context[Any]) -> None:
    listed = world.node("gina")
    raw = z85.decode(listed.keys.public)
    auth = Authenticator(zctx, AllowList(world.allow_dir))  # decide() needs no thread

    def status(*frames: bytes) -> bytes:
        return auth.decide(list(frames)).status

    good = [b"1.0", b"7", b"zswarm", b"127.0.0.1", b"", b"CURVE", raw]
    assert auth.decide(good).user_id == listed.keys.public
    assert status(*good) == b"200"
    assert status(b"2.0", *good[1:]) == b"400"  # version
    assert status(*good[:2], b"other", *good[3:]) == b"400"  # domain
    assert status(*good[:5], b"NULL") == b"400"
    assert status(*good[:5], b"PLAIN", b"user", b"password") == b"400"
    assert status(*good[:6], raw[:31]) == b"400"  # credentials
    assert status(*good[:6], raw, raw) == b"400"
    assert status(b"1.0", b"7") == b"400"  # too short
    stranger = z85.decode(zmq.curve_keypair()[0])
    assert status(*good[:6], stranger) == b"400"
    assert (auth.accepted, auth.refused) == (2, 8)
    any_domain = Authenticator(zctx, auth.allow_list, domain=None)
    assert any_domain.decide([*good[:2], b"", *good[3:]]).status == b"200"

    def broken(key: str | bytes) -> bool:
        raise OSError("disk on fire")

    auth.allow_list.contains = broken  # type: ignore[method-assign]
    assert status(*good) == b"500"  # a failing handler fails closed
    assert auth.refused == 9
    auth.stop()  # never started: releases its wake-up pipe
    any_domain.stop()


# --------------------------------------------------------------------------- AllowList


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_allow_list_checks_the_folder_at_most_once_per_interval(world: World) -> None:
    clock = FakeClock()
    allow = AllowList(world.allow_dir, check_interval_s=0.5, clock=clock)
    hana = world.node("hana", listed=False)
    assert not allow.contains(hana.keys.public)
    world.allow(hana.public_file)
    clock.now += 0.4
    assert not allow.contains(hana.keys.public)  # not checked again yet
    clock.now += 0.1
    assert allow.contains(hana.keys.public)
    assert allow.contains(hana.keys.public_text)  # str
    assert allow.contains(z85.decode(hana.keys.public))  # raw 32 bytes, as ZAP gives it
    world.disallow(hana.public_file)
    clock.now += 0.5
    assert not allow.contains(hana.keys.public)
    assert not allow.contains("not a key") and not allow.contains(b"\x00" * 5)


def test_allow_list_skips_bad_files_logging_each_once(world: World, caplog: pytest.LogCaptureFixture) -> None:
    good = world.node("ivan")
    secret_copy = world.allow_dir / good.secret_file.name
    shutil.copyfile(good.secret_file, secret_copy)
    (world.allow_dir / "garbage.key").write_text("this is not a certificate\n")
    (world.allow_dir / "badz85.key").write_text('curve\n    public-key = "short"\n')
    (world.allow_dir / "README.txt").write_text("ignored, not a key file\n")
    (world.allow_dir / "folder.key").mkdir()  # not a file: ignored
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="common.security"):
        allow = AllowList(world.allow_dir, clock=clock)
        for _ in range(5):
            clock.now += 1.0
            assert allow.contains(good.keys.public)
    assert allow.keys() == {good.keys.public}
    messages = [r.getMessage() for r in caplog.records]
    assert sum("garbage.key" in m for m in messages) == 1
    assert sum("badz85.key" in m for m in messages) == 1
    assert sum("secret key file" in m for m in messages) == 1
    assert not any("README" in m for m in messages)


def test_allow_list_folder_missing(tmp_path: Path, world: World) -> None:
    with pytest.raises(ConfigError, match="allow-list folder does not exist"):
        AllowList(tmp_path / "nope")
    jack = world.node("jack")
    clock = FakeClock()
    allow = AllowList(world.allow_dir, clock=clock)
    assert allow.contains(jack.keys.public)
    shutil.rmtree(world.allow_dir)
    clock.now += 1.0
    assert not allow.contains(jack.keys.public)  # fail closed, no crash


# --------------------------------------------------------------------------- key files


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_generated_modes_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        public_file, secret_file = generate_keypair(tmp_path / "keys", "kim")
    finally:
        os.umask(old)
    assert (public_file.name, secret_file.name) == ("kim.key", "kim.key_secret")
    assert mode_of(secret_file) == 0o600
    assert mode_of(public_file) == 0o644
    keys = load_secret(secret_file)
    assert load_public(public_file) == keys.public
    assert zmq.curve_public(keys.secret) == keys.public
    assert keys.secret.decode() not in repr(keys)  # never in a log line


def test_zmq_tools_read_our_files_and_we_read_theirs(tmp_path: Path) -> None:
    public_file, secret_file = generate_keypair(tmp_path, "lee")
    keys = load_secret(secret_file)
    assert zmq.auth.load_certificate(public_file) == (keys.public, None)
    assert zmq.auth.load_certificate(secret_file) == (keys.public, keys.secret)

    old_umask = os.umask(0o022)
    try:
        theirs_public, theirs_secret = map(Path, zmq.auth.create_certificates(tmp_path, "theirs"))
    finally:
        os.umask(old_umask)
    assert mode_of(theirs_secret) == 0o644  # why we write our own files, and insist on 0600
    with pytest.raises(ConfigError, match="chmod 600"):
        load_secret(theirs_secret)
    os.chmod(theirs_secret, 0o600)
    assert load_secret(theirs_secret).public == load_public(theirs_public)


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    public_file, secret_file = generate_keypair(tmp_path, "mia")
    before = (public_file.read_bytes(), secret_file.read_bytes())
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "mia")
    public_file.unlink()  # half a pair left: still refused, the secret is kept
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_keypair(tmp_path, "mia")
    assert secret_file.read_bytes() == before[1]
    with pytest.raises(ConfigError, match="bad key name"):
        generate_keypair(tmp_path, "../escape")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_secret_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    _, secret_file = generate_keypair(tmp_path, "ned")
    os.chmod(secret_file, mode)
    with pytest.raises(ConfigError) as info:
        load_secret(secret_file)
    message = str(info.value)
    assert "\n" not in message
    assert str(secret_file) in message and f"chmod 600 {secret_file}" in message
    os.chmod(secret_file, 0o400)  # read-only for the owner is fine, as with ssh
    load_secret(secret_file)


def test_key_file_errors_are_one_line(tmp_path: Path) -> None:
    public_file, secret_file = generate_keypair(tmp_path, "ola")
    other_public, _ = generate_keypair(tmp_path, "pam")

    def write(name: str, text: str, mode: int = 0o600) -> Path:
        path = tmp_path / name
        path.write_text(text)
        os.chmod(path, mode)
        return path

    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00")
    secret_text = secret_file.read_text()
    mismatched = secret_text.replace(load_public(public_file).decode(), load_public(other_public).decode())
    cases: list[tuple[Callable[[Path], object], Path, str]] = [
        (load_public, tmp_path / "missing.key", "no such key file"),
        (load_secret, tmp_path / "missing.key_secret", "no such key file"),
        (load_public, write("empty.key", ""), "no public-key line"),
        (load_public, write("junk.key", "hello\nworld\n"), "no public-key line"),
        (load_public, write("short.key", 'public-key = "abc"\n'), "not a 40-character Z85 key"),
        (load_public, write("twice.key", public_file.read_text() * 2), "second public-key line"),
        (load_public, secret_file, "holds a secret key"),
        (load_secret, write("pub.key_secret", public_file.read_text()), "no secret-key line"),
        (load_secret, write("mixed.key_secret", mismatched), "does not belong"),
        (load_public, binary, "not UTF-8"),
        (load_public, tmp_path, "not a regular file"),
    ]
    for loader, path, expected in cases:
        with pytest.raises(ConfigError) as info:
            loader(path)
        message = str(info.value)
        assert expected in message, (path, message)
        assert str(path) in message and "\n" not in message, message


def test_z85_key_forms() -> None:
    public, _ = zmq.curve_keypair()
    raw = z85.decode(public)
    assert z85_key(public) == z85_key(public.decode()) == z85_key(raw) == public
    bad_keys: list[str | bytes] = ["", "x" * 39, "x" * 32, "é" * 40, b"\x00" * 40, "~" * 40]
    for bad in bad_keys:
        with pytest.raises(ValueError):
            z85_key(bad)


def test_security_config(world: World, tmp_path: Path) -> None:
    quinn = world.node("quinn")
    config = SecurityConfig(
        secret_key_file=quinn.secret_file,
        public_key_file=quinn.public_file,
        allow_dir=world.allow_dir,
        server_key_file=world.server.public_file,
    )
    assert config.load_keys() == quinn.keys
    assert config.load_server_key() == world.server.keys.public
    assert config.allow_list().contains(quinn.keys.public)
    wrong = SecurityConfig(secret_key_file=quinn.secret_file, public_key_file=world.server.public_file)
    with pytest.raises(ConfigError, match="not the public key of"):
        wrong.load_keys()
    with pytest.raises(ConfigError, match="no server public key"):
        wrong.load_server_key()
    with pytest.raises(ConfigError, match="no allow-list folder"):
        wrong.allow_list()


def test_peer_identity_without_zap_is_none() -> None:
    assert peer_identity(zmq.Frame(b"not received from a socket")) is None


# --------------------------------------------------------------------------- zswarm-keygen


def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "keys"
    assert keygen.main(["rita", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    keys = load_secret(folder / "rita.key_secret")
    assert out == [
        f"public key file: {folder / 'rita.key'}",
        f"secret key file: {folder / 'rita.key_secret'}",
        f"public key: {keys.public_text}",
    ]
    assert keygen.main(["rita", "--dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "refusing to overwrite" in err


def test_keygen_as_a_module(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "common.keygen", "sam", "--dir", str(tmp_path)]
    ok = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert mode_of(tmp_path / "sam.key_secret") == 0o600
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and again.stdout == ""
