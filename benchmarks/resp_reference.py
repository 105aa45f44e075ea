"""The hand-written RESP parser the events source used before hiredis, kept only as a
reference for ``benchmarks.run`` (consumer ``ours-resp-reference``): the same exporter
with this parser in place of ``hiredis.Reader``, so that one run measures both.

    python -m benchmarks.resp_reference --broker-url redis://... [exporter flags]

runs the exporter with this parser patched in. Not used by the package.
"""
from __future__ import annotations

import sys


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


def main(argv=None) -> int:
    from celery_health_exporter import cli
    from celery_health_exporter.sources import events, redis_wire

    redis_wire.PubSubParser = events.PubSubParser = PubSubParser
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
