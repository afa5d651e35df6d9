"""Unit tests of the bounds of issue 9 that need no sockets: what a peer puts in `register`, the
reply budget's accounting, the client identities, the session's token and sequence numbers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from common import protocol
from common.protocol import MAX_HOLDINGS, MAX_REQUEST_RUNS, REGISTER_MAX_BYTES, Pong, Register, Registered
from common.transport import ReplyBudget
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
