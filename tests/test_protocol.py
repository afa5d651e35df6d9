"""Unit tests for common/protocol.py: round trips of every message, and every way decode refuses."""

from __future__ import annotations

import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import protocol
from common.errors import MalformedMessage
from common.manifest import DIGEST_SIZE, SEGMENT_SIZE
from common.protocol import (
    MAX_FILE_SIZE,
    MAX_RID,
    MAX_RUN_SEGMENTS,
    MAX_SEGMENTS,
    MAX_SESSION,
    MESSAGES,
    TRACKER_REQUESTS,
    BadSource,
    Bye,
    Error,
    FileEntry,
    FileInfo,
    Files,
    Get,
    Have,
    Heartbeat,
    Holding,
    ListFiles,
    Lost,
    Message,
    Ok,
    Ping,
    Pong,
    Register,
    Registered,
    SegmentData,
    SegmentRequest,
    Source,
    Stats,
    StatsRequest,
    decode,
    encode,
    rid_of,
)

pytestmark = pytest.mark.timeout(30)

FID = bytes(range(DIGEST_SIZE))
FID2 = b"\xff" * DIGEST_SIZE
EP = "tcp://127.0.0.1:5555"
EP6 = "tcp://[::1]:6000"
TOK = bytes(range(16))
KEY = b"\x07" * 32
HYPO = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SAMPLES: list[Message] = [
    Register(
        rid=1,
        name="peer-1",
        endpoint=EP,
        holdings=(Holding(FID, ((0, 10), (20, 5))), Holding(FID2, ())),
        proto=1,
    ),
    Register(rid=0, name="A.b_c-9", endpoint=EP6, holdings=(), proto=255),
    Get(rid=2, name="dir/file.bin", known_file_id=None),
    Get(rid=2, name="x", known_file_id=FID),
    Have(rid=3, file_id=FID, runs=((0, 1), (MAX_SEGMENTS - 1, 1))),
    Have(rid=3, file_id=FID, runs=()),
    Lost(rid=4, file_id=FID2, runs=((5, 6),)),
    BadSource(rid=5, file_id=FID, source="peer-2", runs=((0, 4),), reason="checksum"),
    ListFiles(rid=6),
    StatsRequest(rid=7),
    Ping(rid=MAX_RID),
    Bye(rid=0),
    Registered(
        rid=9,
        session=MAX_SESSION,
        heartbeat_endpoint=EP6,
        heartbeat_interval_s=0.5,
        heartbeat_liveness=3,
        token=TOK,
    ),
    FileInfo(
        rid=10,
        name="a/b.bin",
        size=SEGMENT_SIZE * 2 + 1,
        file_id=FID,
        segment_size=SEGMENT_SIZE,
        digests=b"\x01" * (3 * DIGEST_SIZE),
        sources=(Source("peer-1", EP, ((0, 2),), KEY), Source("broker", EP6, None)),
        plan=((0, 2, 0), (2, 1, 1)),
        origin_lanes=4,
    ),
    FileInfo(
        rid=10,
        name="empty",
        size=0,
        file_id=FID2,
        segment_size=SEGMENT_SIZE,
        digests=None,
        sources=(),
        plan=(),
        origin_lanes=1,
    ),
    Files(rid=11, files=(FileEntry("a/b.txt", 123, FID), FileEntry("c", MAX_FILE_SIZE, FID2))),
    Files(rid=11, files=()),
    Stats(rid=12, stats={"a": 1, "b": [1, 2.5, "x", b"y", None, True], "c": {"d": {"e": -1}}}),
    Pong(rid=13, session=5, known=True),
    Pong(rid=13, session=0, known=False),
    Pong(rid=13, session=1, known=True, recheck=(FID, FID2)),
    Ok(rid=14),
    Error(rid=15, code="not_found", message="no file named 'x'"),
    Heartbeat(name="peer-1", token=TOK, seq=1),
    Heartbeat(name="peer-1", token=TOK, seq=(1 << 64) - 1, up_bps=123),
    SegmentRequest(file_id=FID, first=0, count=MAX_RUN_SEGMENTS),
    SegmentRequest(file_id=FID, first=MAX_SEGMENTS - 1, count=1),
    SegmentData(file_id=FID, first=10, count=3, missing=((11, 1),), payload=b"\xab" * (2 * SEGMENT_SIZE)),
    SegmentData(file_id=FID, first=0, count=1, missing=((0, 1),), payload=b""),
]


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def header_of(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg)[0], raw=False)


def frames_for(header: dict[str, Any], payload: bytes | None = None) -> list[bytes]:
    frames = [pack(header)]
    if payload is not None:
        frames.append(payload)
    return frames


def rejects(frames: list[Any], match: str | None = None, **kwargs: Any) -> None:
    with pytest.raises(MalformedMessage, match=match):
        decode(frames, **kwargs)


def raw_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A msgpack fixmap from already-packed keys and values (so duplicate keys are possible)."""
    assert len(pairs) < 16
    return bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs)


def p(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# --------------------------------------------------------------------------- round trips


def test_samples_cover_every_message_class() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGES.values())


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frames = encode(msg)
    assert len(frames) == (2 if msg.PAYLOAD else 1)
    back = decode(frames)
    assert type(back) is type(msg)
    assert back == msg
    # and the re-encoding is byte-identical
    assert [bytes(f) for f in encode(back)] == [bytes(f) for f in frames]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_from_memoryview_frames(msg: Message) -> None:
    frames = [memoryview(bytes(f)) for f in encode(msg)]
    assert decode(frames) == msg


def test_header_carries_op_and_fields_only() -> None:
    assert header_of(Ping(rid=7)) == {"op": "ping", "rid": 7}
    assert header_of(Have(1, FID, ((3, 4),))) == {"op": "have", "rid": 1, "file_id": FID, "runs": [[3, 4]]}


def test_segment_data_payload_is_a_separate_frame() -> None:
    payload = bytes(range(256)) * 64
    frames = encode(SegmentData(FID, 5, 1, (), payload=payload))
    assert len(frames) == 2
    assert bytes(frames[1]) == payload
    assert payload not in bytes(frames[0])
    back = decode(frames)
    assert isinstance(back, SegmentData)
    assert isinstance(back.payload, memoryview)
    assert bytes(back.payload) == payload


def test_file_info_digests_none_and_bytes_are_distinct() -> None:
    with_digests = next(m for m in SAMPLES if isinstance(m, FileInfo) and m.digests is not None)
    back = decode(encode(with_digests))
    assert isinstance(back, FileInfo)
    assert back.digests == with_digests.digests
    assert isinstance(back.digests, bytes)
    assert back.sources[1].runs is None
    assert back.sources[0].runs == ((0, 2),)
    none = decode(encode(Get(1, "x", None)))
    assert isinstance(none, Get)
    assert none.known_file_id is None


def test_float_field_accepts_an_integer_and_returns_a_float() -> None:
    h = header_of(SAMPLES[12])
    h["heartbeat_interval_s"] = 2
    back = decode(frames_for(h))
    assert isinstance(back, Registered)
    assert back.heartbeat_interval_s == 2.0
    assert type(back.heartbeat_interval_s) is float


@HYPO
@given(
    rid=st.integers(0, MAX_RID),
    runs=st.lists(
        st.tuples(st.integers(0, MAX_SEGMENTS - 1), st.integers(1, 1 << 16)).filter(
            lambda r: r[0] + r[1] <= MAX_SEGMENTS
        ),
        max_size=20,
    ),
    file_id=st.binary(min_size=32, max_size=32),
)
def test_have_round_trip_property(rid: int, runs: list[tuple[int, int]], file_id: bytes) -> None:
    msg = Have(rid, file_id, tuple(runs))
    assert decode(encode(msg)) == msg


@HYPO
@given(
    first=st.integers(0, MAX_SEGMENTS - 1),
    count=st.integers(1, MAX_RUN_SEGMENTS),
    payload=st.binary(max_size=4096),
)
def test_segment_messages_round_trip_property(first: int, count: int, payload: bytes) -> None:
    req = SegmentRequest(FID, first, count)
    assert decode(encode(req)) == req
    data = SegmentData(FID, first, count, ((first, 1),), payload=payload)
    back = decode(encode(data))
    assert back == data
    assert bytes(back.payload) == payload  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- framing and msgpack errors


@pytest.mark.parametrize(
    "head",
    [b"", b"\xc1", b"\xff\xff\xff", b"not msgpack at all \xc1", b"\xdf\xff\xff\xff\xff"],
    ids=["empty", "never-used-byte", "negative-fixints", "text", "huge-map-header"],
)
def test_non_msgpack_header_is_rejected(head: bytes) -> None:
    rejects([head])


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_truncated_header_is_rejected(msg: Message) -> None:
    frames = encode(msg)
    head = bytes(frames[0])
    for cut in sorted({1, len(head) // 2, len(head) - 1}):
        rejects([head[:cut], *frames[1:]])


def test_every_prefix_of_a_header_is_rejected() -> None:
    head = bytes(encode(SAMPLES[0])[0])
    for cut in range(len(head)):
        rejects([head[:cut]])


def test_trailing_bytes_after_header_are_rejected() -> None:
    rejects([pack({"op": "ping", "rid": 1}) + b"\x00"])


def test_invalid_utf8_in_string_is_rejected() -> None:
    rejects([raw_map([(p("op"), p("hb")), (p("name"), b"\xa2\xff\xfe")])])


@pytest.mark.parametrize("value", [[1, 2], "ping", None, 5, b"ping", 1.5, True], ids=repr)
def test_header_not_a_map_is_rejected(value: Any) -> None:
    rejects([p(value)], match="not a map")


def test_no_frames_is_rejected() -> None:
    rejects([])


@pytest.mark.parametrize(
    "frames",
    [
        [pack({"op": "data", "file_id": FID, "first": 0, "count": 1, "missing": []})],
        [pack({"op": "data", "file_id": FID, "first": 0, "count": 1, "missing": []}), b"x", b"y"],
        [pack({"op": "ping", "rid": 1}), b""],
        [pack({"op": "ping", "rid": 1}), b"extra"],
        [pack({"op": "seg", "file_id": FID, "first": 0, "count": 1}), b"payload"],
    ],
    ids=["data-no-payload", "data-two-payloads", "ping-empty-extra", "ping-extra", "seg-payload"],
)
def test_wrong_frame_count_is_rejected(frames: list[bytes]) -> None:
    rejects(frames, match="frames")


def test_oversized_header_is_rejected_and_limit_is_inclusive() -> None:
    frames = encode(SAMPLES[0])
    size = len(frames[0])
    assert isinstance(decode(frames, max_header_bytes=size), Register)
    rejects(frames, match="exceeds", max_header_bytes=size - 1)


# --------------------------------------------------------------------------- op and key set


@pytest.mark.parametrize("op", ["nope", "PING", "", 5, None, b"ping", ["ping"]], ids=repr)
def test_unknown_op_is_rejected(op: Any) -> None:
    rejects([pack({"op": op, "rid": 1})], match="unknown op")


def test_missing_op_is_rejected() -> None:
    rejects([pack({"rid": 1})], match="unknown op")


def test_op_not_in_allowed_is_rejected() -> None:
    frames = encode(Ping(1))
    rejects(frames, match="unknown op", allowed=(Get, Have))
    assert isinstance(decode(frames, allowed=TRACKER_REQUESTS), Ping)
    rejects(encode(Pong(1, 1, True)), allowed=TRACKER_REQUESTS)
    rejects(encode(SAMPLES[-2]), allowed=TRACKER_REQUESTS)
    assert isinstance(decode(encode(SAMPLES[-2]), allowed=(SegmentData, Error)), SegmentData)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_each_missing_key_is_rejected(msg: Message) -> None:
    header = header_of(msg)
    payload = [bytes(encode(msg)[1])] if msg.PAYLOAD else []
    for key in [k for k in header if k != "op"]:
        h = dict(header)
        del h[key]
        rejects([pack(h), *payload], match="missing keys")


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_extra_key_is_rejected(msg: Message) -> None:
    payload = [bytes(encode(msg)[1])] if msg.PAYLOAD else []
    for extra in ["extra", "payload", "OP", b"rid"]:
        h: dict[Any, Any] = dict(header_of(msg))
        h[extra] = 1
        rejects([pack(h), *payload], match="unknown keys")


def test_nested_missing_and_extra_keys_are_rejected() -> None:
    h = header_of(SAMPLES[0])
    h["holdings"][0]["extra"] = 1
    rejects(frames_for(h), match="unknown keys")
    h = header_of(SAMPLES[0])
    del h["holdings"][1]["runs"]
    rejects(frames_for(h), match="missing keys")
    h = header_of(SAMPLES[13])
    del h["sources"][1]["runs"]  # Opt fields must still be present
    rejects(frames_for(h), match="missing keys")
    h = header_of(SAMPLES[15])
    h["files"][0]["op"] = "x"  # "op" is only exempt at the top level
    rejects(frames_for(h), match="unknown keys")


@pytest.mark.parametrize(
    "head",
    [
        raw_map([(p("op"), p("ping")), (p("rid"), p(1)), (p("rid"), p(2))]),
        raw_map([(p("op"), p("ping")), (p("op"), p("ping")), (p("rid"), p(1))]),
        # nested: a Holding map with file_id twice
        raw_map(
            [
                (p("op"), p("register")),
                (p("rid"), p(1)),
                (p("name"), p("peer")),
                (p("endpoint"), p(EP)),
                (p("holdings"), b"\x91" + raw_map([(p("file_id"), p(FID)), (p("file_id"), p(FID))])),
                (p("proto"), p(1)),
            ]
        ),
        # nested deep in free-form stats
        raw_map([(p("op"), p("stats_reply")), (p("rid"), p(1)), (p("stats"), raw_map([(p("a"), p(1))] * 2))]),
    ],
    ids=["rid-twice", "op-twice", "nested-holding", "nested-stats"],
)
def test_duplicate_key_is_rejected(head: bytes) -> None:
    rejects([head], match="duplicate")


def test_raw_map_helper_is_sound() -> None:
    # the hand-built bytes decode fine when there are no duplicates
    head = raw_map([(p("op"), p("ping")), (p("rid"), p(3))])
    assert decode([head]) == Ping(3)


@pytest.mark.parametrize(
    "value",
    [msgpack.ExtType(5, b"abc"), msgpack.ExtType(0, b""), msgpack.Timestamp(1)],
    ids=["ext5", "ext0-empty", "timestamp"],
)
def test_ext_types_are_rejected(value: Any) -> None:
    if isinstance(value, msgpack.ExtType):  # refused while unpacking, wherever it sits
        rejects([pack({"op": "ping", "rid": 1, "unknown": value})], match="ext type")
        rejects([pack({"op": "ping", "rid": value})], match="ext type")
    rejects([pack({"op": "ping", "rid": value})])
    rejects([pack({"op": "stats_reply", "rid": 1, "stats": {"x": value}})])
    rejects([pack({"op": "get", "rid": 1, "name": "x", "known_file_id": value})])


def test_non_string_map_keys_are_rejected() -> None:
    rejects([p({"op": "stats_reply", "rid": 1, "stats": {1: 2}})])
    rejects([p({"op": "stats_reply", "rid": 1, "stats": {b"k": 2}})], match="not a string")
    rejects([raw_map([(p("op"), p("ping")), (p(1.5), p(1))])])


# --------------------------------------------------------------------------- field types and ranges


def mutate(msg: Message, path: list[Any], value: Any) -> list[bytes]:
    h: Any = header_of(msg)
    root = h
    for step in path[:-1]:
        h = h[step]
    h[path[-1]] = value
    frames = [pack(root)]
    if msg.PAYLOAD:
        frames.append(bytes(encode(msg)[1]))
    return frames


REG, GET, HAVE, BAD, REGD, FINFO, FILES, PONG, ERR, SEGREQ, SEGDATA = (
    SAMPLES[0],
    SAMPLES[2],
    SAMPLES[4],
    SAMPLES[7],
    SAMPLES[12],
    SAMPLES[13],
    SAMPLES[15],
    SAMPLES[18],
    SAMPLES[22],
    SAMPLES[25],
    SAMPLES[27],
)

BAD_FIELDS: list[tuple[str, Message, list[Any], Any]] = [
    # bool is not an int, nor an int a bool
    ("rid-true", SAMPLES[10], ["rid"], True),
    ("rid-false", SAMPLES[10], ["rid"], False),
    ("first-true", SEGREQ, ["first"], True),
    ("count-true", SEGREQ, ["count"], True),
    ("run-bool", HAVE, ["runs"], [[True, 1]]),
    ("run-count-bool", HAVE, ["runs"], [[0, True]]),
    ("proto-bool", REG, ["proto"], True),
    ("known-int", PONG, ["known"], 1),
    ("known-nil", PONG, ["known"], None),
    ("interval-bool", REGD, ["heartbeat_interval_s"], True),
    ("liveness-float", REGD, ["heartbeat_liveness"], 3.0),
    ("rid-float", SAMPLES[10], ["rid"], 1.0),
    ("rid-str", SAMPLES[10], ["rid"], "1"),
    ("rid-nil", SAMPLES[10], ["rid"], None),
    # negative integers
    ("rid-neg", SAMPLES[10], ["rid"], -1),
    ("first-neg", SEGREQ, ["first"], -1),
    ("run-first-neg", HAVE, ["runs"], [[-1, 2]]),
    ("run-count-neg", HAVE, ["runs"], [[0, -1]]),
    ("size-neg", FILES, ["files", 0, "size"], -1),
    ("session-neg", PONG, ["session"], -5),
    # out of range
    ("rid-too-big", SAMPLES[10], ["rid"], MAX_RID + 1),
    ("count-zero", SEGREQ, ["count"], 0),
    ("count-too-big", SEGREQ, ["count"], MAX_RUN_SEGMENTS + 1),
    ("data-count-zero", SEGDATA, ["count"], 0),
    ("data-count-too-big", SEGDATA, ["count"], MAX_RUN_SEGMENTS + 1),
    ("first-too-big", SEGREQ, ["first"], MAX_SEGMENTS),
    ("run-count-zero", HAVE, ["runs"], [[0, 0]]),
    ("run-past-end", HAVE, ["runs"], [[MAX_SEGMENTS - 1, 2]]),
    ("run-first-at-end", HAVE, ["runs"], [[MAX_SEGMENTS, 1]]),
    ("missing-count-too-big", SEGDATA, ["missing"], [[0, MAX_RUN_SEGMENTS + 1]]),
    ("missing-too-many-runs", SEGDATA, ["missing"], [[2 * i, 1] for i in range(MAX_RUN_SEGMENTS + 1)]),
    ("proto-256", REG, ["proto"], 256),
    ("liveness-0", REGD, ["heartbeat_liveness"], 0),
    ("liveness-101", REGD, ["heartbeat_liveness"], 101),
    ("interval-too-small", REGD, ["heartbeat_interval_s"], 0.001),
    ("interval-too-big", REGD, ["heartbeat_interval_s"], 3600.5),
    ("interval-nan", REGD, ["heartbeat_interval_s"], math.nan),
    ("interval-inf", REGD, ["heartbeat_interval_s"], math.inf),
    ("origin-lanes-65", FINFO, ["origin_lanes"], 65),
    ("origin-lanes-0", FINFO, ["origin_lanes"], 0),
    ("segment-size-small", FINFO, ["segment_size"], SEGMENT_SIZE - 1),
    ("segment-size-big", FINFO, ["segment_size"], SEGMENT_SIZE * 2),
    ("size-too-big", FINFO, ["size"], MAX_FILE_SIZE + 1),
    ("entry-size-too-big", FILES, ["files", 0, "size"], MAX_FILE_SIZE + 1),
    ("plan-count-zero", FINFO, ["plan"], [[0, 0, 0]]),
    ("plan-source-4096", FINFO, ["plan"], [[0, 1, 4096]]),
    ("plan-source-neg", FINFO, ["plan"], [[0, 1, -1]]),
    ("plan-past-end", FINFO, ["plan"], [[MAX_SEGMENTS - 1, 2, 0]]),
    ("plan-pair", FINFO, ["plan"], [[0, 1]]),
    ("plan-bool", FINFO, ["plan"], [[0, 1, True]]),
    ("plan-not-list", FINFO, ["plan"], {"a": 1}),
    ("error-code-long", ERR, ["code"], "x" * 33),
    ("error-message-long", ERR, ["message"], "x" * 1001),
    ("reason-long", BAD, ["reason"], "x" * 201),
    ("reason-unknown", BAD, ["reason"], "checksum mismatch"),
    ("source-long", BAD, ["source"], "x" * 65),
    # bin lengths and str/bin confusion
    ("file-id-31", HAVE, ["file_id"], FID[:31]),
    ("file-id-33", HAVE, ["file_id"], FID + b"\x00"),
    ("file-id-empty", HAVE, ["file_id"], b""),
    ("file-id-str", HAVE, ["file_id"], "a" * 32),
    ("file-id-nil", HAVE, ["file_id"], None),
    ("known-file-id-short", GET, ["known_file_id"], FID[:16]),
    ("known-file-id-str", GET, ["known_file_id"], "x" * 32),
    ("nested-file-id-short", REG, ["holdings", 0, "file_id"], FID[:-1]),
    ("entry-file-id-str", FILES, ["files", 0, "file_id"], "x" * 32),
    ("digests-not-multiple", FINFO, ["digests"], b"\x00" * 33),
    ("digests-str", FINFO, ["digests"], "x" * 32),
    ("name-bytes", GET, ["name"], b"file"),
    ("peer-name-bytes", REG, ["name"], b"peer"),
    ("endpoint-bytes", REG, ["endpoint"], EP.encode()),
    ("error-code-bytes", ERR, ["code"], b"x"),
    ("reason-bytes", BAD, ["reason"], b"x"),
    # lists and nested structures of the wrong shape
    ("holdings-map", REG, ["holdings"], {"a": 1}),
    ("holding-list", REG, ["holdings"], [[FID, []]]),
    ("sources-item-str", FINFO, ["sources"], ["broker"]),
    ("files-item-nil", FILES, ["files"], [None]),
    ("stats-list", SAMPLES[17], ["stats"], [1, 2]),
    ("stats-nil", SAMPLES[17], ["stats"], None),
]


@pytest.mark.parametrize(
    ("msg", "path", "value"), [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS]
)
def test_bad_field_is_rejected(msg: Message, path: list[Any], value: Any) -> None:
    rejects(mutate(msg, path, value))


def test_bad_field_table_mutates_only_valid_samples() -> None:
    # every sample the table mutates decodes fine as is: the rejections above are due to the mutation
    for _, msg, _, _ in BAD_FIELDS:
        assert decode(encode(msg)) == msg


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["rid"], 0),
        (["rid"], MAX_RID),
        (["first"], MAX_SEGMENTS - 1),
        (["count"], 1),
        (["count"], MAX_RUN_SEGMENTS),
    ],
)
def test_boundary_values_are_accepted(path: list[Any], value: Any) -> None:
    msg = SEGREQ if path[0] != "rid" else SAMPLES[10]
    back = decode(mutate(msg, path, value))
    assert getattr(back, path[0]) == value


@pytest.mark.parametrize(
    "runs",
    [
        [[1]],
        [[1, 2, 3]],
        [1, 2],
        [[1, "a"]],
        [["0", 1]],
        [[0.0, 1]],
        [[0, 1.0]],
        [None],
        [{"first": 0, "count": 1}],
        [[0, 1], [2]],
        {"0": 1},
        "0,1",
        None,
        [[b"\x00", 1]],
    ],
    ids=repr,
)
def test_runs_that_are_not_first_count_pairs_are_rejected(runs: Any) -> None:
    rejects(mutate(HAVE, ["runs"], runs))
    rejects(mutate(REG, ["holdings", 0, "runs"], runs))
    rejects(mutate(SEGDATA, ["missing"], runs))


def test_source_runs_may_be_nil_but_not_malformed() -> None:
    assert decode(mutate(FINFO, ["sources", 0, "runs"], None)).sources[0].runs is None  # type: ignore[attr-defined]
    rejects(mutate(FINFO, ["sources", 0, "runs"], [[0]]))


# --------------------------------------------------------------------------- names and endpoints

GOOD_PEER_NAMES = ["a", "Z", "0", "peer-1", "A.b_c-9", "x" * 64, "9.9.9"]
BAD_PEER_NAMES = [
    "",
    "-x",
    ".x",
    "_x",
    "a b",
    "a/b",
    "x" * 65,
    "pé",
    "a:b",
    "a\x00",
    "\npeer",
    "a\tb",
    "peer\n",  # `$` alone would let a final newline through
    "a\n",
    "broker",  # reserved: the origin's source name
    "local",  # reserved: segments a peer already had
]


@pytest.mark.parametrize("name", GOOD_PEER_NAMES)
def test_good_peer_names_are_accepted(name: str) -> None:
    assert decode(encode(Heartbeat(name, TOK, 1))) == Heartbeat(name, TOK, 1)
    assert decode(mutate(REG, ["name"], name)).name == name  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", BAD_PEER_NAMES, ids=repr)
def test_bad_peer_names_are_rejected(name: str) -> None:
    rejects([pack({"op": "hb", "name": name, "token": TOK, "seq": 1, "up_bps": 0})])
    rejects(mutate(REG, ["name"], name))


def test_reserved_names_are_still_valid_source_names() -> None:
    # "broker" is refused as a peer name, but it is what the origin is called in plans and reports
    msg = BadSource(1, FID, "broker", ((0, 1),), "refused")
    assert decode(encode(msg)) == msg
    assert decode(encode(FINFO)).sources[-1].name == "broker"  # type: ignore[attr-defined]
    assert decode([pack({"op": "hb", "name": "Broker", "token": TOK, "seq": 1, "up_bps": 0})]) == Heartbeat(
        "Broker", TOK, 1
    )


GOOD_ENDPOINTS = ["tcp://127.0.0.1:5555", "tcp://[::1]:1", "tcp://host-name.example:65535", "tcp://h:00080"]
BAD_ENDPOINTS = [
    "",
    "127.0.0.1:5555",
    "udp://127.0.0.1:5555",
    "ipc:///tmp/sock",
    "inproc://x",
    "tcp://127.0.0.1",
    "tcp://127.0.0.1:",
    "tcp://:5555",
    "tcp://127.0.0.1:123456",
    "tcp://h:0",
    "tcp://h:00000",
    "tcp://h:65536",
    "tcp://h:99999",
    "tcp://h:1\n",
    "tcp://h:1 ",
    "tcp://127.0.0.1:55a",
    "tcp://host name:1",
    "tcp://*:5555",
    "tcp://h/x:1",
    "TCP://h:1",
    " tcp://h:1",
    "tcp://" + "a" * 300 + ":1",
]


@pytest.mark.parametrize("endpoint", GOOD_ENDPOINTS)
def test_good_endpoints_are_accepted(endpoint: str) -> None:
    assert decode(mutate(REG, ["endpoint"], endpoint)).endpoint == endpoint  # type: ignore[attr-defined]
    assert decode(mutate(FINFO, ["sources", 0, "endpoint"], endpoint)).sources[0].endpoint == endpoint  # type: ignore[attr-defined]


@pytest.mark.parametrize("endpoint", BAD_ENDPOINTS, ids=repr)
def test_bad_endpoints_are_rejected(endpoint: str) -> None:
    rejects(mutate(REG, ["endpoint"], endpoint))
    rejects(mutate(REGD, ["heartbeat_endpoint"], endpoint))
    rejects(mutate(FINFO, ["sources", 1, "endpoint"], endpoint))


GOOD_FILE_NAMES = [
    "a",
    "dir/file.bin",
    "a b/c d.txt",
    "日本/ファイル",
    "x.zswarm",
    "a/..b/c..",
    "-",
    "x" * 1024,
]
BAD_FILE_NAMES = [
    "",
    "../x",
    "a/../b",
    "..",
    ".",
    "./a",
    "a/.",
    "/abs",
    "/",
    "a//b",
    "a/",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\x01",
    "a\x1fb",
    "a\nb",
    "\nb",
    "dir/a\rb",
    "a\tb",
    "file\n",  # `$` alone would let a final newline through
    "dir\n/file",
    ".zswarm",
    ".zswarm-tmp",
    "dir/.zswarm",
    "dir/.zswarmx/y",
    "x" * 1025,
    "é" * 513,  # 513 characters, but 1026 bytes in UTF-8
]


@pytest.mark.parametrize("name", GOOD_FILE_NAMES, ids=lambda n: repr(n)[:40])
def test_good_file_names_are_accepted(name: str) -> None:
    assert decode(encode(Get(1, name, None))) == Get(1, name, None)
    assert decode(mutate(FILES, ["files", 0, "name"], name)).files[0].name == name  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", BAD_FILE_NAMES, ids=lambda n: repr(n)[:40])
def test_bad_file_names_are_rejected(name: str) -> None:
    rejects(mutate(GET, ["name"], name))
    rejects(mutate(FINFO, ["name"], name))
    rejects(mutate(FILES, ["files", 0, "name"], name))


# --------------------------------------------------------------------------- free-form stats


def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def test_stats_nesting_limit() -> None:
    # top map at depth 0, its value at depth 1: a scalar may sit at depth 6, not deeper
    ok = {"k": nested_lists(5)}
    back = decode([pack({"op": "stats_reply", "rid": 1, "stats": ok})])
    assert isinstance(back, Stats)
    assert back.stats == ok
    rejects([pack({"op": "stats_reply", "rid": 1, "stats": {"k": nested_lists(6)}})], match="deeply")
    deep_maps: Any = 1
    for _ in range(7):
        deep_maps = {"k": deep_maps}
    rejects([pack({"op": "stats_reply", "rid": 1, "stats": deep_maps})], match="deeply")


def test_very_deep_nesting_anywhere_is_rejected_cleanly() -> None:
    deep = b"\x91" * 5000 + b"\x01"  # 5000 nested one-element arrays
    rejects([raw_map([(p("op"), p("stats_reply")), (p("rid"), p(1)), (p("stats"), deep)])])
    rejects([raw_map([(p("op"), p("ping")), (p("rid"), deep)])])


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "msg",
    [
        Ping(rid=-1),
        Ping(rid=True),
        Heartbeat(name="bad name", token=TOK, seq=1),
        Heartbeat(name="broker", token=TOK, seq=1),
        SegmentRequest(FID[:5], 0, 1),
        SegmentRequest(FID, 0, 0),
        Get(1, "../x", None),
        Have(1, FID, ((0, 0),)),
        Register(1, "p", "tcp://h:0", ()),
        FileInfo(1, "f", 0, FID, SEGMENT_SIZE, None, (), (), origin_lanes=0),
        Stats(1, {"k": object()}),
        Pong(1, 1, known=1),  # type: ignore[arg-type]
    ],
    ids=[
        "neg-rid",
        "bool-rid",
        "peer-name",
        "reserved-peer-name",
        "short-id",
        "count-0",
        "file-name",
        "empty-run",
        "port-0",
        "origin-lanes-0",
        "stats-object",
        "known-int",
    ],
)
def test_encode_refuses_invalid_messages(msg: Message) -> None:
    # encode validates exactly as decode does: a bug is caught at the sender
    with pytest.raises(MalformedMessage):
        encode(msg)


def test_encode_accepts_a_str_enum_and_decode_returns_plain_str() -> None:
    from common.errors import WireCode

    frames = encode(Error(1, WireCode.NOT_FOUND, "no such file"))
    back = decode(frames)
    assert isinstance(back, Error)
    assert back.code == "not_found"
    assert type(back.code) is str


def test_long_error_messages_are_truncated_to_the_limit() -> None:
    msg = Error(1, "internal", "x" * 5000)
    assert len(msg.message) == protocol.MAX_ERROR_MESSAGE
    assert msg.message.endswith("...")
    back = decode(encode(msg))
    assert back == msg
    exact = Error(1, "internal", "y" * protocol.MAX_ERROR_MESSAGE)
    assert exact.message == "y" * protocol.MAX_ERROR_MESSAGE
    # a received message longer than the limit is still malformed
    rejects([pack({"op": "error", "rid": 1, "code": "x", "message": "z" * (protocol.MAX_ERROR_MESSAGE + 1)})])


# --------------------------------------------------------------------------- rid_of


def test_rid_of_recovers_rid_of_an_invalid_request() -> None:
    assert rid_of([pack({"op": "get", "rid": 77, "name": "../x", "known_file_id": None})]) == 77
    assert rid_of([pack({"op": "bogus", "rid": 5})]) == 5


@pytest.mark.parametrize(
    "frames",
    [[b"\xc1"], [pack([1])], [pack({"rid": -1})], [pack({"rid": MAX_RID + 1})], [pack({"rid": True})], []],
    ids=["garbage", "list", "neg", "big", "bool", "no-frames"],
)
def test_rid_of_falls_back_to_zero(frames: list[bytes]) -> None:
    assert rid_of(frames) == 0


# --------------------------------------------------------------------------- fuzzing


def _check_decode(frames: list[Any], allowed: tuple[type[Message], ...] | None = None) -> str:
    try:
        msg = decode(frames, allowed=allowed)
    except MalformedMessage:
        return "rejected"
    assert isinstance(msg, Message)
    if allowed is not None:
        assert type(msg) in allowed
    # anything decode accepts must survive a round trip
    assert decode(encode(msg)) == msg
    return "accepted"


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and buf:  # flip a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif kind == 1 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 2:  # insert bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 8))
        elif kind == 3 and buf:  # delete a slice
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 8)]
        elif kind == 4 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        else:  # interesting msgpack type bytes
            if buf:
                buf[rng.randrange(len(buf))] = rng.choice(
                    [0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC7, 0xD4, 0xD6, 0xDC, 0xDE, 0xDF, 0xCF, 0xD3, 0x90, 0x80]
                )
    return bytes(buf)


def test_seeded_mutation_fuzz_never_raises_anything_but_malformed() -> None:
    rng = random.Random(0x5EED)
    encoded = [[bytes(f) for f in encode(m)] for m in SAMPLES]
    outcomes = {"accepted": 0, "rejected": 0}
    for _ in range(2000):
        frames = list(rng.choice(encoded))
        frames[0] = _mutate_bytes(rng, frames[0])
        roll = rng.random()
        if roll < 0.05:
            frames.append(b"extra")
        elif roll < 0.10 and len(frames) > 1:
            frames.pop()
        allowed = rng.choice([None, None, TRACKER_REQUESTS, (SegmentData, Error)])
        outcomes[_check_decode(frames, allowed)] += 1
    # the fuzz explores both sides: some mutations stay valid, most do not
    assert outcomes["rejected"] > 1000
    assert outcomes["accepted"] > 0


@HYPO
@given(head=st.binary(max_size=200), extra=st.lists(st.binary(max_size=8), max_size=2))
def test_arbitrary_bytes_never_raise_anything_but_malformed(head: bytes, extra: list[bytes]) -> None:
    _check_decode([head, *extra])


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 63), (1 << 64) - 1),
    st.floats(allow_nan=True),
    st.text(max_size=10),
    st.binary(max_size=40),
)
_values = st.recursive(
    _leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(HYPO, max_examples=100)
@given(
    op=st.sampled_from(sorted(MESSAGES)),
    fields=st.dictionaries(
        st.sampled_from(
            sorted({k for cls in MESSAGES.values() for k in cls.SCHEMA} | {"runs", "first", "count"})
        ),
        _values,
        max_size=10,
    ),
    payload=st.lists(st.binary(max_size=16), max_size=2),
)
def test_structured_garbage_never_raises_anything_but_malformed(
    op: str, fields: dict[str, Any], payload: list[bytes]
) -> None:
    _check_decode([pack({"op": op, **fields}), *payload])


@HYPO
@given(
    sample=st.sampled_from(SAMPLES),
    key=st.text(min_size=1, max_size=12),
    value=_values,
)
def test_one_field_replaced_never_raises_anything_but_malformed(
    sample: Message, key: str, value: Any
) -> None:
    header = header_of(sample)
    names = [k for k in header if k != "op"]
    target = names[len(key) % len(names)] if names else key
    header[target] = value
    frames: list[Any] = [pack(header)]
    if sample.PAYLOAD:
        frames.append(b"p")
    _check_decode(frames)


def test_protocol_constants_are_consistent() -> None:
    assert MAX_FILE_SIZE == MAX_SEGMENTS * SEGMENT_SIZE
    assert protocol.PROTOCOL_VERSION == 2
    assert all(op == cls.OP for op, cls in MESSAGES.items())


# --------------------------------------------------------------------------- tracker requests:
# bounded by op before decoding (issue 9), read field by field above STREAM_DECODE_BYTES


@pytest.fixture
def always_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request frame takes the field-by-field reader, however small."""
    monkeypatch.setattr(protocol, "STREAM_DECODE_BYTES", 0)


REQUEST_SAMPLES = [m for m in SAMPLES if isinstance(m, protocol.TRACKER_REQUESTS)]


@pytest.mark.parametrize("msg", REQUEST_SAMPLES, ids=lambda m: m.OP)
def test_the_streaming_reader_decodes_every_request_alike(msg: Message, always_stream: None) -> None:
    assert protocol.decode_request(encode(msg)) == msg


REQUEST_BAD_FIELDS = [c for c in BAD_FIELDS if isinstance(c[1], protocol.TRACKER_REQUESTS)]


@pytest.mark.parametrize(
    ("msg", "path", "value"), [c[1:] for c in REQUEST_BAD_FIELDS], ids=[c[0] for c in REQUEST_BAD_FIELDS]
)
def test_the_streaming_reader_refuses_what_decode_refuses(
    msg: Message, path: list[Any], value: Any, always_stream: None
) -> None:
    with pytest.raises(MalformedMessage):
        protocol.decode_request(mutate(msg, path, value))


@pytest.mark.parametrize(
    "header",
    [
        {"op": "ping", "rid": 1, "rid2": 1},  # unknown key
        {"op": "ping"},  # missing key
        {"op": "pong", "rid": 1, "session": 1, "known": True, "recheck": []},  # a reply
        {"op": "have", "rid": 1, "file_id": FID, "runs": [[0, 1]], "x": {"a": [1, 2]}},
        {"op": "have", "rid": 1, "file_id": FID, "runs": [[0, 1, 2]]},
        {"op": "have", "rid": 1, "file_id": FID, "runs": [[0, [1]]]},
        {"op": "have", "rid": 1, "file_id": FID, "runs": [[0, 1.0]]},
        {"op": "have", "rid": 1, "file_id": [FID], "runs": []},
        {"rid": 1, "op": "get", "name": "../x", "known_file_id": None},
        {"op": "get", "rid": 1, "name": "a\u202eb", "known_file_id": None},  # bidi control
    ],
    ids=repr,
)
def test_the_streaming_reader_refuses_bad_shapes(header: dict[str, Any], always_stream: None) -> None:
    with pytest.raises(MalformedMessage):
        protocol.decode_request([pack(header)])


def test_duplicate_keys_and_trailing_bytes_are_refused_when_streaming(always_stream: None) -> None:
    dup = raw_map([(p("op"), p("ping")), (p("rid"), p(1)), (p("rid"), p(2))])
    with pytest.raises(MalformedMessage, match=r"duplicate|keys"):
        protocol.decode_request([dup])
    with pytest.raises(MalformedMessage, match="trailing"):
        protocol.decode_request([encode(Ping(1))[0] + b"\x00"])
    with pytest.raises(MalformedMessage):
        protocol.decode_request([raw_map([(p("op"), p("ping")), (p("rid"), b"\xd4\x01\x00")])])  # ext


def test_each_op_has_its_frame_limit_checked_before_decoding() -> None:
    padded = {"op": "ping", "rid": 7, "pad": "x" * 5000}
    with pytest.raises(MalformedMessage, match="exceeds the 1024"):
        protocol.decode_request([pack(padded)])
    big_get = pack({"op": "get", "rid": 7, "name": "n" * 1024, "known_file_id": None, "x": b"y" * 8000})
    with pytest.raises(MalformedMessage, match="exceeds the 8192"):
        protocol.decode_request([big_get])
    # A frame of 700 KB of empty lists is refused at its first wrong byte: fast, nothing built.
    bomb = pack({"op": "have", "rid": 5, "file_id": FID, "runs": [[]] * 700_000})
    assert len(bomb) > protocol.STREAM_DECODE_BYTES
    with pytest.raises(MalformedMessage, match="more than 65536"):
        protocol.decode_request([bomb])
    bomb = pack({"op": "have", "rid": 5, "file_id": FID, "runs": [[]] * 60_000})
    with pytest.raises(MalformedMessage, match="run is not"):
        protocol.decode_request([bomb])
    assert protocol.rid_of([bomb]) == 5  # found without decoding the runs
    with pytest.raises(MalformedMessage, match="exceeds 1048576"):
        protocol.decode_request([b"\x90" * (protocol.MAX_REQUEST_BYTES + 1)])


def test_register_and_have_sizes_agree_with_the_spec() -> None:
    runs = tuple((3 * i, 2) for i in range(protocol.MAX_REQUEST_RUNS))
    have = Have(1, FID, runs)
    assert len(encode(have)[0]) <= protocol.RUNS_REQUEST_MAX_BYTES
    assert protocol.decode_request(encode(have)) == have
    with pytest.raises(MalformedMessage):
        encode(Have(1, FID, (*runs, (10**6, 1))))
    split = (Holding(FID, runs[:40_000]), Holding(FID2, runs[40_000:]))
    register = Register(1, "p", EP, split)
    assert protocol.decode_request(encode(register)) == register
    with pytest.raises(MalformedMessage, match="runs in all"):
        encode(Register(1, "p", EP, (*split, Holding(FID, ((0, 1),)))))
    too_many = tuple(Holding(i.to_bytes(4, "big") * 8, ()) for i in range(protocol.MAX_HOLDINGS + 1))
    with pytest.raises(MalformedMessage, match="more than 65536"):
        encode(Register(1, "p", EP, too_many))


def test_heartbeat_needs_a_token_and_a_sequence() -> None:
    with pytest.raises(MalformedMessage):
        decode([pack({"op": "hb", "name": "p", "up_bps": 0})])
    with pytest.raises(MalformedMessage):
        decode([pack({"op": "hb", "name": "p", "token": TOK[:8], "seq": 1, "up_bps": 0})])
    with pytest.raises(MalformedMessage):
        decode([pack({"op": "hb", "name": "p", "token": TOK, "seq": -1, "up_bps": 0})])
    assert decode([pack({"op": "hb", "name": "p", "token": TOK, "seq": 0, "up_bps": 0})]) == Heartbeat(
        "p", TOK, 0
    )


def test_source_keys_and_pong_rechecks() -> None:
    with pytest.raises(MalformedMessage):
        decode(mutate(FINFO, ["sources", 0, "public_key"], b"\x01" * 31))
    back = decode(encode(FINFO))
    assert back.sources[0].public_key == KEY and back.sources[1].public_key is None  # type: ignore[attr-defined]
    with pytest.raises(MalformedMessage):
        encode(Pong(1, 1, True, tuple([FID] * (protocol.MAX_RECHECK + 1))))
