"""Unit tests of the bounds of issue 9 that need no sockets: what a peer puts in `register`, the
reply budget's accounting, the client identities, the session's token and sequence numbers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from common import protocol
from common.protocol import MAX_HOLDINGS, MAX_REQUEST_RUNS, REGISTER_MAX_BYTES, Pong, Register, Registered
from common.segserver import BUDGET_POLL_S, CLIENT_WINDOW, SegmentServer, _Waiting
from common.transport import ReplyBudget, Transport
from peer.agent import fit_register
from peer.session import BrokerSession, PublishHeartbeat, Recheck, SendRegister

pytestmark = pytest.mark.timeout(30)

EP = "tcp://127.0.0.1:5555"


def fid(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


def test_register_is_fitted_to_the_protocols_bounds() -> None:
    # Many files with fragmented holdings: far more than one register may carry.
    holdings = [(fid(i), [(3 * k, 2) for k in range(40)]) for i in range(3000)]
    fitted, rest = fit_register(holdings, len("p1") + len(EP) + 64)
    frame = protocol.encode(Register(1, "p1", EP, tuple(fitted)))[0]
    assert len(frame) <= REGISTER_MAX_BYTES
    assert sum(len(h.runs) for h in fitted) <= MAX_REQUEST_RUNS and len(fitted) <= MAX_HOLDINGS
    assert protocol.decode_request([frame]).holdings == tuple(fitted)  # type: ignore[attr-defined]
    # Everything left out (or cut short) is announced after registering.
    covered = {h.file_id for h in fitted if len(h.runs) == 40}
    assert covered | set(rest) == {f for f, _ in holdings}
    # A few small holdings fit whole.
    small = [(fid(i), [(0, 10)]) for i in range(5)]
    assert fit_register(small, 100) == ([protocol.Holding(f, tuple(r)) for f, r in small], [])


@dataclass
class FakeTracker:
    done: bool = False


def test_reply_budget_counts_bytes_until_written_out() -> None:
    budget = ReplyBudget(per_client=10, total=15, window=2)
    items = budget._items  # filled by hand: send() needs a socket
    assert budget.allows("a", 10)  # nothing queued: one reply always fits (total permitting)
    t1, t2 = FakeTracker(), FakeTracker()
    items["a"] = [(t1, 6)]  # type: ignore[list-item]
    budget._bytes["a"], budget.total = 6, 6
    assert not budget.allows("a", 5)  # 11 > 10 for this client
    assert budget.allows("a", 4)
    items["a"].append((t2, 4))  # type: ignore[arg-type]
    budget._bytes["a"], budget.total = 10, 10
    assert not budget.allows("a", 0)  # its window of 2 replies is full
    assert not budget.allows("b", 6)  # 16 > 15 in all
    assert budget.allows("b", 5)
    t1.done = True  # libzmq wrote the first one out
    assert budget.outstanding("a") == 4 and budget.total == 4 and budget.allows("a", 6)
    t2.done = True
    budget.prune_all()
    assert budget.tracked == 0 and budget.total == 0


def test_the_session_carries_the_token_and_a_growing_sequence() -> None:
    session = BrokerSession(broker_timeout_s=5.0, now=0.0)
    commands = session.register(0.0)
    rid = commands[0].rid  # type: ignore[union-attr]
    token = b"T" * 16
    out = session.on_reply(Registered(rid, 7, EP, 1.0, 3, token), 0.0)
    assert session.token == token and any(isinstance(c, PublishHeartbeat) for c in out)
    first = session.heartbeat_seq
    session.tick(1.0)
    session.tick(2.0)
    assert session.heartbeat_seq == first + 2
    # Pings follow the pongs, whatever else arrives; a pong's recheck reaches the driver.
    ping = [c for c in session.tick(3.0) if getattr(getattr(c, "message", None), "OP", "") == "ping"]
    assert ping
    ping_rid = ping[0].message.rid  # type: ignore[attr-defined]
    out = session.on_reply(Pong(ping_rid, 7, True, (b"F" * 32,)), 3.1)
    assert out == [Recheck((b"F" * 32,))]
    # A new registration, a new token; the sequence never goes down.
    before = session.heartbeat_seq
    rid = next(c.rid for c in session.register(4.0) if isinstance(c, SendRegister))
    session.on_reply(Registered(rid, 7, EP, 1.0, 3, b"U" * 16), 4.0)
    assert session.token == b"U" * 16 and session.heartbeat_seq > before


class _NoReads:
    def read_run(self, file_id: bytes, first: int, count: int) -> None:
        return None

    def fetching(self, file_id: bytes) -> bool:
        return False

    def holds(self, file_id: bytes, first: int, count: int) -> bool:
        return False

    def expecting(self, file_id: bytes) -> bool:
        return False


def test_a_server_waiting_for_replies_to_drain_looks_less_often_until_one_has() -> None:
    # libzmq does not say when a reply has left: the server looks, 2 ms after a look that served
    # something, twice as long after each that did not (up to 32 ms), so a slow link does not
    # wake it 500 times a second.
    transport = Transport("t")
    server = SegmentServer("s", transport, _NoReads(), "127.0.0.1", 0)  # type: ignore[arg-type]
    server.setup()
    try:
        sock = server._sock
        assert sock is not None
        tracker = FakeTracker()
        server.budget._items["ip:a"] = [(tracker, 1 << 20)] * CLIENT_WINDOW  # type: ignore[list-item]
        server.budget._bytes["ip:a"] = server.budget.total = CLIENT_WINDOW << 20
        request = protocol.SegmentRequest(fid(1), 0, 1)
        server._enqueue(_Waiting("ip:a", [b"a", b""], request, 0.0, time.monotonic()), fresh=True)
        waits = []
        for _ in range(6):
            server.run_once(0)  # a look: the window is full, nothing is served
            waits.append(server._budget_poll_s)
        assert waits == [0.004, 0.008, 0.016, 0.032, 0.032, 0.032]
        now = time.monotonic()
        assert 32 <= server.next_timeout_ms(now) <= 33
        tracker.done = True  # the replies left: the next look serves the request
        server.run_once(0)
        assert server._queued_count == 0 and server._budget_poll_s == BUDGET_POLL_S
    finally:
        server.teardown()
        transport.close(1.0)
