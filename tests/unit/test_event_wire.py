"""The wire parsers of the events source, fed chosen byte chunks (no broker, no socket).

``FrameReader`` parses AMQP 0-9-1 frames out of large ``recv`` reads;
``PubSubParser`` parses RESP2/RESP3 pub/sub traffic; ``RedisReader.take``
hands the read-ahead buffer to the events thread a slice at a time. The
byte sources below are stand-ins for a socket, not for a broker: every byte
they return is a frame or a reply exactly as RabbitMQ or Redis writes it.
"""
from __future__ import annotations

import socket
import struct
import time

import pytest
from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_health_exporter.sources.amqp_wire import READ_CHUNK, FrameReader
from celery_health_exporter.sources.base import is_outage
from celery_health_exporter.sources.redis_wire import READ_CHUNK as REDIS_READ_CHUNK
from celery_health_exporter.sources.redis_wire import (FEED_SLICE, MALFORMED_ENVELOPE, TAKE_LIMIT, PubSubParser,
                                                      RedisReader, unwrap)
from celery_health_exporter.state.ingest import IngestStats

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------
# byte sources

class ChunkSocket:
    """``recv`` returns the given chunks one by one (never more than asked for,
    the rest of a chunk stays for the next call), then ``socket.timeout``, or
    b"" (a closed connection) when ``closed``."""

    def __init__(self, chunks, closed: bool = False):
        self.chunks = [c for c in chunks if c]
        self.closed = closed
        self.recvs = 0
        self.timeout = None
        self.timeouts_seen = []

    def recv(self, n: int) -> bytes:
        self.recvs += 1
        if not self.chunks:
            if self.closed:
                return b""
            raise socket.timeout("timed out")
        chunk = self.chunks[0]
        if len(chunk) > n:
            self.chunks[0] = chunk[n:]
            return chunk[:n]
        self.chunks.pop(0)
        return chunk

    def gettimeout(self):
        return self.timeout

    def settimeout(self, value):
        self.timeouts_seen.append(value)
        self.timeout = value

    def setsockopt(self, *args):
        pass

    def sendall(self, data):
        self.sent = data


class ChunkTransport:
    """What FrameReader uses of py-amqp's TCPTransport: ``sock``, ``_read_buffer``, ``connected``."""

    def __init__(self, chunks, closed: bool = False, read_buffer: bytes = b""):
        self.sock = ChunkSocket(chunks, closed)
        self._read_buffer = read_buffer
        self.connected = True


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


def read_all(reader: FrameReader) -> list:
    """Every frame the reader yields until its byte source runs dry."""
    frames = []
    while True:
        try:
            frames.append(reader.read_frame())
        except socket.timeout:
            return frames


def pyamqp_frames(data: bytes) -> list:
    """The oracle: py-amqp's own TCPTransport.read_frame over the same bytes."""
    transport = TCPTransport.__new__(TCPTransport)
    transport.sock = ChunkSocket([data])
    transport._setup_transport()
    transport.connected = True
    transport.raise_on_initial_eintr = True
    return [(t, c, bytes(p)) for t, c, p in read_all(transport)]


# A basic.deliver as RabbitMQ sends it: method, content header, body; then a heartbeat.
DELIVER = b"\x00\x3c\x00\x3c" + b"\x05ctag1" + struct.pack(">Q", 7) + b"\x00" + b"\x08celeryev" + b"\x0ctask.started"
BODY = b'[{"type": "task-started", "uuid": "u1"}]'
HEADER = b"\x00\x3c\x00\x00" + struct.pack(">Q", len(BODY)) + b"\x80\x00" + b"\x10application/json"
STREAM_FRAMES = [(1, 1, DELIVER), (2, 1, HEADER), (3, 1, BODY), (8, 0, b"")]
STREAM = b"".join(frame(*f) for f in STREAM_FRAMES)


# ---------------------------------------------------------------------------
# FrameReader

def test_many_frames_in_one_read_cost_one_recv():
    frames = [(1 + i % 3, i % 5, f"payload {i}".encode()) for i in range(2000)]
    transport = ChunkTransport([b"".join(frame(*f) for f in frames)])
    reader = FrameReader(transport)
    assert read_all(reader) == frames
    assert transport.sock.recvs == 2  # the one read, then the timeout that ends read_all


def test_split_at_every_byte_boundary():
    for cut in range(len(STREAM) + 1):
        reader = FrameReader(ChunkTransport([STREAM[:cut], STREAM[cut:]]))
        assert read_all(reader) == STREAM_FRAMES, cut


def test_split_into_single_bytes():
    reader = FrameReader(ChunkTransport([STREAM[i:i + 1] for i in range(len(STREAM))]))
    assert read_all(reader) == STREAM_FRAMES


def test_same_frames_as_pyamqp_reads():
    assert read_all(FrameReader(ChunkTransport([STREAM]))) == pyamqp_frames(STREAM) == STREAM_FRAMES


def test_large_payload_across_many_reads():
    payload = bytes(range(256)) * (3 * READ_CHUNK // 256 + 1)  # > 3 reads of READ_CHUNK
    data = frame(3, 2, payload) + frame(8, 0, b"")
    reader = FrameReader(ChunkTransport([data[i:i + 65536] for i in range(0, len(data), 65536)]))
    assert read_all(reader) == [(3, 2, payload), (8, 0, b"")]


def test_empty_payloads():
    data = frame(8, 0, b"") * 3 + frame(3, 1, b"")
    assert read_all(FrameReader(ChunkTransport([data]))) == [(8, 0, b"")] * 3 + [(3, 1, b"")]


def test_any_frame_type_is_passed_on_unchanged():
    """Framing only: what a frame type means is py-amqp's business (it raises for unknown ones)."""
    data = frame(99, 65535, b"x") + frame(0, 0, b"")
    assert read_all(FrameReader(ChunkTransport([data]))) == [(99, 65535, b"x"), (0, 0, b"")]


def test_a_read_timeout_mid_frame_loses_nothing():
    transport = ChunkTransport([STREAM[:20]])
    reader = FrameReader(transport)
    with pytest.raises(socket.timeout):
        reader.read_frame()
    transport.sock.chunks.append(STREAM[20:])
    assert read_all(reader) == STREAM_FRAMES


def test_bytes_py_amqp_had_buffered_come_first():
    transport = ChunkTransport([STREAM[11:]], read_buffer=STREAM[:11])
    assert read_all(FrameReader(transport)) == STREAM_FRAMES


def test_bad_frame_end_is_a_clear_error_after_the_good_frames():
    good = frame(1, 1, b"a") + frame(2, 1, b"b")
    bad = frame(3, 1, b"c", end=0x00)
    after = frame(3, 1, b"d")
    transport = ChunkTransport([good + bad + after])
    reader = FrameReader(transport)
    assert reader.read_frame() == (1, 1, b"a")
    assert reader.read_frame() == (2, 1, b"b")
    for _ in range(3):  # the stream is broken for good: never a frame from behind the bad one
        with pytest.raises(UnexpectedFrame, match="frame_end 0x00 while expecting 0xce"):
            reader.read_frame()
    assert transport.connected is False


def test_bad_frame_end_split_over_reads():
    data = frame(1, 1, b"a") + frame(3, 1, b"c" * 40, end=0x41)
    for cut in range(1, len(data)):
        transport = ChunkTransport([data[:cut], data[cut:]])
        reader = FrameReader(transport)
        assert reader.read_frame() == (1, 1, b"a")
        with pytest.raises(UnexpectedFrame):
            reader.read_frame()
        with pytest.raises(UnexpectedFrame):
            reader.read_frame()


def test_closed_connection_is_an_error():
    transport = ChunkTransport([STREAM[:30]], closed=True)
    reader = FrameReader(transport)
    with pytest.raises(OSError, match="closed"):
        reader.read_frame()
    assert transport.connected is False


def test_drain_applies_every_frame_there_and_restores_the_timeout():
    class Connection:
        def __init__(self):
            self.frames = []

        def on_inbound_frame(self, f):
            self.frames.append(f)

    transport = ChunkTransport([STREAM * 3])
    transport.sock.timeout = 7.0
    reader = FrameReader(transport)
    connection = Connection()
    reader.drain(connection, 0.25)
    assert connection.frames == STREAM_FRAMES * 3
    assert transport.sock.timeouts_seen == [0.25, 7.0] and transport.sock.timeout == 7.0
    with pytest.raises(socket.timeout):  # nothing more: the caller's loop goes on
        reader.drain(connection, 0.25)
    assert transport.sock.timeout == 7.0


amqp_frames = st.lists(st.tuples(st.sampled_from([1, 2, 3, 8]), st.integers(0, 65535),
                                 st.binary(max_size=300)), max_size=30)


@SETTINGS
@given(frames=amqp_frames, data=st.data())
def test_property_any_split_yields_the_same_frames(frames, data):
    stream = b"".join(frame(*f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    whole = read_all(FrameReader(ChunkTransport([stream])))
    assert whole == frames == pyamqp_frames(stream)
    assert read_all(FrameReader(ChunkTransport(chunks))) == whole


# ---------------------------------------------------------------------------
# PubSubParser

def bulk(value: bytes | None) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def array(*items: bytes, push: bool = False) -> bytes:
    return b"%s%d\r\n" % (b">" if push else b"*", len(items)) + b"".join(items)


def message(payload: bytes, channel: bytes = b"/0.celeryev/task.multi", push: bool = False) -> bytes:
    return array(bulk(b"message"), bulk(channel), bulk(payload), push=push)


def pmessage(payload: bytes, channel: bytes = b"/0.celeryev/task.multi", push: bool = False) -> bytes:
    return array(bulk(b"pmessage"), bulk(b"/0.celeryev/*"), bulk(channel), bulk(payload), push=push)


PSUBSCRIBED = array(bulk(b"psubscribe"), bulk(b"/0.celeryev/*"), b":1\r\n")
PONG2 = array(bulk(b"pong"), bulk(b""))
ENVELOPE = b'{"body": "W3sidHlwZSI6ICJ0YXNrLXN0YXJ0ZWQifV0=", "content-type": "application/json"}'


def feed_chunks(chunks) -> list[bytes]:
    parser = PubSubParser()
    out = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def test_resp2_and_resp3_messages_and_confirmations():
    stream = (PSUBSCRIBED + pmessage(b"a") + message(b"b") + PONG2 + pmessage(b"c", push=True)
              + message(b"d", push=True) + array(bulk(b"psubscribe"), bulk(b"x"), b":2\r\n", push=True)
              + b"+PONG\r\n" + pmessage(ENVELOPE))
    assert feed_chunks([stream]) == [b"a", b"b", b"c", b"d", ENVELOPE]


def test_split_at_every_byte_boundary_of_pubsub():
    stream = PSUBSCRIBED + pmessage(ENVELOPE) + message(b"x\r\ny") + b"+PONG\r\n" + pmessage(b"", push=True)
    expected = [ENVELOPE, b"x\r\ny", b""]
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == expected, cut
    assert feed_chunks([stream[i:i + 1] for i in range(len(stream))]) == expected


def test_many_messages_in_one_chunk():
    payloads = [b"event %d" % i for i in range(5000)]
    assert feed_chunks([b"".join(pmessage(p) for p in payloads)]) == payloads


def test_payloads_with_crlf_and_resp_lookalikes():
    tricky = [b"\r\n", b"a\r\nb\r\n", b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nx\r\n", b"-ERR not an error\r\n",
              b"$-1\r\n", b"\r\n\r\n\r\n"]
    assert feed_chunks([b"".join(pmessage(p) for p in tricky)]) == tricky


def test_large_payload_over_many_chunks():
    payload = (b'{"type": "task-succeeded"}\r\n' * 200_000)[: 5 * REDIS_READ_CHUNK]
    stream = pmessage(payload) + message(b"after")
    chunks = [stream[i:i + REDIS_READ_CHUNK] for i in range(0, len(stream), REDIS_READ_CHUNK)]
    assert feed_chunks(chunks) == [payload, b"after"]


def test_empty_payload_and_empty_feed():
    parser = PubSubParser()
    assert parser.feed(b"") == []
    assert parser.feed(message(b"")) == [b""]
    assert parser.feed(b"") == []


def test_null_bulk_strings_keep_the_stream_in_step():
    """(P)UNSUBSCRIBE without subscriptions names no channel: ``$-1``."""
    stream = (array(bulk(b"punsubscribe"), bulk(None), b":0\r\n") + message(b"a")
              + array(bulk(b"unsubscribe"), bulk(None)) + message(b"b") + b"*-1\r\n" + message(b"c"))
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == [b"a", b"b", b"c"], cut


def test_other_reply_types_are_skipped_whole():
    others = [
        b":42\r\n", b"+OK\r\n", b"_\r\n", b"#t\r\n", b",3.14\r\n", b"(12345678901234567890\r\n",
        bulk(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$3\r\nbad\r\n"),  # a lone bulk reply that looks like a message
        bulk(None), b"=15\r\ntxt:Some string\r\n",
        b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n$1\r\nx\r\n",  # RESP3 map with a nested array
        b"~2\r\n+a\r\n+b\r\n",  # RESP3 set
        b"|1\r\n+key\r\n+value\r\n",  # RESP3 attribute
        array(bulk(b"pong"), array(bulk(b"nested"), b":1\r\n")),
    ]
    stream = b"".join(o + message(b"%d" % i) for i, o in enumerate(others))
    expected = [b"%d" % i for i in range(len(others))]
    assert feed_chunks([stream]) == expected
    for cut in range(len(stream) + 1):
        assert feed_chunks([stream[:cut], stream[cut:]]) == expected, cut


@pytest.mark.parametrize("reply, match", [
    (b"-ERR wrong number of arguments\r\n", "Redis: ERR wrong number of arguments"),
    # RESP3's bulk error: hiredis does not know it (Redis sends it only after HELLO 3, which
    # kombu never says); a protocol error is a connection error all the same
    (b"!21\r\nSYNTAX invalid syntax\r\n", 'Redis protocol error: got "!"'),
])
def test_error_replies_raise_after_the_messages_before_them(reply, match):
    parser = PubSubParser()
    assert parser.feed(message(b"before") + reply + message(b"after")) == [b"before"]
    for _ in range(2):  # on every later feed, with or without new bytes
        with pytest.raises(ConnectionError, match=match):
            parser.feed(b"")
    with pytest.raises(ConnectionError, match=match):
        parser.feed(message(b"later"))
    with pytest.raises(ConnectionError, match=match):
        PubSubParser().feed(reply)


@pytest.mark.parametrize("garbage", [
    b"hello\r\n",  # no type byte: the stream is out of step
    b"*x\r\n",  # a length that is not a number
    b"*1\r\n$3\r\nabcdef\r\n",  # a bulk string longer than it says
    b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n:5\r\n",  # a message whose payload is not a string
    b"*2\r\n$7\r\nmessage\r\n$2\r\nch\r\n",  # a message without payload
], ids=["no-type-byte", "bad-length", "long-bulk", "int-payload", "no-payload"])
def test_protocol_errors_are_clear_never_a_misparse(garbage):
    with pytest.raises(ConnectionError, match="Redis protocol"):
        PubSubParser().feed(garbage + message(b"x"))
    parser = PubSubParser()
    assert parser.feed(message(b"good") + garbage + message(b"x")) == [b"good"]
    with pytest.raises(ConnectionError, match="Redis protocol"):
        parser.feed(b"")


@pytest.mark.parametrize("data", [b"-ERR x\r\n", b"hello\r\n", b"!3\r\nERR\r\n"])
def test_what_the_parser_raises_makes_the_source_reconnect(data):
    """An outage of the events source (reconnect), not a bug counted and skipped."""
    with pytest.raises(ConnectionError) as raised:
        PubSubParser().feed(data)
    assert is_outage(raised.value)


def test_a_message_longer_than_its_length_fails_right_after_it():
    """hiredis skips the two bytes after a bulk string without checking them: the message
    passes on cut to its length, then the next byte out of step fails the stream, and
    nothing from behind it comes out."""
    broken = array(bulk(b"message"), bulk(b"ch"), b"$3\r\nabcdef\r\n")
    parser = PubSubParser()
    assert parser.feed(message(b"good") + broken + message(b"x")) == [b"good", b"abc"]
    with pytest.raises(ConnectionError, match="Redis protocol error"):
        parser.feed(message(b"later"))


def test_deep_nesting_is_skipped_or_a_connection_error():
    """hiredis 3.5 refuses nesting past a limit, older releases take any depth: either way no
    crash, and the messages before it come out."""
    out = PubSubParser().feed(message(b"a") + b"*1\r\n" * 20_000 + b":1\r\n" + message(b"b"))
    assert out in ([b"a"], [b"a", b"b"]), out


def test_false_is_a_reply_not_the_end_of_the_data():
    """RESP3's ``#f``: hiredis's default "not enough data" is False too; the messages after it
    must come out in the same feed."""
    assert PubSubParser().feed(b"#f\r\n" + message(b"a") + b"#f\r\n" + message(b"b")) == [b"a", b"b"]


def test_a_large_take_is_fed_to_hiredis_in_slices():
    """Fed whole, hiredis's buffer compaction is quadratic in the size of a take; sliced,
    every message still comes out whole across the slice boundaries."""
    payloads = [b"%06d" % i * 50 for i in range(3 * TAKE_LIMIT // 300 // 10)]
    stream = b"".join(pmessage(p) for p in payloads)
    assert len(stream) > 3 * FEED_SLICE
    assert PubSubParser().feed(stream) == payloads


def test_what_the_parser_keeps_is_the_reply_in_progress_only():
    """The backlog is bounded in RedisReader (--event-backlog-max-mb); what the events thread
    took must not pile up again inside hiredis: after a feed, only the reply still incomplete
    (and less than the 1 KiB hiredis compacts at) stays in its buffer."""
    partial = pmessage(b"y" * 200_000)[:150_000]
    stream = b"".join(pmessage(b"x" * 300) for _ in range(30_000)) + partial  # ~10 MB
    parser = PubSubParser()
    assert len(parser.feed(stream)) == 30_000
    assert len(partial) <= parser._reader.len() < len(partial) + 1024


@SETTINGS
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_property_arbitrary_bytes_give_messages_or_a_connection_error(data, cuts):
    """Whatever the bytes, the production parser yields byte payloads or raises ConnectionError
    (a reconnect); never another exception, and once failed it stays failed."""
    parser = PubSubParser()
    bounds = sorted(c for c in cuts if c <= len(data))
    failed = False
    for a, b in zip([0, *bounds], [*bounds, len(data)]):
        try:
            out = parser.feed(data[a:b])
        except ConnectionError:
            failed = True
            continue
        assert not failed, "a failed parser yielded again"
        assert all(type(p) is bytes for p in out)


resp_frames = st.lists(st.one_of(
    st.tuples(st.sampled_from(["message", "pmessage"]), st.binary(max_size=200), st.booleans()),
    st.tuples(st.just("other"), st.sampled_from([PSUBSCRIBED, PONG2, b"+PONG\r\n", b":3\r\n", bulk(None),
                                                 array(bulk(b"punsubscribe"), bulk(None), b":0\r\n")]),
              st.just(False)),
), max_size=25)


@SETTINGS
@given(frames=resp_frames, data=st.data())
def test_property_any_split_yields_the_same_messages(frames, data):
    encode = {"message": message, "pmessage": pmessage}
    stream = b"".join(encode[kind](value, push=push) if kind in encode else value for kind, value, push in frames)
    expected = [value for kind, value, _ in frames if kind in encode]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    assert feed_chunks([stream]) == expected
    assert feed_chunks(chunks) == expected


def test_unwrap_a_kombu_envelope():
    assert unwrap(ENVELOPE) == ('W3sidHlwZSI6ICJ0YXNrLXN0YXJ0ZWQifV0=', "application/json")
    based = b'{"body": "W3sidHlwZSI6ICJ0YXNrLXN0YXJ0ZWQifV0=", "content-type": "application/json", ' \
            b'"properties": {"body_encoding": "base64"}}'
    assert unwrap(based) == (b'[{"type": "task-started"}]', "application/json")


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1, 2]", b'{"no": "body"}', b'"a string"', b'{"body": 1, "properties": []}',
    b'{"body": "abc", "properties": {"body_encoding": "base64"}}', b"\xff\xfe",
])
def test_unwrap_refuses_what_is_not_an_envelope(payload):
    with pytest.raises(MALFORMED_ENVELOPE):
        unwrap(payload)


# ---------------------------------------------------------------------------
# RedisReader.take

def loaded_reader(chunks) -> tuple[RedisReader, IngestStats]:
    """A reader whose thread is not started, with ``chunks`` read ahead."""
    ingest = IngestStats()
    reader = RedisReader(ChunkSocket([]), ingest, lambda: False)
    for chunk in chunks:
        reader.chunks.append(chunk)
        ingest.backlog_bytes += len(chunk)
    return reader, ingest


def test_take_stops_at_the_first_chunk_that_reaches_the_limit():
    chunks = [bytes([i]) * 1000 for i in range(10)]
    reader, ingest = loaded_reader(chunks)
    assert reader.take(0, limit=2500) == b"".join(chunks[:3])  # 3000 bytes: whole chunks only
    assert ingest.backlog_bytes == 7000
    assert reader.take(0, limit=1) == chunks[3]  # one chunk even when it alone is over the limit
    assert reader.take(0, limit=10**9) == b"".join(chunks[4:])
    assert ingest.backlog_bytes == 0
    assert reader.take(0) == b""


def test_take_default_limit_bounds_each_slice():
    reader, ingest = loaded_reader([b"x" * REDIS_READ_CHUNK] * 6)
    sizes = []
    while data := reader.take(0):
        sizes.append(len(data))
    assert sizes == [TAKE_LIMIT, 6 * REDIS_READ_CHUNK - TAKE_LIMIT]
    assert max(sizes) < TAKE_LIMIT + REDIS_READ_CHUNK and ingest.backlog_bytes == 0


def test_take_waits_up_to_its_timeout():
    reader, _ = loaded_reader([])
    started = time.monotonic()
    assert reader.take(0.2) == b""
    assert 0.15 < time.monotonic() - started < 2


def test_take_hands_out_the_data_before_the_error():
    reader, _ = loaded_reader([b"last bytes"])
    reader.error = ConnectionError("Redis closed the subscription")
    assert reader.take(0) == b"last bytes"
    with pytest.raises(ConnectionError, match="closed"):
        reader.take(0)
    reader._halt = True  # stopped on purpose: the error is no news
    assert reader.take(0) == b""


def test_reader_thread_reads_ahead_and_stops_quickly():
    class SlowSocket(ChunkSocket):
        def recv(self, n):
            if not self.chunks:
                time.sleep(0.01)
            return super().recv(n)

    chunks = [pmessage(b"%d" % i) for i in range(100)]
    sock = SlowSocket(chunks)
    ingest = IngestStats()
    reader = RedisReader(sock, ingest, lambda: False)
    reader.start()
    reader.send(b"*1\r\n$4\r\nPING\r\n")
    parser, out = PubSubParser(), []
    deadline = time.monotonic() + 5
    while len(out) < 100 and time.monotonic() < deadline:
        out += parser.feed(reader.take(0.1))
    assert out == [b"%d" % i for i in range(100)]
    assert ingest.backlog_bytes == 0
    deadline = time.monotonic() + 2
    while not hasattr(sock, "sent") and time.monotonic() < deadline:  # written by the reader thread
        time.sleep(0.01)
    started = time.monotonic()
    reader.stop()
    assert not reader.is_alive() and time.monotonic() - started < 2
    assert sock.sent == b"*1\r\n$4\r\nPING\r\n"


def test_reader_pauses_at_its_backlog_limit_and_resumes_when_it_is_taken():
    chunks = [pmessage(b"x" * 1000) for _ in range(50)]
    sock = ChunkSocket(list(chunks))
    ingest = IngestStats()
    reader = RedisReader(sock, ingest, lambda: False, backlog_limit=5000)
    reader.start()
    try:
        deadline = time.monotonic() + 5
        while ingest.backlog_bytes <= 5000 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # had it not paused, it would read everything meanwhile
        held = ingest.backlog_bytes
        assert 5000 < held <= 5000 + REDIS_READ_CHUNK and sock.chunks, held
        parser, out = PubSubParser(), []
        deadline = time.monotonic() + 5
        while len(out) < 50 and time.monotonic() < deadline:
            out += parser.feed(reader.take(0.1))
        assert len(out) == 50 and ingest.backlog_bytes == 0
    finally:
        reader.stop()
