"""BrokerSession: a peer's dialog with the broker, as a state machine with no I/O and no clock.

Theory of operation
-------------------
    UNREGISTERED --register--> REGISTERING --registered--> REGISTERED
          ^                         |  (no answer: retry          |
          |                         |   every broker_timeout_s)   |
          +----- the broker forgot us (pong known=false, a new ---+
                 session id, a not_registered error)
    any state --leave()--> LEAVING --bye answered or timed out--> LEFT   (final: never registers again)

Every request carries a request id (`rid`); the session keeps the table of requests in flight,
each with its deadline and an opaque token naming who waits for the answer (a transfer, an API
call). A reply or a timeout comes back as `Delivered(token, reply or None)` for the shell to
route. While registered, a heartbeat is due every interval the broker asked for, carrying the
registration's secret `token` and a sequence number that grows with every beat (the broker
refuses a beat without them: nobody else can keep this peer alive or replay its beats). Every
heartbeat-expiry period a `ping` finds out whether the broker still knows this peer (it may have
restarted), and its `pong` names the files this peer was reported to refuse (`Recheck`): the
peer re-verifies and announces them again, so a false report never costs it its claim for good.
So a restarted broker relearns the swarm from the peers, with no operator. `leave()` is final:
after `bye` nothing registers again, whatever arrives late.

The shell builds the `register` message itself (`SendRegister`): only it can read the store's
holdings and the serving endpoint.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import protocol
from common.errors import WireCode
from common.protocol import Bye, Error, Message, Ping, Pong, Registered


class SessionState(enum.Enum):
    UNREGISTERED = "unregistered"
    REGISTERING = "registering"
    REGISTERED = "registered"
    LEAVING = "leaving"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class SendTracker:
    """Send this request to the broker's tracker (DEALER)."""

    message: Message


@dataclass(frozen=True, slots=True)
class SendRegister:
    """Build `register` with this rid (holdings from the store, the serving endpoint) and send it."""

    rid: int


@dataclass(frozen=True, slots=True)
class PublishHeartbeat:
    """Publish a heartbeat now, with the session's `token` and `heartbeat_seq` (just advanced)."""


@dataclass(frozen=True, slots=True)
class Recheck:
    """The broker heard that this peer refused segments of these files: re-verify what is held
    of them and announce it again."""

    file_ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class ConnectHeartbeat:
    """Publish heartbeats to this endpoint (the broker named it at registration)."""

    endpoint: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """The answer to a request (None: it timed out), for whoever `token` names."""

    token: Any
    reply: Message | None


@dataclass(frozen=True, slots=True)
class RegistrationChanged:
    """An event: registered (True) or not any more (False), with why."""

    registered: bool
    why: str


@dataclass(frozen=True, slots=True)
class Left:
    """An event: `bye` was answered or timed out; the session is over."""


@dataclass(frozen=True, slots=True)
class BrokerSilent:
    """An event: the broker did not answer a registration or a ping in time."""

    what: str


SessionCommand = (
    SendTracker
    | SendRegister
    | PublishHeartbeat
    | Recheck
    | ConnectHeartbeat
    | Delivered
    | RegistrationChanged
    | BrokerSilent
    | Left
)


@dataclass
class _Pending:
    deadline: float
    token: Any
    sent_at: float = 0.0


NAME_TAKEN_RETRY_S = 0.25

_REGISTER = object()  # tokens of the session's own requests
_PING = object()
_BYE = object()


class BrokerSession:
    def __init__(self, broker_timeout_s: float, now: float) -> None:
        self.broker_timeout_s = broker_timeout_s
        self.state = SessionState.UNREGISTERED
        self.session_id = 0
        self.heartbeat_interval_s = 1.0
        self.heartbeat_liveness = 3
        self.heartbeat_endpoint: str | None = None
        self.token = b""  # the secret of the current registration, for heartbeats
        self.heartbeat_seq = 0  # the last heartbeat's sequence number (never goes down)
        self.pending: dict[int, _Pending] = {}
        self._next_rid = 1
        self._last_pong = now
        self._next_heartbeat = now
        self._next_register = now
        self._ping_out = False
        self._silence_reported = False
        # The smallest broker round trip since registering (0 until one is seen): the path's
        # delay, how far this peer is from the others; transfers size their requests by it.
        # The smallest, not a recent one: replies that waited behind this peer's own busy
        # uplink (a shaped link queues for tens of ms) or a busy tracker read more, and
        # longer requests there would only lengthen those queues.
        self._round_trip = math.inf

    @property
    def registered(self) -> bool:
        return self.state is SessionState.REGISTERED

    @property
    def leaving(self) -> bool:
        return self.state in (SessionState.LEAVING, SessionState.LEFT)

    # ---- requests

    def request(
        self, make: Callable[[int], Message], token: Any, now: float, timeout_s: float | None = None
    ) -> list[SessionCommand]:
        """Send a request; its answer comes back as Delivered(token, reply). Raises what encoding
        the message raises (MalformedMessage), before anything is recorded."""
        rid = self._next_rid
        message = make(rid)
        protocol.encode(message)  # a message that cannot be sent must leave no trace
        self._take_rid()
        self.pending[rid] = _Pending(now + (timeout_s or self.broker_timeout_s), token, now)
        return [SendTracker(message)]

    def _take_rid(self) -> int:
        rid = self._next_rid
        self._next_rid = rid + 1 if rid < protocol.MAX_RID else 1
        return rid

    def on_reply(self, reply: Message, now: float) -> list[SessionCommand]:
        commands: list[SessionCommand] = []
        if self._silence_reported:
            self._silence_reported = False
        pending = self.pending.pop(getattr(reply, "rid", -1), None)
        if pending is None:
            return commands  # a reply that came after its request timed out
        self._note_round_trip(now - pending.sent_at)
        if isinstance(reply, Error) and reply.code == WireCode.NOT_REGISTERED:
            commands += self._lost("the broker does not know this peer", now)
        token = pending.token
        if token is _REGISTER:
            return commands + self._on_registered(reply, now)
        if token is _PING:
            self._ping_out = False
            self._last_pong = now
            if isinstance(reply, Pong) and (not reply.known or reply.session != self.session_id):
                commands += self._lost("the broker restarted or forgot this peer", now)
            elif isinstance(reply, Pong) and reply.recheck and self.registered:
                commands.append(Recheck(reply.recheck))
            return commands
        if token is _BYE:
            self.state = SessionState.LEFT
            return [*commands, Left()]
        return [*commands, Delivered(token, reply)]

    def _note_round_trip(self, seconds: float) -> None:
        self._round_trip = min(self._round_trip, seconds)

    @property
    def round_trip_s(self) -> float:
        return self._round_trip if self._round_trip != math.inf else 0.0

    # ---- registration

    def register(self, now: float) -> list[SessionCommand]:
        """(Re-)register now, with everything the store holds (start, rescan)."""
        if self.leaving:
            return []
        was = self.state
        self.state = SessionState.REGISTERING
        self._round_trip = math.inf  # perhaps another path, or another broker: measured anew
        self._next_register = now + self.broker_timeout_s
        rid = self._take_rid()
        self.pending[rid] = _Pending(now + self.broker_timeout_s, _REGISTER, now)
        commands: list[SessionCommand] = [SendRegister(rid)]
        if was is SessionState.REGISTERED:
            commands.insert(0, RegistrationChanged(False, "registering again"))
        return commands

    def _on_registered(self, reply: Message, now: float) -> list[SessionCommand]:
        if self.leaving:
            return []
        if not isinstance(reply, Registered):
            # Refused. A name still held by this peer's previous life (it crashed, no bye) frees
            # itself within a heartbeat expiry: ask again soon. Anything else: as after a timeout.
            self.state = SessionState.UNREGISTERED
            taken = isinstance(reply, Error) and reply.code == WireCode.NAME_TAKEN
            self._next_register = now + (
                min(NAME_TAKEN_RETRY_S, self.broker_timeout_s) if taken else self.broker_timeout_s
            )
            why = getattr(reply, "message", type(reply).__name__)
            return [RegistrationChanged(False, f"registration refused: {why}")]
        self.state = SessionState.REGISTERED
        self.session_id = reply.session
        self.token = reply.token
        self._last_pong = now
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        self.heartbeat_liveness = reply.heartbeat_liveness
        commands: list[SessionCommand] = []
        if reply.heartbeat_endpoint != self.heartbeat_endpoint:
            self.heartbeat_endpoint = reply.heartbeat_endpoint
            commands.append(ConnectHeartbeat(reply.heartbeat_endpoint))
        self._next_heartbeat = now
        return [*commands, RegistrationChanged(True, "registered"), *self.tick(now)]

    def _lost(self, why: str, now: float) -> list[SessionCommand]:
        if self.leaving or self.state is SessionState.REGISTERING:
            return []
        self.state = SessionState.UNREGISTERED
        return [RegistrationChanged(False, why), *self.register(now)]

    # ---- leaving

    def leave(self, now: float, timeout_s: float) -> list[SessionCommand]:
        """Say bye (final). Requests in flight still get their answers or timeouts."""
        if self.leaving:
            return [Left()] if self.state is SessionState.LEFT else []
        self.state = SessionState.LEAVING
        rid = self._take_rid()
        self.pending[rid] = _Pending(now + timeout_s, _BYE, now)
        return [SendTracker(Bye(rid))]

    # ---- time

    def silence_s(self) -> float:
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def tick(self, now: float) -> list[SessionCommand]:
        commands: list[SessionCommand] = []
        for rid in [rid for rid, p in self.pending.items() if p.deadline <= now]:
            token = self.pending.pop(rid).token
            if token is _REGISTER:
                if self.state is SessionState.REGISTERING:
                    self.state = SessionState.UNREGISTERED
                    commands.append(BrokerSilent("registration"))
            elif token is _PING:
                self._ping_out = False
                if not self._silence_reported:
                    self._silence_reported = True
                    commands.append(BrokerSilent("ping"))
            elif token is _BYE:
                self.state = SessionState.LEFT
                commands.append(Left())
            else:
                commands.append(Delivered(token, None))
        state = self.state
        if state is SessionState.UNREGISTERED and now >= self._next_register:
            commands += self.register(now)
        elif state is SessionState.REGISTERED:
            if now >= self._next_heartbeat:
                self.heartbeat_seq += 1
                commands.append(PublishHeartbeat())
                self._next_heartbeat = now + self.heartbeat_interval_s
            if not self._ping_out and now - self._last_pong >= self.silence_s():
                self._ping_out = True
                rid = self._take_rid()
                self.pending[rid] = _Pending(now + self.silence_s(), _PING, now)
                commands.append(SendTracker(Ping(rid)))
        return commands

    def next_deadline(self, now: float) -> float | None:
        """The nearest deadline still ahead (those past were acted on by the last tick)."""
        deadlines = [p.deadline for p in self.pending.values()]
        if self.state is SessionState.UNREGISTERED:
            deadlines.append(self._next_register)
        elif self.state is SessionState.REGISTERED:
            deadlines.append(self._next_heartbeat)
            if not self._ping_out:
                deadlines.append(self._last_pong + self.silence_s())
        upcoming = [d for d in deadlines if d > now]
        return min(upcoming) if upcoming else None
