"""AMQP 0-9-1 frames from large socket reads, for the events source on RabbitMQ.

py-amqp reads each frame with two to three ``recv`` calls of a few bytes; at
thousands of events a second that is most of the events thread's time. This
reader takes over py-amqp's ``read_frame`` and parses frames out of reads of
up to ``READ_CHUNK`` bytes. It relies on py-amqp internals (see the contract
test tests/unit/test_amqp_contract.py and the bounds in pyproject.toml).
"""
from __future__ import annotations

import collections
import socket
import struct

READ_CHUNK = 1 << 20
SOCKET_RCVBUF = 4 << 20


class FrameReader:
    """Stands in for py-amqp's ``transport.read_frame``: one ``recv`` of up to
    1 MiB yields every complete frame in it, instead of two or three ``recv``
    calls per frame. Partial frames stay buffered, so a read timeout loses nothing."""

    _header = struct.Struct(">BHI")

    def __init__(self, transport):
        self.transport = transport
        self.sock = transport.sock
        self.buf = bytes(transport._read_buffer or b"")
        self.pos = 0
        self.pending: collections.deque = collections.deque()

    @classmethod
    def install(cls, amqp_connection) -> FrameReader | None:
        from amqp.transport import TCPTransport

        transport = amqp_connection.transport
        if type(transport) is not TCPTransport:  # TLS keeps py-amqp's own reader
            return None
        reader = cls(transport)
        try:
            transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF)
        except OSError:
            pass
        transport.read_frame = reader.read_frame  # py-amqp's synchronous waits read through us too
        return reader

    def _fill(self) -> None:
        """Block (under the socket's timeout) until at least one frame is complete."""
        from amqp.exceptions import UnexpectedFrame

        unpack_from = self._header.unpack_from
        buf, pos = self.buf, self.pos
        pending = self.pending
        while True:
            size_total = len(buf)
            while size_total - pos >= 8:
                frame_type, channel, size = unpack_from(buf, pos)
                end = pos + 7 + size
                if end >= size_total:
                    break
                if buf[end] != 0xCE:
                    # Kept where it is: the good frames before it go out first, then
                    # every read fails the same way (never a frame from behind it).
                    self.buf, self.pos = buf, pos
                    if pending:
                        return
                    self.transport.connected = False
                    raise UnexpectedFrame(f"Received frame_end {buf[end]:#04x} while expecting 0xce")
                pending.append((frame_type, channel, buf[pos + 7:end]))
                pos = end + 1
            if pending:
                self.buf, self.pos = buf, pos
                return
            buf = buf[pos:]
            pos = 0
            self.buf, self.pos = buf, 0
            chunk = self.sock.recv(READ_CHUNK)
            if not chunk:
                self.transport.connected = False
                raise OSError("Server unexpectedly closed connection")
            buf = buf + chunk if buf else chunk

    def read_frame(self, unpack=None):
        if not self.pending:
            self._fill()
        return self.pending.popleft()

    def drain(self, amqp_connection, timeout: float) -> None:
        """Apply every frame that is there, waiting up to ``timeout`` for the first."""
        pending = self.pending
        if not pending:
            sock = self.sock
            previous = sock.gettimeout()
            sock.settimeout(timeout)
            try:
                self._fill()
            finally:
                sock.settimeout(previous)
        on_frame = amqp_connection.on_inbound_frame
        while pending:
            on_frame(pending.popleft())


