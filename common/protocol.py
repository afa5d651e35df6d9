"""Every zswarm wire message, and the one codec that encodes and validates them.

Theory of operation
-------------------
A message is a list of frames. Frame 0 is a msgpack map, the header: `op` names the message and
the other keys are its fields. Segment bytes never go inside msgpack: a `data` reply carries them
as frame 1, one payload frame for a whole run of segments, because per-frame cost (not bytes)
limits Python here. ROUTER envelopes (routing id, empty delimiter) belong to the socket shells,
not to this module.

`decode` trusts nothing: it bounds frame sizes before unpacking, catches every unpack error,
refuses duplicate keys and ext types, checks the key set exactly, and checks every field's type
(a bool is not an int), range and length. Anything wrong raises `MalformedMessage` and nothing
else, so that a shell can count it, log it and carry on. `encode` runs the same checks on the way
out, so a bug here is caught by the sender, not by the peer at the other end.

Tracker requests come from anyone who can reach the port, and msgpack builds ~70 bytes of Python
objects per byte of a frame of nested empty lists. So `decode_request` bounds a request's frame
by its op (REQUEST_MAX_BYTES) before decoding its fields, and reads a frame over
STREAM_DECODE_BYTES field by field (`_Reader`, each Field's `stream`): a list's length is checked
before its items are read, and nothing is built that the schema would refuse. A `register` or a
`have` of the most the protocol allows (65,536 runs) decodes in ~40 ms.

docs/PROTOCOL.md is the normative description; this module must agree with it.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar

import msgpack

from common.errors import MalformedMessage
from common.manifest import DIGEST_SIZE, SEGMENT_SIZE, check_name
from common.ranges import Run

PROTOCOL_VERSION = 2

MAX_SEGMENTS = 1 << 26  # 1 TiB files
MAX_FILE_SIZE = MAX_SEGMENTS * SEGMENT_SIZE
MAX_RUN_SEGMENTS = 1024  # 16 MiB in one data reply
MAX_RUNS = 1 << 20
MAX_REQUEST_RUNS = 1 << 16  # runs in one tracker request: have, lost, bad_source; register in total
MAX_HOLDINGS = 1 << 16  # holdings in one register
MAX_RID = (1 << 32) - 1
MAX_SESSION = (1 << 64) - 1
MAX_SEQ = (1 << 64) - 1
TOKEN_SIZE = 16  # the secret a registration returns; heartbeats carry it
KEY_SIZE = 32  # a CURVE public key, raw
MAX_RECHECK = 64  # file ids one pong may ask to be re-verified and announced again
DEFAULT_MAX_HEADER_BYTES = 64 * 1024 * 1024  # a 2 TiB manifest's digests would not fit: fine
MAX_NAME_LEN = 64
MAX_ERROR_MESSAGE = 1000
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ENDPOINT_PATTERN = re.compile(r"^tcp://[A-Za-z0-9.\-:\[\]]{1,255}:[0-9]{1,5}$")

# Tracker requests: the largest frame each op may have, checked before its fields are decoded (a
# frame of nested empty lists decodes to ~70 times its size in Python objects). `have`, `lost` and
# `bad_source` fit MAX_REQUEST_RUNS runs of the widest encoding (11 bytes each); a `register` must
# fit REGISTER_MAX_BYTES, whatever it holds: a peer announces what does not fit with `have`.
REGISTER_MAX_BYTES = 1024 * 1024
RUNS_REQUEST_MAX_BYTES = 768 * 1024
REQUEST_MAX_BYTES: dict[str, int] = {
    "register": REGISTER_MAX_BYTES,
    "have": RUNS_REQUEST_MAX_BYTES,
    "lost": RUNS_REQUEST_MAX_BYTES,
    "bad_source": RUNS_REQUEST_MAX_BYTES,
    "get": 8 * 1024,
}
SMALL_REQUEST_MAX_BYTES = 1024  # list, stats, ping, bye
MAX_REQUEST_BYTES = max(REQUEST_MAX_BYTES.values())  # the tracker socket's frame limit
STREAM_DECODE_BYTES = 4096  # request frames above this are decoded field by field (no bombs)

T = TypeVar("T")


# --------------------------------------------------------------------------- field validators


_CONTAINER_BYTES = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_EXT_BYTES = frozenset([0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8])
_ARRAY_BYTES = frozenset([*range(0x90, 0xA0), 0xDC, 0xDD])
_MAP_BYTES = frozenset([*range(0x80, 0x90), 0xDE, 0xDF])


class _Reader:
    """Reads one msgpack frame object by object, so that a field is checked before the next one
    is decoded and no list or map is built before its length is known to be allowed: a request
    frame full of nested empty lists costs nothing but the time to find the first wrong byte."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.u = msgpack.Unpacker(
            raw=False,
            max_buffer_size=max(len(data), 1),
            max_str_len=4 * 1024,  # a file name: 1024 characters of up to 4 bytes
            max_bin_len=KEY_SIZE,  # the longest bin of any request
            max_array_len=0,  # arrays are read through array(), never unpacked whole
            max_map_len=0,
            max_ext_len=0,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )
        self.u.feed(data)

    def peek(self) -> int:
        pos: int = self.u.tell()
        if pos >= len(self.data):
            raise MalformedMessage("truncated message")
        return self.data[pos]

    def scalar(self, where: str) -> Any:
        first = self.peek()
        if first in _CONTAINER_BYTES:
            raise _fail(where, "expected a single value, got a list or a map")
        if first in _EXT_BYTES:
            raise _fail(where, "msgpack ext types are not allowed")
        return self.u.unpack()

    def array(self, where: str, max_items: int) -> int:
        if self.peek() not in _ARRAY_BYTES:
            raise _fail(where, "expected a list")
        n: int = self.u.read_array_header()
        if n > max_items:
            raise _fail(where, f"more than {max_items} items")
        return n

    def map(self, where: str) -> int:
        if self.peek() not in _MAP_BYTES:
            raise _fail(where, "expected a map")
        n: int = self.u.read_map_header()
        return n

    def key(self, where: str) -> str:
        key = self.scalar(where)
        if type(key) is not str:
            raise _fail(where, "map key is not a string")
        return key

    def skip(self) -> None:
        self.u.skip()

    def end(self) -> None:
        if self.u.tell() != len(self.data):
            raise MalformedMessage("trailing bytes after the message")


class Field(Generic[T]):
    """Checks one decoded value and converts it to its Python form; `dump` goes the other way.
    `stream` reads and checks the value from a `_Reader` (large tracker requests)."""

    def load(self, value: Any, where: str) -> T:
        raise NotImplementedError

    def dump(self, value: T) -> Any:
        return value

    def stream(self, r: _Reader, where: str) -> T:
        return self.load(r.scalar(where), where)


def _fail(where: str, problem: str) -> MalformedMessage:
    return MalformedMessage(f"{where}: {problem}")


class UInt(Field[int]):
    def __init__(self, maximum: int, minimum: int = 0) -> None:
        self.minimum, self.maximum = minimum, maximum

    def load(self, value: Any, where: str) -> int:
        if type(value) is not int:
            raise _fail(where, f"expected an integer, got {type(value).__name__}")
        if not self.minimum <= value <= self.maximum:
            raise _fail(where, f"{value} outside [{self.minimum}, {self.maximum}]")
        return value


class Float(Field[float]):
    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum

    def load(self, value: Any, where: str) -> float:
        if type(value) not in (int, float):
            raise _fail(where, f"expected a number, got {type(value).__name__}")
        number = float(value)
        if not math.isfinite(number) or not self.minimum <= number <= self.maximum:
            raise _fail(where, f"{value} outside [{self.minimum}, {self.maximum}]")
        return number


class Bool(Field[bool]):
    def load(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _fail(where, f"expected a boolean, got {type(value).__name__}")
        return value


class Str(Field[str]):
    def __init__(
        self,
        max_len: int,
        pattern: re.Pattern[str] | None = None,
        check: Callable[[str], str | None] | None = None,
    ) -> None:
        self.max_len, self.pattern, self.check = max_len, pattern, check

    def load(self, value: Any, where: str) -> str:
        if not isinstance(value, str):  # decoding yields plain str; encoding may pass a StrEnum
            raise _fail(where, f"expected a string, got {type(value).__name__}")
        if len(value) > self.max_len:
            raise _fail(where, f"longer than {self.max_len} characters")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise _fail(where, f"{value[:80]!r} is not of the allowed form")
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise _fail(where, problem)
        return value


class Choice(Field[str]):
    """A string from a fixed set (an enum's values)."""

    def __init__(self, values: type[enum.StrEnum]) -> None:
        self.values = values
        self.allowed = frozenset(v.value for v in values)

    def load(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise _fail(where, f"expected a string, got {type(value).__name__}")
        if value not in self.allowed:
            raise _fail(where, f"{value[:40]!r} is not one of {sorted(self.allowed)}")
        return self.values(value)


class Bin(Field[bytes]):
    def __init__(self, exact: int | None = None, max_len: int = 1 << 31, multiple_of: int = 1) -> None:
        self.exact, self.max_len, self.multiple_of = exact, max_len, multiple_of

    def load(self, value: Any, where: str) -> bytes:
        if type(value) is not bytes:
            raise _fail(where, f"expected bytes, got {type(value).__name__}")
        if self.exact is not None and len(value) != self.exact:
            raise _fail(where, f"expected {self.exact} bytes, got {len(value)}")
        if len(value) > self.max_len or len(value) % self.multiple_of:
            raise _fail(where, f"bad length {len(value)}")
        return value


class Opt(Field[T | None]):
    """A value that may be nil (the key must still be present)."""

    def __init__(self, inner: Field[T]) -> None:
        self.inner = inner

    def load(self, value: Any, where: str) -> T | None:
        return None if value is None else self.inner.load(value, where)

    def dump(self, value: T | None) -> Any:
        return None if value is None else self.inner.dump(value)

    def stream(self, r: _Reader, where: str) -> T | None:
        if r.peek() == 0xC0:
            r.skip()
            return None
        return self.inner.stream(r, where)


class Runs(Field[tuple[Run, ...]]):
    """A list of [first, count] runs of segment indices, each inside [0, MAX_SEGMENTS)."""

    def __init__(self, max_runs: int = MAX_RUNS, max_count: int = MAX_SEGMENTS) -> None:
        self.max_runs, self.max_count = max_runs, max_count

    def load(self, value: Any, where: str) -> tuple[Run, ...]:
        if type(value) is not list:
            raise _fail(where, f"expected a list of runs, got {type(value).__name__}")
        if len(value) > self.max_runs:
            raise _fail(where, f"more than {self.max_runs} runs")
        out: list[Run] = []
        for item in value:
            if (
                type(item) is not list
                or len(item) != 2
                or type(item[0]) is not int
                or type(item[1]) is not int
            ):
                raise _fail(where, "a run is not [first, count]")
            first, count = item
            if first < 0 or not 1 <= count <= self.max_count or first + count > MAX_SEGMENTS:
                raise _fail(where, f"run [{first}, {count}] out of range")
            out.append((first, count))
        return tuple(out)

    def dump(self, value: tuple[Run, ...]) -> Any:
        return [[first, count] for first, count in value]

    def stream(self, r: _Reader, where: str) -> tuple[Run, ...]:
        n = r.array(where, self.max_runs)
        out: list[Run] = []
        read_header, unpack, peek = r.u.read_array_header, r.u.unpack, r.peek
        for _ in range(n):
            if peek() not in _ARRAY_BYTES or read_header() != 2 or peek() in _CONTAINER_BYTES:
                raise _fail(where, "a run is not [first, count]")
            first = unpack()
            if peek() in _CONTAINER_BYTES:
                raise _fail(where, "a run is not [first, count]")
            count = unpack()
            if type(first) is not int or type(count) is not int:
                raise _fail(where, "a run is not [first, count]")
            if first < 0 or not 1 <= count <= self.max_count or first + count > MAX_SEGMENTS:
                raise _fail(where, f"run [{first}, {count}] out of range")
            out.append((first, count))
        return tuple(out)


class ListOf(Field[tuple[T, ...]]):
    def __init__(self, inner: Field[T], max_items: int) -> None:
        self.inner, self.max_items = inner, max_items

    def load(self, value: Any, where: str) -> tuple[T, ...]:
        if type(value) is not list:
            raise _fail(where, f"expected a list, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise _fail(where, f"more than {self.max_items} items")
        load = self.inner.load
        try:
            return tuple([load(v, where) for v in value])
        except MalformedMessage:
            # Name the item only on the error path: formatting a location per item is costly.
            for i, v in enumerate(value):
                load(v, f"{where}[{i}]")
            raise

    def dump(self, value: tuple[T, ...]) -> Any:
        return [self.inner.dump(v) for v in value]

    def stream(self, r: _Reader, where: str) -> tuple[T, ...]:
        n = r.array(where, self.max_items)
        return tuple([self.inner.stream(r, f"{where}[{i}]") for i in range(n)])


class HoldingsField(ListOf[T]):
    """A register's holdings: besides the item count, the runs of all of them together are
    bounded (MAX_REQUEST_RUNS), so that one register is cheap to decode and to apply."""

    def __init__(self, inner: Field[T], max_items: int, max_runs: int) -> None:
        super().__init__(inner, max_items)
        self.max_runs = max_runs

    def _check_runs(self, items: tuple[T, ...], where: str) -> tuple[T, ...]:
        if sum(len(getattr(item, "runs", ())) for item in items) > self.max_runs:
            raise _fail(where, f"more than {self.max_runs} runs in all")
        return items

    def load(self, value: Any, where: str) -> tuple[T, ...]:
        return self._check_runs(super().load(value, where), where)

    def stream(self, r: _Reader, where: str) -> tuple[T, ...]:
        n = r.array(where, self.max_items)
        out: list[T] = []
        total = 0
        for i in range(n):
            item = self.inner.stream(r, f"{where}[{i}]")
            total += len(getattr(item, "runs", ()))
            if total > self.max_runs:
                raise _fail(where, f"more than {self.max_runs} runs in all")
            out.append(item)
        return tuple(out)


class Tuple3(Field[tuple[int, int, int]]):
    """A plan entry: [first, count, source_index]."""

    def load(self, value: Any, where: str) -> tuple[int, int, int]:
        if type(value) is not list or len(value) != 3:
            raise _fail(where, "expected [first, count, source]")
        first, count, source = value
        if type(first) is not int or type(count) is not int or type(source) is not int:
            raise _fail(where, "expected [first, count, source]")
        if first < 0 or count < 1 or first + count > MAX_SEGMENTS or not 0 <= source < 4096:
            raise _fail(where, f"plan entry {value} out of range")
        return first, count, source

    def dump(self, value: tuple[int, int, int]) -> Any:
        return list(value)


class Struct(Field[T]):
    """A nested map with a schema of its own (a dataclass with SCHEMA)."""

    def __init__(self, cls: type[T]) -> None:
        self.cls = cls

    def load(self, value: Any, where: str) -> T:
        return _load_fields(self.cls, value, where)

    def dump(self, value: T) -> Any:
        return _dump_fields(value)

    def stream(self, r: _Reader, where: str) -> T:
        return _stream_fields(self.cls, r, where)


_SCALAR = (int, float, str, bytes, bool, type(None))


class StatsMap(Field[dict[str, Any]]):
    """Free-form statistics: string keys, scalar / list / map values, bounded depth and size."""

    def load(self, value: Any, where: str) -> dict[str, Any]:
        self._check(value, where, 0)
        if type(value) is not dict:
            raise _fail(where, "expected a map")
        return value

    def _check(self, value: Any, where: str, depth: int) -> None:
        if depth > 6:
            raise _fail(where, "nested too deeply")
        if type(value) is dict:
            if len(value) > 100_000:
                raise _fail(where, "too many keys")
            for k, v in value.items():
                if type(k) is not str:
                    raise _fail(where, "map key is not a string")
                self._check(v, f"{where}.{k}", depth + 1)
        elif type(value) is list:
            if len(value) > 100_000:
                raise _fail(where, "list too long")
            for v in value:
                self._check(v, where, depth + 1)
        elif type(value) not in _SCALAR:
            raise _fail(where, f"unexpected {type(value).__name__}")


def _load_fields(cls: type[T], value: Any, where: str, header: bool = False) -> T:
    """Check a map against `cls.SCHEMA` and build the object; `header`: the map also has `op`."""
    if type(value) is not dict:
        raise _fail(where, f"expected a map, got {type(value).__name__}")
    schema: dict[str, Field[Any]] = cls.SCHEMA  # type: ignore[attr-defined]
    keys = value.keys() - {"op"} if header else value.keys()
    if keys != schema.keys():
        missing = sorted(schema.keys() - keys)
        extra = sorted(str(k)[:40] for k in keys - schema.keys())
        raise _fail(where, f"missing keys {missing}" if missing else f"unknown keys {extra}")
    kwargs = {name: field.load(value[name], f"{where}.{name}") for name, field in schema.items()}
    return cls(**kwargs)


def _stream_fields(cls: type[T], r: _Reader, where: str, header: bool = False) -> T:
    """`_load_fields` for a map read from a `_Reader`: the same checks, field by field."""
    schema: dict[str, Field[Any]] = cls.SCHEMA  # type: ignore[attr-defined]
    n = r.map(where)
    if n != len(schema) + header:
        raise _fail(where, f"expected {len(schema) + header} keys, got {n}")
    kwargs: dict[str, Any] = {}
    seen_op = False
    for _ in range(n):
        key = r.key(where)
        if header and key == "op" and not seen_op:
            seen_op = True
            r.skip()  # checked by the caller's first pass
            continue
        if key in kwargs or key == "op":
            raise MalformedMessage("duplicate key in map")
        field = schema.get(key)
        if field is None:
            raise _fail(where, f"unknown keys {[key[:40]]}")
        kwargs[key] = field.stream(r, f"{where}.{key}")
    if kwargs.keys() != schema.keys():
        raise _fail(where, f"missing keys {sorted(schema.keys() - kwargs.keys())}")
    return cls(**kwargs)


def _dump_fields(obj: Any) -> dict[str, Any]:
    schema: dict[str, Field[Any]] = obj.SCHEMA
    return {name: field.dump(getattr(obj, name)) for name, field in schema.items()}


# --------------------------------------------------------------------------- shared fields

RID = UInt(MAX_RID)
FILE_ID = Bin(exact=DIGEST_SIZE)
FILE_NAME = Str(1024, check=check_name)
RESERVED_SOURCE_NAMES = frozenset({"broker", "local"})  # "local": segments a peer already had


def _check_peer_name(name: str) -> str | None:
    return f"{name!r} is a reserved name" if name in RESERVED_SOURCE_NAMES else None


def _check_endpoint(value: str) -> str | None:
    port = int(value.rsplit(":", 1)[1])
    return None if 0 < port < 65536 else f"port {port} out of range"


PEER_NAME = Str(MAX_NAME_LEN, NAME_PATTERN, check=_check_peer_name)
SOURCE_NAME = Str(MAX_NAME_LEN)  # a peer name or "broker"
ENDPOINT = Str(300, ENDPOINT_PATTERN, check=_check_endpoint)
SEGMENT_INDEX = UInt(MAX_SEGMENTS - 1)
RUN_COUNT = UInt(MAX_RUN_SEGMENTS, minimum=1)
RUNS = Runs()
REQUEST_RUNS = Runs(MAX_REQUEST_RUNS)
TOKEN = Bin(exact=TOKEN_SIZE)
PUBLIC_KEY = Bin(exact=KEY_SIZE)


# --------------------------------------------------------------------------- nested records


@dataclass(frozen=True, slots=True)
class Holding:
    """The segments of one file that a peer holds."""

    file_id: bytes
    runs: tuple[Run, ...]
    SCHEMA: ClassVar[dict[str, Field[Any]]] = {"file_id": FILE_ID, "runs": REQUEST_RUNS}


class SourceReason(enum.StrEnum):
    """Why a plan names a source (`Source.why`): plans explain themselves."""

    COMPLETE = "complete"  # holds the whole file; the least loaded of the copies
    PARTIAL = "partial"  # holds the planned segments, not the whole file
    RELAY = "relay"  # the requester's parent in a relay tree: passes a stripe on as it arrives
    HOLDER = "holder"  # another downloader that already holds what the requester's stripe needs
    ORIGIN = "origin"  # the broker: nobody else has these segments


@dataclass(frozen=True, slots=True)
class Source:
    """A place to fetch segments from: a peer, or the broker (runs = None: it holds everything)."""

    name: str
    endpoint: str
    runs: tuple[Run, ...] | None
    # Its CURVE public key (raw 32 bytes) when the swarm runs authenticated: a downloader connects
    # to `endpoint` as a CURVE client of this key, so it talks to that source and nobody else.
    public_key: bytes | None = None
    why: str = SourceReason.ORIGIN  # why the plan names it
    SCHEMA: ClassVar[dict[str, Field[Any]]] = {
        "name": SOURCE_NAME,
        "endpoint": ENDPOINT,
        "runs": Opt(RUNS),
        "public_key": Opt(PUBLIC_KEY),
        "why": Choice(SourceReason),
    }


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    size: int
    file_id: bytes
    SCHEMA: ClassVar[dict[str, Field[Any]]] = {
        "name": FILE_NAME,
        "size": UInt(MAX_FILE_SIZE),
        "file_id": FILE_ID,
    }


# --------------------------------------------------------------------------- messages


class Message:
    OP: ClassVar[str]
    SCHEMA: ClassVar[dict[str, Field[Any]]]
    PAYLOAD: ClassVar[bool] = False  # True: one payload frame follows the header


# Tracker requests: peer DEALER -> broker ROUTER. Every request carries `rid`, echoed by the reply.


@dataclass(frozen=True, slots=True)
class Register(Message):
    rid: int
    name: str
    endpoint: str
    holdings: tuple[Holding, ...]
    proto: int = PROTOCOL_VERSION
    OP = "register"
    SCHEMA = {
        "rid": RID,
        "name": PEER_NAME,
        "endpoint": ENDPOINT,
        "holdings": HoldingsField(Struct(Holding), MAX_HOLDINGS, MAX_REQUEST_RUNS),
        "proto": UInt(255),
    }


@dataclass(frozen=True, slots=True)
class Get(Message):
    rid: int
    name: str
    known_file_id: bytes | None = None  # the requester has this manifest: do not resend digests
    OP = "get"
    SCHEMA = {"rid": RID, "name": FILE_NAME, "known_file_id": Opt(FILE_ID)}


@dataclass(frozen=True, slots=True)
class Have(Message):
    rid: int
    file_id: bytes
    runs: tuple[Run, ...]
    OP = "have"
    SCHEMA = {"rid": RID, "file_id": FILE_ID, "runs": REQUEST_RUNS}


@dataclass(frozen=True, slots=True)
class Lost(Message):
    rid: int
    file_id: bytes
    runs: tuple[Run, ...]
    OP = "lost"
    SCHEMA = {"rid": RID, "file_id": FILE_ID, "runs": REQUEST_RUNS}


class BadSourceReason(enum.StrEnum):
    """Why a downloader reports a source (`bad_source.reason`), and what it costs the source."""

    CHECKSUM = "checksum"  # bytes that failed verification: a strike
    REFUSED = "refused"  # it lacks segments it was listed for: its claim on them is dropped
    MALFORMED = "malformed"  # a reply that could not be decoded: a strike
    MISMATCH = "mismatch"  # a reply for another request, or with runs outside it: a strike
    LENGTH = "length"  # a payload of the wrong length: a strike

    @property
    def strikes(self) -> bool:
        return self is not BadSourceReason.REFUSED


@dataclass(frozen=True, slots=True)
class BadSource(Message):
    """A source served segments that failed verification or refused segments it was said to hold."""

    rid: int
    file_id: bytes
    source: str
    runs: tuple[Run, ...]
    reason: str
    OP = "bad_source"
    SCHEMA = {
        "rid": RID,
        "file_id": FILE_ID,
        "source": SOURCE_NAME,
        "runs": REQUEST_RUNS,
        "reason": Choice(BadSourceReason),
    }


@dataclass(frozen=True, slots=True)
class ListFiles(Message):
    rid: int
    OP = "list"
    SCHEMA = {"rid": RID}


@dataclass(frozen=True, slots=True)
class StatsRequest(Message):
    rid: int
    OP = "stats"
    SCHEMA = {"rid": RID}


@dataclass(frozen=True, slots=True)
class Ping(Message):
    rid: int
    OP = "ping"
    SCHEMA = {"rid": RID}


@dataclass(frozen=True, slots=True)
class Bye(Message):
    rid: int
    OP = "bye"
    SCHEMA = {"rid": RID}


# Tracker replies: broker ROUTER -> peer DEALER.


@dataclass(frozen=True, slots=True)
class Registered(Message):
    rid: int
    session: int
    heartbeat_endpoint: str
    heartbeat_interval_s: float
    heartbeat_liveness: int
    token: bytes  # secret of this registration: every heartbeat must carry it
    OP = "registered"
    SCHEMA = {
        "rid": RID,
        "session": UInt(MAX_SESSION),
        "heartbeat_endpoint": ENDPOINT,
        "heartbeat_interval_s": Float(0.01, 3600.0),
        "heartbeat_liveness": UInt(100, minimum=1),
        "token": TOKEN,
    }


@dataclass(frozen=True, slots=True)
class FileInfo(Message):
    """The answer to `get`: the manifest (digests omitted when the requester has them) and a plan."""

    rid: int
    name: str
    size: int
    file_id: bytes
    segment_size: int
    digests: bytes | None
    sources: tuple[Source, ...]
    plan: tuple[tuple[int, int, int], ...]
    origin_lanes: int
    OP = "file"
    SCHEMA = {
        "rid": RID,
        "name": FILE_NAME,
        "size": UInt(MAX_FILE_SIZE),
        "file_id": FILE_ID,
        "segment_size": UInt(SEGMENT_SIZE, minimum=SEGMENT_SIZE),
        "digests": Opt(Bin(max_len=MAX_SEGMENTS * DIGEST_SIZE, multiple_of=DIGEST_SIZE)),
        "sources": ListOf(Struct(Source), 4096),
        "plan": ListOf(Tuple3(), MAX_RUNS),
        "origin_lanes": UInt(64, minimum=1),
    }


@dataclass(frozen=True, slots=True)
class Files(Message):
    rid: int
    files: tuple[FileEntry, ...]
    OP = "files"
    SCHEMA = {"rid": RID, "files": ListOf(Struct(FileEntry), 1 << 20)}


@dataclass(frozen=True, slots=True)
class Stats(Message):
    rid: int
    stats: dict[str, Any]
    OP = "stats_reply"
    SCHEMA = {"rid": RID, "stats": StatsMap()}


@dataclass(frozen=True, slots=True)
class Pong(Message):
    rid: int
    session: int
    known: bool  # False: the broker does not know this peer (it restarted): register again
    # Files of which this peer was reported to refuse segments it had announced: it re-verifies
    # what it holds of them and announces that again (`have`), so a refusal is never a loss.
    recheck: tuple[bytes, ...] = ()
    OP = "pong"
    SCHEMA = {
        "rid": RID,
        "session": UInt(MAX_SESSION),
        "known": Bool(),
        "recheck": ListOf(FILE_ID, MAX_RECHECK),
    }


@dataclass(frozen=True, slots=True)
class Ok(Message):
    rid: int
    OP = "ok"
    SCHEMA = {"rid": RID}


@dataclass(frozen=True, slots=True)
class Error(Message):
    rid: int
    code: str
    message: str
    OP = "error"
    SCHEMA = {"rid": RID, "code": Str(32), "message": Str(MAX_ERROR_MESSAGE)}

    def __post_init__(self) -> None:
        if len(self.message) > MAX_ERROR_MESSAGE:  # explanations may quote input: keep them short
            object.__setattr__(self, "message", self.message[: MAX_ERROR_MESSAGE - 3] + "...")


# Heartbeat: peer PUB -> broker SUB.


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    name: str
    token: bytes  # the `token` of this peer's `registered`
    seq: int  # grows with every heartbeat of the session: a replayed one is refused
    up_bps: int = 0  # the peer's highest upload rate over its last seconds (bytes/s; 0: none)
    OP = "hb"
    SCHEMA = {"name": PEER_NAME, "token": TOKEN, "seq": UInt(MAX_SEQ), "up_bps": UInt((1 << 48) - 1)}


# Segment transfer: downloader REQ -> server (REQ/REP envelope on a ROUTER).


@dataclass(frozen=True, slots=True)
class SegmentRequest(Message):
    file_id: bytes
    first: int
    count: int
    OP = "seg"
    SCHEMA = {"file_id": FILE_ID, "first": SEGMENT_INDEX, "count": RUN_COUNT}


@dataclass(frozen=True, slots=True)
class SegmentData(Message):
    """Segments [first, first + count) less `missing` and `later`, concatenated in order, in the
    payload frame. `missing`: the server does not hold them. `later`: it is fetching them (a
    relay-tree parent): ask again, nobody is to blame."""

    file_id: bytes
    first: int
    count: int
    missing: tuple[Run, ...]
    later: tuple[Run, ...] = ()
    payload: bytes | memoryview = b""
    OP = "data"
    SCHEMA = {
        "file_id": FILE_ID,
        "first": SEGMENT_INDEX,
        "count": RUN_COUNT,
        "missing": Runs(MAX_RUN_SEGMENTS, MAX_RUN_SEGMENTS),
        "later": Runs(MAX_RUN_SEGMENTS, MAX_RUN_SEGMENTS),
    }
    PAYLOAD = True


MESSAGES: dict[str, type[Message]] = {
    cls.OP: cls
    for cls in (
        Register,
        Get,
        Have,
        Lost,
        BadSource,
        ListFiles,
        StatsRequest,
        Ping,
        Bye,
        Registered,
        FileInfo,
        Files,
        Stats,
        Pong,
        Ok,
        Error,
        Heartbeat,
        SegmentRequest,
        SegmentData,
    )
}
TRACKER_REQUESTS = (Register, Get, Have, Lost, BadSource, ListFiles, StatsRequest, Ping, Bye)
TRACKER_REPLIES = (Registered, FileInfo, Files, Stats, Pong, Ok, Error)

for _cls in MESSAGES.values():
    _names = [f.name for f in fields(_cls)]  # type: ignore[arg-type]
    _expected = list(_cls.SCHEMA) + (["payload"] if _cls.PAYLOAD else [])
    if _names != _expected:  # a schema that drifts from its dataclass is a bug here, not on the wire
        raise TypeError(f"{_cls.__name__}: fields {_names} != schema {_expected}")


# --------------------------------------------------------------------------- codec


def _refuse_ext(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack ext type {code} is not allowed")


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise MalformedMessage("duplicate key in map")
    return out


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames of a message; it is validated exactly as `decode` would, so no endpoint sends what
    its peers must refuse (a bug here raises MalformedMessage at the sender)."""
    fields_ = _dump_fields(msg)
    _load_fields(type(msg), fields_, "outgoing")
    header = {"op": msg.OP, **fields_}
    frames: list[bytes | memoryview] = [msgpack.packb(header, use_bin_type=True)]
    if msg.PAYLOAD:
        frames.append(msg.payload)  # type: ignore[attr-defined]
    return frames


def decode(
    frames: Sequence[bytes | memoryview | Any],
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    allowed: tuple[type[Message], ...] | None = None,
) -> Message:
    """Decode one message; `allowed` restricts which messages this endpoint accepts."""
    if not frames:
        raise MalformedMessage("no frames")
    head = frames[0]
    head_bytes = head.bytes if hasattr(head, "bytes") else bytes(head)
    if len(head_bytes) > max_header_bytes:
        raise MalformedMessage(f"header of {len(head_bytes)} bytes exceeds {max_header_bytes}")
    try:
        value = msgpack.unpackb(
            head_bytes,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            object_pairs_hook=_unique_pairs,
        )
    except MalformedMessage:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on bad input: one error for all
        raise MalformedMessage(f"header is not valid msgpack: {type(exc).__name__}") from None
    if type(value) is not dict:
        raise MalformedMessage("header is not a map")
    op = value.get("op")
    cls = MESSAGES.get(op) if type(op) is str else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise MalformedMessage(f"unknown op {str(op)[:40]!r}")
    expected_frames = 2 if cls.PAYLOAD else 1
    if len(frames) != expected_frames:
        raise MalformedMessage(f"{cls.OP}: expected {expected_frames} frames, got {len(frames)}")
    msg: Message = _load_fields(cls, value, "header", header=True)
    if cls.PAYLOAD:
        payload = frames[1]
        view = payload.buffer if hasattr(payload, "buffer") else memoryview(payload)
        object.__setattr__(msg, "payload", view)
    return msg


def _request_op(head: bytes) -> tuple[str | None, int]:
    """A first pass over a large request: its op and rid, skipping every other value undecoded."""
    r = _Reader(head)
    n = r.map("header")
    op: str | None = None
    rid = 0
    for _ in range(n):
        key = r.key("header")
        if key in ("op", "rid") and r.peek() not in _CONTAINER_BYTES:
            value = r.scalar(f"header.{key}")
            if key == "op" and type(value) is str:
                op = value
            elif key == "rid" and type(value) is int and 0 <= value <= MAX_RID:
                rid = value
        else:
            r.skip()
    return op, rid


def request_limit(op: str) -> int:
    """The largest frame a tracker request of this op may have (bytes)."""
    return REQUEST_MAX_BYTES.get(op, SMALL_REQUEST_MAX_BYTES)


def decode_request(frames: Sequence[bytes | memoryview | Any], max_bytes: int = MAX_REQUEST_BYTES) -> Message:
    """Decode a tracker request, bounding its size by op *before* its fields are decoded.

    A frame over STREAM_DECODE_BYTES is read twice with a `_Reader`: first for its op (every other
    value skipped undecoded), then field by field against that op's schema, so that nothing is
    built that the schema would refuse. Small frames take `decode`, which checks the same."""
    if not frames:
        raise MalformedMessage("no frames")
    head = frames[0]
    head_bytes = head.bytes if hasattr(head, "bytes") else bytes(head)
    size = len(head_bytes)
    if size > max_bytes:
        raise MalformedMessage(f"header of {size} bytes exceeds {max_bytes}")
    if size <= STREAM_DECODE_BYTES:
        msg = decode(frames, max_bytes, allowed=TRACKER_REQUESTS)
        if size > request_limit(msg.OP):
            raise MalformedMessage(f"{msg.OP}: {size} bytes exceeds the {request_limit(msg.OP)} allowed")
        return msg
    try:
        op, _ = _request_op(head_bytes)
        cls = MESSAGES.get(op) if op is not None else None
        if cls is None or cls not in TRACKER_REQUESTS:
            raise MalformedMessage(f"unknown op {str(op)[:40]!r}")
        if size > request_limit(cls.OP):
            raise MalformedMessage(f"{cls.OP}: {size} bytes exceeds the {request_limit(cls.OP)} allowed")
        if len(frames) != 1:
            raise MalformedMessage(f"{cls.OP}: expected 1 frames, got {len(frames)}")
        reader = _Reader(head_bytes)
        msg = _stream_fields(cls, reader, "header", header=True)
        reader.end()
        return msg
    except MalformedMessage:
        raise
    except Exception as exc:  # msgpack raises a zoo of types on bad input: one error for all
        raise MalformedMessage(f"header is not valid msgpack: {type(exc).__name__}") from None


def rid_of(frames: Sequence[bytes | memoryview | Any]) -> int:
    """Best-effort request id of an undecodable request, so its error reply can be matched."""
    try:
        head = frames[0]
        head_bytes = head.bytes if hasattr(head, "bytes") else bytes(head)
        if len(head_bytes) > 65536:
            return _request_op(head_bytes)[1] if len(head_bytes) <= MAX_REQUEST_BYTES else 0
        value = msgpack.unpackb(head_bytes, raw=False)
        rid = value.get("rid") if type(value) is dict else None
        return rid if type(rid) is int and 0 <= rid <= MAX_RID else 0
    except Exception:
        return 0
