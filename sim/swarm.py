"""The in-memory swarm: the real tracker and peer cores on a simulated clock and network.

Theory of operation
-------------------
`SimSwarm` wires one `Tracker` (broker/tracker.py) and N `SimPeer`s (each a `PeerDriver`,
peer/driver.py, the same class the real agent extends) together, with no sockets and no wall
clock. Time is an event heap: every message is an event at the time it would arrive, every core
is woken at the deadline it reports. Messages are the protocol's own message objects (not
encoded: the codec has its own tests), so the policy that runs here is the policy that runs on
the wire, line for line; only the I/O below `PeerDriver` (the `io_*` methods) is simulated.

Links. Every host has an uplink and a downlink capacity (bits/s) and a one-way latency. Segment
data crosses the sender's uplink as a FIFO (a reply occupies it for its wire size over the
rate, after whatever is queued before it) and then the receiver's downlink (likewise), so a
host's total rate is exact and a busy uplink delays what is queued behind it, as `tc tbf` does;
the share between flows is first come first served rather than TCP's fair share (see
docs/ARCHITECTURE.md, "What the simulation leaves out"). Wire size is payload x 1.045 plus a
header: Ethernet, IP and TCP headers on 1448-byte segments, which is what `tc` counts. Control
messages (requests, tracker dialog, heartbeats) take the latency only.

Data. Payloads are views of one shared buffer of zeros, of the right length, so a download of
1 GiB moves no bytes; `SimManifest` verifies a payload by where its bytes come from (a lying
peer's buffer fails) instead of hashing. Everything else (lengths, runs, missing segments,
refusals, timeouts, plans, relay trees, endgame) is the real code's.

Faults: `kill` (a peer stops answering anything and heartbeats stop), `pause`/`resume` (SIGSTOP:
it neither reads nor sends until resumed, then handles its backlog), `lie` (it serves bytes that
fail verification), `restart_broker` (a new tracker with an empty registry and a new session id).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from blake3 import blake3

from broker.tracker import SLOW_RELAY_FACTOR, Tracker, TrackerSettings
from common.errors import WireCode
from common.manifest import DIGEST_SIZE, SEGMENT_SIZE, Manifest, segment_count
from common.metrics import Metrics, PeakRate
from common.protocol import (
    MAX_RUN_SEGMENTS,
    Error,
    FileEntry,
    Holding,
    Message,
    Register,
    SegmentData,
)
from common.ranges import Run, SegmentSet
from common.segserver import PARK_MAX_S
from peer.driver import GetFuture, Job, PeerDriver
from peer.session import RegistrationChanged
from peer.transfer import Command, GetResult, SendRequest, TransferSettings, TransferState, Write

WIRE_OVERHEAD = 1.045  # (1448 + 66) / 1448: headers per full TCP segment, as tc counts bytes
MAX_COARSE_SEGMENT = 2 << 20  # the coarse mode's largest segment (SimSettings.coarse)
DEFAULT_LATENCY_S = 0.0001  # one-way, every host: a LAN (python -m sim --latency-ms for others)
WIRE_HEADER_BYTES = 200  # ZMTP frames, msgpack header, TCP ack traffic: per message
_GOOD_BYTES = bytes(MAX_RUN_SEGMENTS * SEGMENT_SIZE)
_BAD_BYTES = bytes(MAX_RUN_SEGMENTS * SEGMENT_SIZE)
_GOOD = memoryview(_GOOD_BYTES)
_BAD = memoryview(_BAD_BYTES)
ORIGIN = "broker"


class SimManifest(Manifest):
    """A manifest whose verification looks at where a simulated payload came from: bytes from a
    lying peer fail, bytes from anyone else pass; lengths are checked as for real data."""

    def segment_size_error(self) -> str | None:
        # The coarse mode's segments (SimSettings.coarse) are multiples of the protocol's.
        if self.segment_size % SEGMENT_SIZE:
            return f"segment size {self.segment_size} is not a multiple of {SEGMENT_SIZE}"
        return None

    def split_verified(self, first: int, count: int, data: bytes | memoryview) -> tuple[list[Run], list[Run]]:
        if not count:
            return [], []
        if isinstance(data, memoryview) and data.obj is _BAD_BYTES:
            return [], [(first, count)]
        if len(data) >= self.run_length(first, count):
            return [(first, count)], []
        whole = len(data) // self.segment_size
        good = [(first, whole)] if whole else []
        return good, [(first + whole, count - whole)]


def sim_manifest(name: str, size: int, seed: int = 0, segment_size: int = SEGMENT_SIZE) -> SimManifest:
    """A manifest for a file of `size` bytes whose content is never materialised: its digests
    are pseudo-random (distinct per segment), its file_id their blake3 as usual."""
    n = segment_count(size, segment_size)
    digests = blake3(f"zswarm-sim-{name}-{seed}".encode()).digest(length=n * DIGEST_SIZE)
    return SimManifest(name=name, size=size, digests=digests, segment_size=segment_size)


# --------------------------------------------------------------------------- clock and links


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self.events = 0

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(when, self.now), next(self._seq), fn, args))

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Run every event due by `until` (then the clock reads `until`), or until `stop()`."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, fn, args = heapq.heappop(heap)
            self.now = when
            self.events += 1
            fn(*args)
            if stop():
                return
        self.now = max(self.now, until)


class Host:
    """A machine: an uplink shared fairly by the flows it sends (processor sharing, as TCP
    connections share a `tc tbf` uplink), a downlink capacity and a one-way latency."""

    def __init__(
        self,
        clock: Clock,
        name: str,
        up_bps: float,
        down_bps: float = math.inf,
        latency_s: float = DEFAULT_LATENCY_S,
    ):
        self.clock = clock
        self.name = name
        self.up_Bps = up_bps / 8
        self.down_Bps = down_bps / 8
        self.latency_s = latency_s
        self.flows: list[Flow] = []  # sending now
        self.incoming = 0  # flows arriving now (for the downlink share)
        # The same flows, in the order they started: a host whose downlink share changes finds
        # their senders here, not by a pass over every host's flows (which made asymmetric
        # links, where every downlink is capped, cost 3.4x the time of uniform ones at N = 1,000).
        self.inbound: dict[Flow, None] = {}
        self.payload_sent = 0
        self.wire_sent = 0
        self.timeline: list[tuple[float, int]] = []  # (time, payload sent so far)
        self._last = 0.0
        self._version = 0
        self._armed_at = math.inf  # when the pending completion timer fires (inf: none)

    def send(self, nbytes: int, to: Host, on_arrival: Callable[[], None]) -> Flow:
        """Start sending `nbytes` of payload to `to`; `on_arrival` runs when the last byte is in."""
        flow = Flow(self, to, nbytes, nbytes * WIRE_OVERHEAD + WIRE_HEADER_BYTES, on_arrival)
        self._advance()
        self.flows.append(flow)
        to.incoming += 1
        to.inbound[flow] = None
        self._retime(to)
        return flow

    def cancel(self, flow: Flow) -> None:
        """The connection closed: what was not sent yet is never sent."""
        if flow.done or flow not in self.flows:
            return
        self._advance()
        self.flows.remove(flow)
        flow.done = True
        flow.to.incoming -= 1
        flow.to.inbound.pop(flow, None)
        self.wire_sent += int(flow.wire - flow.remaining)
        self._retime(flow.to)

    def _advance(self) -> None:
        now = self.clock.now
        elapsed = now - self._last
        if elapsed > 0:
            for flow in self.flows:
                flow.remaining -= flow.rate * elapsed
        self._last = now

    def _retime(self, changed: Host | None = None) -> None:
        """New rates for this uplink's flows, and for the flows into a host whose downlink share
        changed; then one timer at this uplink's next completion."""
        self._rate_flows()
        self._arm()
        if changed is not None and changed.down_Bps != math.inf:
            for host in dict.fromkeys(f.origin for f in changed.inbound if f.origin is not self):
                host._advance()
                host._rate_flows()
                host._arm()

    def _rate_flows(self) -> None:
        flows = self.flows
        if not flows:
            return
        share = self.up_Bps / len(flows)
        for flow in flows:
            to = flow.to
            flow.rate = share if to.down_Bps == math.inf else min(share, to.down_Bps / max(to.incoming, 1))

    def _arm(self) -> None:
        """A timer at this uplink's next completion. A new flow slows the others, so the next
        completion often moves later: the timer already pending is kept (it fires early, finds
        nothing finished and arms again) instead of pushing another and leaving the first to
        fire stale; at 300 peers two thirds of the timer events were stale ones."""
        if not self.flows:
            return
        now = self.clock.now
        when = now + min(max(f.remaining, 0.0) / f.rate for f in self.flows)
        if now <= self._armed_at <= when:
            return
        self._version += 1
        self._armed_at = when
        self.clock.at(when, self._on_timer, self._version)

    def _on_timer(self, version: int) -> None:
        if version != self._version:
            return
        self._armed_at = math.inf
        self._advance()
        finished = [f for f in self.flows if f.remaining <= 1e-3]
        if not finished:
            self._arm()
            return
        now = self.clock.now
        changed: dict[Host, None] = {}  # in order: the same run, the same events
        for flow in finished:
            self.flows.remove(flow)
            flow.done = True
            flow.to.incoming -= 1
            flow.to.inbound.pop(flow, None)
            changed[flow.to] = None
            self.payload_sent += flow.nbytes
            self.wire_sent += int(flow.wire)
            self.clock.at(now + self.latency_s, flow.on_arrival)
        self.timeline.append((now, self.payload_sent))
        self._rate_flows()
        self._arm()
        for host in changed:
            if host.down_Bps != math.inf:
                self._retime(host)


class Flow:
    __slots__ = ("done", "nbytes", "on_arrival", "origin", "rate", "remaining", "to", "wire")

    def __init__(
        self, origin: Host, to: Host, nbytes: int, wire: float, on_arrival: Callable[[], None]
    ) -> None:
        self.origin, self.to, self.nbytes, self.wire = origin, to, nbytes, wire
        self.remaining = wire
        self.rate = 0.0
        self.done = False
        self.on_arrival = on_arrival


# --------------------------------------------------------------------------- peers


class SimPeer(PeerDriver):
    def __init__(self, swarm: SimSwarm, host: Host, name: str, settings: TransferSettings) -> None:
        super().__init__(name, settings, Metrics(), swarm.clock.now, manifest_type=SimManifest)
        self.publish_progress = False
        self.swarm = swarm
        self.host = host
        self.endpoint = f"tcp://{host.name}:7000"
        self.routing_id = name.encode()
        self.held: dict[bytes, SegmentSet] = {}
        self.manifests: dict[bytes, Manifest] = {}
        self.alive = True
        self.lying = False
        self.paused = False
        self._backlog: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self._wake_at = math.inf
        self._parked: dict[bytes, list[_Parked]] = {}  # requests waiting for segments being fetched
        self._upload_peak = PeakRate()
        self.done_at: dict[str, float] = {}
        self.futures: dict[str, GetFuture] = {}
        self.errors: dict[str, str] = {}

    # ---- time

    @property
    def now(self) -> float:
        return self.swarm.clock.now

    def after_input(self) -> None:
        """What the agent's loop does after every wake-up: tick, then sleep until the deadline."""
        if not self.alive or self.paused:
            return
        now = self.now
        self.tick(now)
        deadline = self.next_deadline(now)
        if deadline is not None and deadline < self._wake_at:
            self._wake_at = deadline
            self.swarm.clock.at(deadline, self._on_wake, deadline)

    def _on_wake(self, scheduled: float) -> None:
        if scheduled != self._wake_at:
            return  # a later input re-armed an earlier or later wake-up
        self._wake_at = math.inf
        self.after_input()

    def _input(self, fn: Callable[..., None], *args: Any) -> None:
        if not self.alive:
            return
        if self.paused:
            self._backlog.append((fn, args))
            return
        fn(*args)
        self.after_input()

    # ---- starting

    def start(self) -> None:
        now = self.now
        self.apply_session(self.session.register(now), now)
        self.after_input()

    def get(self, name: str, timeout_s: float = 3600.0) -> GetFuture:
        future = self.start_get(name, timeout_s, lambda: None, self.now)
        start = self.now

        def done(f: Future[GetResult]) -> None:
            if f.cancelled():
                self.errors[name] = "cancelled"
            elif f.exception() is not None:
                self.errors[name] = str(f.exception())
            else:
                self.done_at[name] = self.now - start

        future.add_done_callback(done)
        self.after_input()
        return future

    def start_download(self, name: str) -> None:
        """`get`, as a clock event (the future is kept in `futures`)."""
        self.futures[name] = self.get(name)

    def seed(self, manifest: Manifest) -> None:
        """Hold a complete copy before starting (as if downloaded earlier)."""
        self.manifests[manifest.file_id] = manifest
        self.held[manifest.file_id] = SegmentSet.full(manifest.segment_count)

    # ---- I/O for the driver

    def io_send_tracker(self, message: Message) -> None:
        self.swarm.to_tracker(self, message)

    def io_send_register(self, rid: int) -> None:
        holdings = tuple(Holding(fid, tuple(held.runs())) for fid, held in self.held.items() if held)
        self.io_send_tracker(Register(rid, self.peer_name, self.endpoint, holdings))

    def io_publish_heartbeat(self) -> None:
        self.swarm.heartbeat(self, int(self._upload_peak.sample(self.now, self.host.payload_sent)))

    def io_held_runs(self, file_id: bytes) -> list[tuple[int, int]]:
        held = self.held.get(file_id)
        return held.runs() if held is not None else []

    def io_connect_heartbeat(self, endpoint: str) -> None:
        pass

    def on_registration_event(self, change: RegistrationChanged) -> None:
        pass

    def io_send_request(self, job: Job, command: SendRequest) -> None:
        request = command.request
        server = self.swarm.servers[command.endpoint]
        key = (id(self), id(job), request.id)
        self.swarm._open[key] = None
        self.swarm.clock.at(
            self.now + self.host.latency_s,
            server.on_segment_request,
            self,
            job,
            key,
            command.file_id,
            request.first,
            request.count,
        )

    def io_abandon_request(self, job: Job, request_id: int) -> None:
        """The REQ socket is closed: a request not yet read is never served, a reply being sent
        stops, a reply already on its way is dropped."""
        flow = self.swarm._open.pop((id(self), id(job), request_id), None)
        if flow is not None:
            flow.origin.cancel(flow)

    def io_write(self, job: Job, command: Write, now: float) -> list[Command]:
        manifest = job.transfer.manifest
        assert manifest is not None
        held = self.held.setdefault(manifest.file_id, SegmentSet())
        held.add(command.first, command.count)
        job.transfer.on_written(command.source, command.first, command.count)
        parked = self._parked.get(manifest.file_id)
        if parked:
            ready = [p for p in parked if held.covers(p.first, p.count)]
            for p in ready:
                parked.remove(p)
                self._serve(p.client, p.job, p.key, manifest.file_id, p.first, p.count)
        return []

    def io_prepare(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        self.manifests[manifest.file_id] = manifest
        held = self.held.setdefault(manifest.file_id, SegmentSet()).copy()
        return job.transfer.on_prepared(held, now)

    def io_finish(self, job: Job, manifest: Manifest, now: float) -> list[Command]:
        return job.transfer.on_finished(Path(manifest.name), now)

    def io_load_manifest(self, file_id: bytes) -> Manifest | None:
        return self.manifests.get(file_id)

    def io_cached_manifest(self, name: str) -> Manifest | None:
        return next((m for m in self.manifests.values() if m.name == name), None)

    # ---- deliveries (called by the clock)

    def receive_tracker(self, reply: Message) -> None:
        self._input(lambda: self.on_tracker_reply(reply, self.now))

    def receive_segment(self, job: Job, request_id: int, reply: Message) -> None:
        self._input(lambda: self.on_segment_reply(job, request_id, reply, self.now))

    # ---- serving

    def on_segment_request(
        self, client: SimPeer, job: Job, key: tuple[int, int, int], file_id: bytes, first: int, count: int
    ) -> None:
        if not self.alive:
            return
        if self.paused:
            self._backlog.append((self.on_segment_request, (client, job, key, file_id, first, count)))
            return
        held = self.held.get(file_id)
        fetching = self._fetching(file_id)
        if (fetching and (held is None or not held.covers(first, count))) or self._expecting(file_id):
            # A relay parent: hold the request until the segments are here (cut-through); or a
            # parent whose own plan is on its way (common/segserver.py, `_may_park`).
            self._parked.setdefault(file_id, []).append(_Parked(client, job, key, first, count))
            self.swarm.clock.at(self.now + PARK_MAX_S, self._park_expired, file_id, key)
            return
        self._serve(client, job, key, file_id, first, count, fetching)

    def _serve(
        self,
        client: SimPeer,
        job: Job,
        key: tuple[int, int, int],
        file_id: bytes,
        first: int,
        count: int,
        fetching: bool | None = None,
    ) -> None:
        """`fetching`: `_fetching(file_id)` if the caller knows it already."""
        held = self.held.get(file_id)
        manifest = self.manifests.get(file_id)
        later = self._fetching(file_id) if fetching is None else fetching
        self.swarm.serve(
            self.host, client, job, key, file_id, first, count, held, manifest, self.lying, later
        )

    def _fetching(self, file_id: bytes) -> bool:
        return any(
            j.transfer.state is TransferState.FETCHING
            and j.transfer.manifest is not None
            and j.transfer.manifest.file_id == file_id
            for j in self.jobs.values()
        )

    def _expecting(self, file_id: bytes) -> bool:
        return file_id not in self.manifests and any(
            j.transfer.manifest is None and j.transfer.state is TransferState.PLANNING
            for j in self.jobs.values()
        )

    def _park_expired(self, file_id: bytes, key: tuple[int, int, int]) -> None:
        parked = self._parked.get(file_id, [])
        for p in parked:
            if p.key == key:
                parked.remove(p)
                if self.alive and not self.paused:
                    self._serve(p.client, p.job, p.key, file_id, p.first, p.count)
                return

    # ---- faults

    def kill(self) -> None:
        self.alive = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        backlog, self._backlog = self._backlog, []
        for fn, args in backlog:
            fn(*args)
        self.after_input()


@dataclass(frozen=True)
class _Parked:
    client: SimPeer
    job: Job
    key: tuple[int, int, int]
    first: int
    count: int


class SimOrigin:
    """The broker's origin segment server: it holds every file of the catalog."""

    def __init__(self, swarm: SimSwarm, host: Host) -> None:
        self.swarm = swarm
        self.host = host
        self.endpoint = f"tcp://{host.name}:5557"

    def on_segment_request(
        self, client: SimPeer, job: Job, key: tuple[int, int, int], file_id: bytes, first: int, count: int
    ) -> None:
        manifest = self.swarm.manifests_by_id.get(file_id)
        held = SegmentSet.full(manifest.segment_count) if manifest is not None else None
        self.swarm.serve(self.host, client, job, key, file_id, first, count, held, manifest, False)


# --------------------------------------------------------------------------- the swarm


class SimCatalog:
    """The tracker's view of the broker's files, in memory."""

    def __init__(self) -> None:
        self.files: dict[str, _Entry] = {}

    def by_name(self, name: str) -> _Entry | None:
        return self.files.get(name)

    def by_id(self, file_id: bytes) -> _Entry | None:
        return next((e for e in self.files.values() if e.manifest.file_id == file_id), None)

    def entries(self) -> Sequence[_Entry]:
        return list(self.files.values())

    def rebuilding(self, name: str) -> bool:
        return False


@dataclass(frozen=True)
class _Entry:
    manifest: Manifest


@dataclass
class SimSettings:
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    plan_block_segments: int = 64
    origin_lanes: int = 2
    relay_fanout: int = 4
    slow_relay_factor: float = SLOW_RELAY_FACTOR
    download_idle_s: float = 2.0
    plan_policy: str = "swarm"
    peer: TransferSettings = field(default_factory=TransferSettings)
    # The coarse mode: files cut into segments this large (16 KiB: the protocol's). Segment
    # counts in the settings are scaled by `coarse` to keep their sizes in bytes.
    segment_size: int = SEGMENT_SIZE

    def coarse(self, segment_size: int) -> SimSettings:
        """These settings for a swarm whose files are cut into `segment_size` segments (a
        multiple of 16 KiB): plan blocks and requests keep their sizes in bytes (one segment at
        least). A 1 GiB file in 1 MiB segments costs the simulator about what 16 MiB costs in
        16 KiB ones; what it gives up is every effect smaller than a segment (a relay forwards
        a segment once it holds all of it). docs/ARCHITECTURE.md says how close it stays."""
        if segment_size % SEGMENT_SIZE:
            raise ValueError(f"segment size {segment_size} is not a multiple of {SEGMENT_SIZE}")
        if segment_size > MAX_COARSE_SEGMENT:
            raise ValueError(
                f"segment size {segment_size} is above {MAX_COARSE_SEGMENT}: the coarse mode predicts "
                "the same swarm up to 1 MiB segments (2 MiB: within 8%); with 4 MiB, 100 downloads of "
                "1 GiB did not finish in an hour of simulated time"
            )
        scale = segment_size // SEGMENT_SIZE
        return replace(
            self,
            segment_size=segment_size,
            plan_block_segments=max(1, self.plan_block_segments // scale),
            peer=replace(self.peer, batch_segments=max(1, self.peer.batch_segments // scale)),
        )

    @classmethod
    def defaults(cls) -> SimSettings:
        """The defaults of the real configs (BrokerConfig, PeerConfig), field by field."""
        from broker.config import BrokerConfig
        from peer.config import PeerConfig

        broker = {name: f.default for name, f in BrokerConfig.model_fields.items()}
        peer = {name: f.default for name, f in PeerConfig.model_fields.items()}
        return cls(
            heartbeat_interval_s=broker["heartbeat_interval_s"],
            heartbeat_liveness=broker["heartbeat_liveness"],
            plan_block_segments=broker["plan_block_segments"],
            origin_lanes=broker["origin_lanes"],
            relay_fanout=broker["relay_fanout"],
            slow_relay_factor=broker["slow_relay_factor"],
            download_idle_s=broker["download_idle_s"],
            plan_policy=broker["plan_policy"],
            peer=TransferSettings(
                batch_segments=peer["batch_segments"],
                lanes_per_source=peer["lanes_per_source"],
                request_timeout_s=peer["request_timeout_s"],
                have_flush_interval_s=peer["have_flush_interval_s"],
                replan_interval_s=peer["replan_interval_s"],
                broker_timeout_s=peer["broker_timeout_s"],
            ),
        )


class SimSwarm:
    def __init__(
        self,
        settings: SimSettings | None = None,
        origin_up_bps: float = 100e6,
        seed: int = 0,
        latency_s: float = DEFAULT_LATENCY_S,
    ) -> None:
        """`latency_s`: every host's one-way delay, the broker's and (unless `add_peer` says
        otherwise) the peers': a request between two hosts takes twice this to come back, plus
        its bytes' time on the links."""
        self.settings = settings or SimSettings()
        self.clock = Clock()
        self.rng = random.Random(seed)
        self.latency_s = latency_s
        self.broker_host = Host(self.clock, "broker", origin_up_bps, latency_s=latency_s)
        self._open: dict[tuple[int, int, int], Flow | None] = {}  # requests whose reply is wanted
        self.catalog = SimCatalog()
        self.manifests_by_id: dict[bytes, Manifest] = {}
        self.origin = SimOrigin(self, self.broker_host)
        self.peers: dict[str, SimPeer] = {}
        self.by_routing: dict[bytes, SimPeer] = {}
        self.servers: dict[str, SimPeer | SimOrigin] = {self.origin.endpoint: self.origin}
        self.tracker = self._new_tracker(session=1)
        self._tracker_wake = math.inf

    def _new_tracker(self, session: int) -> Tracker:
        s = self.settings
        return Tracker(
            TrackerSettings(
                heartbeat_endpoint="tcp://broker:5556",
                origin_endpoint=self.origin.endpoint,
                heartbeat_interval_s=s.heartbeat_interval_s,
                heartbeat_liveness=s.heartbeat_liveness,
                plan_policy=s.plan_policy,
                plan_block_segments=s.plan_block_segments,
                origin_lanes=s.origin_lanes,
                relay_fanout=s.relay_fanout,
                slow_relay_factor=s.slow_relay_factor,
                download_idle_s=s.download_idle_s,
            ),
            self.catalog,
            session,
            Metrics(),
        )

    # ---- building

    def add_file(self, name: str, size: int) -> SimManifest:
        manifest = sim_manifest(name, size, segment_size=self.settings.segment_size)
        self.catalog.files[name] = _Entry(manifest)
        self.manifests_by_id[manifest.file_id] = manifest
        return manifest

    def add_peer(
        self,
        name: str,
        up_bps: float,
        down_bps: float = math.inf,
        latency_s: float | None = None,
        settings: TransferSettings | None = None,
        start: bool = True,
    ) -> SimPeer:
        latency = self.latency_s if latency_s is None else latency_s
        host = Host(self.clock, name, up_bps, down_bps, latency)
        peer = SimPeer(self, host, name, settings or self.settings.peer)
        self.peers[name] = peer
        self.by_routing[peer.routing_id] = peer
        self.servers[peer.endpoint] = peer
        if start:
            peer.start()
        return peer

    # ---- the tracker side

    def to_tracker(self, peer: SimPeer, message: Message) -> None:
        self.clock.at(self.clock.now + peer.host.latency_s, self._tracker_receive, peer, message)

    def _tracker_receive(self, peer: SimPeer, message: Message) -> None:
        now = self.clock.now
        for routing_id, reply in self.tracker.on_request(message, peer.routing_id, now):
            target = self.by_routing.get(routing_id)
            if target is not None:
                self.clock.at(now + target.host.latency_s, target.receive_tracker, reply)
        self._arm_tracker()

    def heartbeat(self, peer: SimPeer, up_bps: int) -> None:
        token, seq = peer.session.token, peer.session.heartbeat_seq
        self.clock.at(
            self.clock.now + peer.host.latency_s, self._on_heartbeat, peer.peer_name, token, seq, up_bps
        )

    def _on_heartbeat(self, name: str, token: bytes, seq: int, up_bps: int) -> None:
        self.tracker.on_heartbeat(name, token, seq, self.clock.now, up_bps)
        self.tracker.on_origin_upload(self.broker_host.payload_sent, self.clock.now)

    def _arm_tracker(self) -> None:
        deadline = self.tracker.next_deadline()
        if deadline is not None and deadline < self._tracker_wake:
            self._tracker_wake = deadline
            self.clock.at(deadline, self._tracker_tick, deadline)

    def _tracker_tick(self, scheduled: float) -> None:
        if scheduled != self._tracker_wake:
            return
        self._tracker_wake = math.inf
        self.tracker.tick(self.clock.now)
        self._arm_tracker()

    def restart_broker(self) -> None:
        """The broker process restarts: a new tracker, nothing registered, a new session id."""
        self.tracker = self._new_tracker(session=self.tracker.session + 1)
        self._tracker_wake = math.inf

    def list_files(self) -> list[FileEntry]:
        return [
            FileEntry(e.manifest.name, e.manifest.size, e.manifest.file_id) for e in self.catalog.entries()
        ]

    # ---- serving segments

    def serve(
        self,
        host: Host,
        client: SimPeer,
        job: Job,
        key: tuple[int, int, int],
        file_id: bytes,
        first: int,
        count: int,
        held: SegmentSet | None,
        manifest: Manifest | None,
        lying: bool,
        later: bool = False,
    ) -> None:
        if key not in self._open:
            return  # the client closed that socket before the request was read
        present = held.intersect_run(first, count) if held is not None and manifest is not None else []
        reply: Message
        if manifest is None or (not present and not later):
            reply = Error(0, WireCode.NOT_HELD, "none of these segments is held")
            self.clock.at(self.clock.now + host.latency_s, self._deliver, client, job, key, reply)
            return
        absent: tuple[Run, ...]
        if len(present) == 1 and present[0] == (first, count):  # all of it: the common case
            nbytes, absent = manifest.run_length(first, count), ()
        else:
            nbytes = sum(manifest.run_length(f, c) for f, c in present)
            absent = tuple(SegmentSet(present).missing_in_run(first, count))
        if nbytes > len(_GOOD):
            raise ValueError(f"a {nbytes}-byte reply: the simulator's payloads stop at {len(_GOOD)}")
        payload = (_BAD if lying else _GOOD)[:nbytes]
        missing, not_yet = ((), absent) if later else (absent, ())
        reply = SegmentData(file_id, first, count, missing, not_yet, payload=payload)
        if not nbytes:
            self.clock.at(self.clock.now + host.latency_s, self._deliver, client, job, key, reply)
            return
        self._open[key] = host.send(nbytes, client.host, lambda: self._deliver(client, job, key, reply))

    def _deliver(self, client: SimPeer, job: Job, key: tuple[int, int, int], reply: Message) -> None:
        if self._open.pop(key, "closed") == "closed":
            return  # abandoned: its socket was closed, the reply is dropped
        client.receive_segment(job, key[2], reply)

    # ---- running

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        self.clock.run(until, stop)

    def run_until_done(self, name: str, peers: Sequence[SimPeer], limit_s: float) -> bool:
        """Run until every peer in `peers` finished (or failed) `name`, or `limit_s` of sim time."""
        waiting = [p for p in peers if name not in p.done_at and name not in p.errors]
        checked = [0]

        # Checked at every event for a few peers; for many, every `every` events: a full pass
        # over a thousand peers at every event would cost more than the events.
        every = 1 if len(waiting) <= 8 else 256

        def all_done() -> bool:
            checked[0] += 1
            if checked[0] % every:
                return False
            while waiting and (name in waiting[-1].done_at or name in waiting[-1].errors):
                waiting.pop()
            return not waiting or all(name in p.done_at or name in p.errors for p in waiting)

        self.run(self.clock.now + limit_s, all_done)
        return all(name in p.done_at or name in p.errors for p in peers)

    def origin_copies(self, manifest: Manifest) -> float:
        return self.broker_host.payload_sent / manifest.size if manifest.size else 0.0


def result_of(future: GetFuture) -> GetResult:
    return future.result(0)
