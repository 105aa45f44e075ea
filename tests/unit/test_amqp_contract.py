"""The py-amqp internals that ``sources/amqp_wire.FrameReader`` relies on, checked on the
installed py-amqp with its real classes over a real socket pair (no broker).

FrameReader replaces a plain TCP connection's ``transport.read_frame`` and parses frames
from large reads. That rests on things py-amqp does not promise: the transport class, where
it keeps bytes it has read but not parsed (``_read_buffer``), that the connection reads
every frame through ``transport.read_frame()`` and hands it, a ``(type, channel, payload)``
tuple, to ``on_inbound_frame``, and that ``transport.connected`` is what marks the
connection broken. pyproject.toml bounds py-amqp (``amqp``) to the releases these tests
passed on; when a new release changes any of it, the test that fails names the attribute.
tests/integration/test_broker_rabbitmq.py checks the same on a live RabbitMQ connection.
"""
from __future__ import annotations

import inspect
import socket
import struct

import amqp
import amqp.connection
import amqp.exceptions
import amqp.transport
import pytest

from celery_health_exporter.sources.amqp_wire import FrameReader
from celery_health_exporter.sources.base import is_outage

WHO = f"py-amqp {amqp.__version__}"
HEARTBEAT = struct.pack(">BHI", 8, 0, 0) + b"\xce"


def broken(attribute: str, what: str) -> str:
    return (f"{WHO}: {attribute} {what}; sources/amqp_wire.FrameReader relies on it: adapt it, "
            "or bound amqp in pyproject.toml below this release")


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.settimeout(2.0)
    yield ours, theirs
    ours.close()
    theirs.close()


def tcp_transport(sock: socket.socket):
    """py-amqp's own TCPTransport over ``sock``, set up as its connect() does after the TCP
    handshake (``_setup_transport``)."""
    transport = amqp.transport.TCPTransport("127.0.0.1:1")  # the constructor does not connect
    transport.sock = sock
    transport._setup_transport()
    transport.connected = True
    return transport


def test_plain_connections_use_tcp_transport():
    cls = getattr(amqp.transport, "TCPTransport", None)
    assert inspect.isclass(cls), broken("amqp.transport.TCPTransport", "is gone")
    made = amqp.transport.Transport("127.0.0.1:1", ssl=False)
    assert type(made) is cls, broken("amqp.transport.Transport(ssl=False)",
                                     f"makes a {type(made).__name__}, not a TCPTransport")


def test_unparsed_bytes_wait_in__read_buffer(pair):
    ours, theirs = pair
    transport = tcp_transport(ours)
    assert hasattr(transport, "_read_buffer"), broken("TCPTransport._read_buffer", "is not set up")
    assert isinstance(transport._read_buffer, (bytes, bytearray)), broken(
        "TCPTransport._read_buffer", f"is a {type(transport._read_buffer).__name__}, not bytes")
    assert hasattr(transport, "read_frame"), broken("TCPTransport.read_frame", "is gone")
    frame = struct.pack(">BHI", 3, 1, 5) + b"hello\xce"
    theirs.sendall(frame[:5])
    ours.settimeout(0.05)
    with pytest.raises(socket.timeout):  # py-amqp's own read, cut short mid-frame
        transport.read_frame()
    assert bytes(transport._read_buffer) == frame[:5], broken(
        "TCPTransport._read_buffer", "does not keep the bytes of a read cut short")
    reader = FrameReader(transport)  # takes them over
    theirs.sendall(frame[5:])
    ours.settimeout(2.0)
    assert reader.read_frame() == (3, 1, b"hello")


def test_the_connection_reads_every_frame_through_transport_read_frame(pair):
    ours, theirs = pair
    connection = amqp.connection.Connection(host="127.0.0.1:1")  # not connected: no I/O
    connection.transport = tcp_transport(ours)
    for name in ("frame_handler_cls", "on_inbound_method", "blocking_read", "bytes_recv"):
        assert hasattr(connection, name), broken(f"Connection.{name}", "is gone")
    connection.on_inbound_frame = connection.frame_handler_cls(connection, connection.on_inbound_method)

    reader = FrameReader.install(connection)
    assert reader is not None, broken("Connection.transport", "is not a TCPTransport on a plain connection")
    assert connection.transport.read_frame == reader.read_frame
    theirs.sendall(HEARTBEAT * 3)
    reader.drain(connection, 1.0)  # every frame there goes to on_inbound_frame
    assert connection.bytes_recv == 3, broken("Connection.on_inbound_frame",
                                               "did not take our (type, channel, payload) frames")
    # py-amqp's own synchronous wait (the handshake, close, a declare's answer) reads
    # through us: two frames arrive in one write, our reader took both in one recv
    theirs.sendall(HEARTBEAT * 2)
    connection.blocking_read(timeout=1.0)
    assert connection.bytes_recv == 4 and len(reader.pending) == 1, broken(
        "Connection.blocking_read", "does not read frames through transport.read_frame()")


def test_connected_false_marks_the_connection_broken(pair):
    ours, theirs = pair
    connection = amqp.connection.Connection(host="127.0.0.1:1")
    connection.transport = tcp_transport(ours)
    assert connection.connected, broken("Connection.connected", "is not the transport's connected")
    theirs.close()
    with pytest.raises(OSError):
        FrameReader(connection.transport).read_frame()
    assert not connection.connected, broken("Connection.connected",
                                            "does not follow transport.connected = False")


def test_what_frame_reader_raises_is_an_outage_not_a_bug():
    """A bad frame end (py-amqp's UnexpectedFrame) and a closed socket make the events source
    reconnect (sources/base.is_outage), as they do when py-amqp's own reader raises them."""
    unexpected = getattr(amqp.exceptions, "UnexpectedFrame", None)
    assert unexpected is not None, broken("amqp.exceptions.UnexpectedFrame", "is gone")
    assert is_outage(unexpected("Received frame_end 0x00 while expecting 0xce")), broken(
        "amqp.exceptions.UnexpectedFrame", "is no longer an AMQP connection error")
    assert is_outage(OSError("Server unexpectedly closed connection"))
