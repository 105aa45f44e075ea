"""The Redis subscription socket read ahead, and the pub/sub replies parsed, for
the events source on Redis.

Events on Redis are pub/sub: a reader thread pulls the subscription socket in
large chunks so that Redis's ``client-output-buffer-limit pubsub`` is never
reached while the exporter catches up, and the events thread parses the RESP
frames it takes from that backlog.
"""
from __future__ import annotations

import collections
import socket
import threading
import time

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


class _Incomplete(Exception):
    """The value at hand is not all there yet."""


_LENGTH_PREFIXED = (36, 33, 61)  # '$' bulk string, '!' bulk error, '=' verbatim string
_AGGREGATES = {42: 1, 62: 1, 126: 1, 37: 2, 124: 2}  # '*' array, '>' push, '~' set: n items; '%' map, '|' attribute: 2n
_LINES = (43, 45, 58, 95, 35, 44, 40)  # '+' '-' ':' '_' '#' ',' '(': one line each
_ERRORS = (45, 33)  # '-' and '!'


def _protocol_error(what: str, buf: bytes, pos: int) -> ConnectionError:
    return ConnectionError(f"Redis protocol error: {what} at {bytes(buf[pos:pos + 40])!r}")


def _resp_value(buf: bytes, pos: int, size: int):
    """The RESP2/RESP3 value at ``pos`` and the position after it; raises
    ``_Incomplete``. Strings are bytes (``None`` for a null); one-line values
    are (type byte, text) tuples, so that nothing else passes for a string."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind in _LENGTH_PREFIXED or kind in _AGGREGATES:
        try:
            count = int(buf[pos + 1:nl])
        except ValueError:
            raise _protocol_error("a length that is not a number", buf, pos) from None
        if count < 0:  # null string or array
            return None, nl + 2
        if kind in _LENGTH_PREFIXED:
            end = nl + 2 + count
            if end + 2 > size:
                raise _Incomplete
            if buf[end] != 13 or buf[end + 1] != 10:
                raise _protocol_error("a string longer than its length", buf, pos)
            value = buf[nl + 2:end]
            return (value if kind == 36 else (kind, value)), end + 2
        pos = nl + 2
        items = []
        for _ in range(count * _AGGREGATES[kind]):
            item, pos = _resp_value(buf, pos, size)
            items.append(item)
        return items, pos
    if kind in _LINES:
        return (kind, buf[pos + 1:nl]), nl + 2
    raise _protocol_error("an unknown type byte", buf, pos)


class PubSubParser:
    """Incremental RESP2/RESP3 parser for a subscription: yields message payloads.

    Messages are arrays (``*`` or RESP3 push ``>``) of bulk strings:
    ``pmessage pattern channel payload`` and ``message channel payload``.
    Every other reply (subscribe confirmations, ``pong``, one-line replies,
    RESP3 maps, sets, attributes) is skipped whole; an error reply or bytes
    that are not RESP raise ``ConnectionError`` (the events source then
    reconnects): a stream out of step is never read as messages.
    """

    def __init__(self):
        self.buf = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data if self.buf else data
        out = []
        pos = 0
        size = len(buf)
        try:
            while pos < size:
                value, end = _resp_value(buf, pos, size)
                if type(value) is list:
                    if value and (value[0] == b"pmessage" or value[0] == b"message"):
                        payload = value[-1]
                        if len(value) != (4 if value[0] == b"pmessage" else 3) or type(payload) is not bytes:
                            raise _protocol_error("a malformed message", buf, pos)
                        out.append(payload)
                elif type(value) is tuple and value[0] in _ERRORS:
                    raise ConnectionError(f"Redis: {value[1].decode(errors='replace')}")
                pos = end
        except _Incomplete:
            pass
        except ConnectionError:
            # Kept where it is: the messages before it go out first, then every
            # feed (also of b"") fails the same way.
            self.buf = buf[pos:]
            if out:
                return out
            raise
        self.buf = buf[pos:]
        return out
