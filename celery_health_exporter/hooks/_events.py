"""The hooks' own link to the Celery event exchange: what the publisher and beat hooks
ship their events over, from their shipping threads.

A connection of its own, opened at the first publish, never the application's: a hook
must not disturb the pool the application publishes with. A publish never retries (the
hook's thread tries again at its next interval): on a failure the connection is
forgotten without a close handshake, which could block on a dead link, and the error
raised to the caller, which counts it.
"""
from __future__ import annotations


class EventLink:
    def __init__(self, app, connect_timeout: float):
        self.app = app
        self.connect_timeout = connect_timeout
        self._conn = None
        self._producer = None
        self._exchange = None

    def publish(self, body: dict, routing_key: str, hostname: str) -> None:
        """Send one event; callers serialise their publishes (one shipping lock each)."""
        try:
            producer, exchange = self._ensure_producer()
            producer.publish(body, exchange=exchange, routing_key=routing_key, declare=[exchange],
                             serializer="json", retry=False, headers={"hostname": hostname})
        except Exception:
            self._forget()
            raise

    def close(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.release()
            except Exception:
                pass

    def _ensure_producer(self):
        if self._producer is None:
            from celery.events.event import get_exchange

            conn = self.app.connection_for_write(heartbeat=0, connect_timeout=self.connect_timeout,
                                                 transport_options={"max_retries": 0})
            self._conn = conn
            conn.ensure_connection(max_retries=max(0, len(getattr(conn, "alt", ()) or ()) - 1),
                                   interval_start=0, timeout=self.connect_timeout)
            self._exchange = get_exchange(conn, name=self.app.conf.event_exchange)
            self._producer = conn.Producer(serializer="json")
        return self._producer, self._exchange

    def _forget(self) -> None:
        conn, self._conn, self._producer = self._conn, None, None
        if conn is not None:
            try:
                conn.collect()  # forget the sockets without a close handshake on a dead link
            except Exception:
                pass
