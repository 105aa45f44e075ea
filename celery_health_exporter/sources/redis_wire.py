"""The Redis subscription socket read ahead, and the pub/sub replies parsed, for
the events source on Redis.

Events on Redis are pub/sub: a reader thread pulls the subscription socket in
large chunks so that Redis's ``client-output-buffer-limit pubsub`` is never
reached while the exporter catches up, and the events thread parses what it
takes from that backlog (``PubSubParser``, hiredis) and unwraps each message's
kombu envelope (``unwrap``).
"""
from __future__ import annotations

import base64
import binascii
import collections
import json
import socket
import threading
import time

import hiredis

from ..state.ingest import IngestStats

READ_CHUNK = 1 << 20
TAKE_LIMIT = 4 << 20  # bytes the events thread parses at a time
SOCKET_RCVBUF = 4 << 20


class RedisReader(threading.Thread):
    """Reads the subscription socket as fast as Redis writes it, into memory.

    Redis disconnects a subscriber whose output buffer passes its limit (32 MB
    by default): reading ahead moves that buffer into this process, bounded by
    ``backlog_limit`` bytes (--event-backlog-max-mb); past it the reader pauses and
    Redis's limit applies.
    """

    def __init__(self, sock, ingest: IngestStats, stopping, backlog_limit: int = 512 << 20):
        super().__init__(name="events-redis-reader", daemon=True)
        self.backlog_limit = backlog_limit
        self.sock = sock
        self.ingest = ingest
        self.stopping = stopping
        self.chunks: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.last_data = time.monotonic()
        self._halt = False
        self._outgoing: list = []

    def run(self) -> None:
        sock = self.sock
        try:
            sock.settimeout(1.0)
            while not self._halt and not self.stopping():
                if self.ingest.backlog_bytes > self.backlog_limit:
                    time.sleep(0.05)
                    continue
                if self._outgoing:  # sent from this thread: TLS sockets must not read and write concurrently
                    sock.sendall(self._outgoing.pop())
                try:
                    data = sock.recv(READ_CHUNK)
                except socket.timeout:
                    continue
                if not data:
                    raise ConnectionError("Redis closed the subscription")
                self.last_data = time.monotonic()
                with self.cond:
                    self.chunks.append(data)
                    self.ingest.backlog_bytes += len(data)
                    self.cond.notify()
        except BaseException as exc:  # handed to the events thread, which reconnects
            with self.cond:
                self.error = exc
                self.cond.notify()

    def take(self, timeout: float, limit: int = TAKE_LIMIT) -> bytes:
        """Up to about ``limit`` bytes read so far (waiting up to ``timeout`` for
        something), or raise the reader's error once everything was taken. Taking
        a slice at a time keeps the peak memory near the backlog itself."""
        with self.cond:
            if not self.chunks and self.error is None:
                self.cond.wait(timeout)
            if not self.chunks:
                if self.error is not None and not self._halt:
                    raise self.error
                return b""
            chunks = self.chunks
            taken, size = [], 0
            while chunks and size < limit:
                chunk = chunks.popleft()
                taken.append(chunk)
                size += len(chunk)
            self.ingest.backlog_bytes -= size
            return taken[0] if len(taken) == 1 else b"".join(taken)

    def send(self, data: bytes) -> None:
        """Queue a command (our PING); the reader thread writes it within a second."""
        self._outgoing.append(data)

    def stop(self) -> None:
        self._halt = True
        if self.is_alive():
            self.join(2.0)


# hiredis drops the bytes it has parsed by moving what is left to the front of its
# buffer, after every reply once 1 KiB is consumed: fed a whole take (MiBs) at once,
# that is quadratic (70,000 replies/s at 4 MiB, 1.7 million at 16 KiB on this machine).
FEED_SLICE = 16 << 10
_INCOMPLETE = object()  # hiredis's "not all there yet": not False, which RESP3's #f also is
_MESSAGE_SIZES = {b"pmessage": 4, b"message": 3}
MALFORMED_ENVELOPE = (ValueError, TypeError, KeyError, AttributeError, binascii.Error)


class PubSubParser:
    """Incremental RESP2/RESP3 parser for a subscription: yields message payloads.

    hiredis (the C parser redis-py uses) splits the stream into replies.
    Messages are arrays (``*`` or RESP3 push ``>``) of bulk strings:
    ``pmessage pattern channel payload`` and ``message channel payload``.
    Every other reply (subscribe confirmations, ``pong``, one-line replies,
    RESP3 maps, sets, attributes) is skipped whole; an error reply or bytes
    that are not RESP raise ``ConnectionError`` (the events source then
    reconnects) at the first byte out of step: no message from behind it is
    read. (hiredis does not check the CRLF after a bulk string: one that is
    longer than its length passes on cut to it, and the stream fails right after.)
    """

    def __init__(self):
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._error: ConnectionError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads of the messages completed by ``data``. An error comes after
        the messages before it, then with every later feed (also of b"")."""
        if self._error is not None:
            raise self._error
        out: list[bytes] = []
        try:
            self._parse(memoryview(data), out)
        except hiredis.ProtocolError as exc:
            self._error = ConnectionError(f"Redis protocol error: {str(exc).removeprefix('Protocol error, ')}")
        except ConnectionError as exc:
            self._error = exc
        if self._error is not None and not out:
            raise self._error
        return out

    def _parse(self, data: memoryview, out: list) -> None:
        reader = self._reader
        gets = reader.gets
        append = out.append
        for start in range(0, len(data) or 1, FEED_SLICE):  # b"": drain what is there (an error left)
            reader.feed(data[start:start + FEED_SLICE])
            while (value := gets()) is not _INCOMPLETE:
                if isinstance(value, list):  # '*' array, RESP3 '>' push (a list), '~' set
                    size = _MESSAGE_SIZES.get(value[0]) if value and type(value[0]) is bytes else None
                    if size is not None:
                        payload = value[-1]
                        if len(value) != size or type(payload) is not bytes:
                            raise ConnectionError(f"Redis protocol error: a malformed message {value!r:.80}")
                        append(payload)
                elif isinstance(value, hiredis.ReplyError):
                    raise ConnectionError(f"Redis: {value}")


def unwrap(payload: bytes) -> tuple[bytes | str, str | None]:
    """(body, content type) of a kombu envelope: JSON with the body (base64 unless
    told otherwise) and its content type. Raises one of ``MALFORMED_ENVELOPE``."""
    envelope = json.loads(payload)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return body, envelope.get("content-type")
