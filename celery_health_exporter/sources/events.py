"""Celery events: the ``celeryev`` exchange, consumed on a queue of our own.

Celery's own receiver queue drops events older than 5 s (``x-message-ttl``):
a consumer that lags silently loses them. Ours keeps them for
``--event-queue-ttl`` and survives a reconnect for ``--event-queue-expires``,
bounded by ``--event-queue-max-length``. On Redis, events are pub/sub: nothing
is kept for a subscriber that is away, so the queue options do not apply.

The receive path is lean on purpose (see docs/scaling.md for the profile):

- RabbitMQ: kombu declares the queue, but messages are taken from py-amqp's
  channel with a raw callback (no kombu ``Message`` per event) and frames
  are parsed from large socket reads (amqp_wire.FrameReader).
- Redis: kombu declares the binding and opens the subscription; a reader
  thread then pulls the subscription socket in large chunks and the events
  thread parses the RESP frames from that backlog (redis_wire).

What RabbitMQ dropped from our queues is read from the management API (with
``--rabbitmq-management-url``) by a thread of its own, off the events thread.

With ``--shard-task-events NAME`` (RabbitMQ), task events come from a shared
queue NAME that several replicas consume (competing consumers, acked in
batches) while worker events still come to each replica's own queue.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid as uuidlib

from celery.events.event import get_exchange
from kombu import Queue

from ..logs import describe_error
from ..state.events import MalformedEvent, decode_body
from ..state.ingest import IngestStats
from .amqp_wire import FrameReader
from .base import Backoff, Source, is_outage
from .redis_wire import MALFORMED_ENVELOPE, SOCKET_RCVBUF, PubSubParser, RedisReader, unwrap

DRAIN_TIMEOUT = 0.5
REDIS_PING_INTERVAL = 10.0
REDIS_SILENCE_LIMIT = 35.0  # no byte at all (not even our PING's reply) for this long = a dead connection
SHARD_PREFETCH = 2000
SHARD_ACK_EVERY = 500
QUEUE_STATS_INTERVAL = 15.0
JSON_TYPES = (None, "", "application/json")
# Routing keys of the events a sharded replica still takes on its own queue.
OWN_KEYS_WHEN_SHARDED = ("worker.#", "exporter.#")


class EventsSource(Source):
    name = "events"
    essential = True

    def __init__(self, config, state, app):
        super().__init__()
        self.config = config
        self.state = state
        self.app = app
        self.queue_name = f"celeryev.celery-health-exporter.{uuidlib.uuid4().hex[:12]}"
        self.shard_queue = getattr(config, "shard_task_events", "") or ""
        self.ingest = IngestStats()
        self._no_events_hint_logged = False
        self._next_enable_events = 0.0
        self._management = None  # rabbitmq_api.ManagementAPI, when there is an API to read drops from
        self._drops_thread: threading.Thread | None = None
        if config.broker_kind == "amqp" and getattr(config, "rabbitmq_management_url", ""):
            from .rabbitmq_api import ManagementAPI, management_access

            # short: a request is retried QUEUE_STATS_INTERVAL later anyway
            self._management = ManagementAPI(management_access(config, app), request_timeout=2.0)
        self._unacked: dict = {}  # channel -> last delivery tag not yet acked (shared queue)

    def describe(self) -> str:
        if self.config.broker_kind != "amqp":
            return "pub/sub on celeryev"
        if self.shard_queue:
            return f"queue {self.queue_name} (worker events), shared queue {self.shard_queue} (task events)"
        return f"queue {self.queue_name}"

    # ------------------------------------------------------------- queues
    def _queue_args(self) -> dict:
        # Durable, not exclusive, with x-expires: it outlives a reconnect (exclusive
        # would die with the connection and lose what came meanwhile) and is gone
        # --event-queue-expires after us. Durable because RabbitMQ 4.x deprecates
        # transient non-exclusive queues (deprecated feature transient_nonexcl_queues);
        # the events in it stay transient (Celery publishes them so), hence cheap.
        return dict(durable=True, auto_delete=False, exclusive=False,
                    message_ttl=self.config.event_queue_ttl, expires=self.config.event_queue_expires,
                    max_length=self.config.event_queue_max_length)

    def _queue(self, connection) -> Queue:
        exchange = get_exchange(connection, name=self.app.conf.event_exchange)
        if self.config.broker_kind == "amqp":
            return Queue(self.queue_name, exchange=exchange, routing_key="#", **self._queue_args())
        # kombu's Redis transport keeps a binding entry for a queue until it is
        # deleted; auto_delete removes it when we go, so restarts leave no garbage.
        return Queue(self.queue_name, exchange=exchange, routing_key="#", auto_delete=True, durable=False)

    def _amqp_queues(self, connection) -> list[tuple[Queue, bool]]:
        """(queue, no_ack) pairs to consume on RabbitMQ."""
        if not self.shard_queue:
            return [(self._queue(connection), True)]
        from kombu import binding

        exchange = get_exchange(connection, name=self.app.conf.event_exchange)
        own = Queue(self.queue_name, exchange=exchange,
                    bindings=[binding(exchange, routing_key=key) for key in OWN_KEYS_WHEN_SHARDED],
                    **self._queue_args())
        # Every replica declares the shared queue with the same arguments; the
        # broker splits its messages between them. Acked, so that a replica that
        # dies hands its unacked events to the others instead of losing them.
        shared = Queue(self.shard_queue, exchange=exchange, routing_key="task.#", **self._queue_args())
        return [(own, True), (shared, False)]

    # ----------------------------------------------------------- applying
    def on_message(self, message) -> None:
        """A kombu message (kept for callers that consume through kombu)."""
        self.apply_body(message.body, message.content_type)

    def apply_body(self, body, content_type) -> None:
        now = time.time()
        state = self.state
        self.ingest.messages += 1
        if content_type not in JSON_TYPES:
            with state.lock:
                state.count_malformed("content_type")
            return
        try:
            events = decode_body(body)
        except MalformedEvent as exc:
            with state.lock:
                state.count_malformed(exc.reason)
            return
        apply = state.apply
        with state.lock:
            for event in events:
                try:
                    apply(event, now)
                except Exception as exc:  # a bug: this event is skipped, the stream goes on
                    self.internal_error(exc, f"applying a {event.get('type')!r} event")

    def _on_amqp_message(self, message) -> None:
        self.apply_body(message.body, message.properties.get("content_type"))

    def _on_shared_message(self, message) -> None:
        self.apply_body(message.body, message.properties.get("content_type"))
        channel = message.channel
        tag = message.delivery_info["delivery_tag"]
        self._unacked[channel] = tag
        if tag % SHARD_ACK_EVERY == 0:
            self._ack(channel)

    def _ack(self, channel) -> None:
        tag = self._unacked.pop(channel, None)
        if tag is not None:
            channel.basic_ack(tag, multiple=True)

    # -------------------------------------------------------------- running
    def start(self) -> None:
        super().start()
        if self._management is not None:  # no API, no thread: nothing is ever requested
            self._drops_thread = threading.Thread(target=self._poll_queue_drops, name="events-queue-drops",
                                                  daemon=True)
            self._drops_thread.start()

    def stop(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        super().stop(timeout)
        if self._management is not None:
            self._management.cancel()
        if self._drops_thread is not None:  # a request may be under way; a daemon: a hung one holds nothing
            self._drops_thread.join(max(0.0, deadline - time.monotonic()))

    def mark_down(self, reason: str, now: float | None = None) -> None:
        super().mark_down(reason, now)
        with self.state.lock:
            self.state.events_interrupted(time.time())

    def mark_up(self, now: float | None = None) -> None:
        resumed = not self.health.up
        super().mark_up(now)
        if resumed:
            with self.state.lock:
                self.state.events_resumed(time.time())

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            try:
                self._consume(backoff)
            except Exception as exc:
                if self.stopping:
                    break
                if not is_outage(exc):  # a bug outside the per-event guard: counted, then reconnect
                    self.internal_error(exc, "consuming events")
                    self.mark_down(f"internal error: {type(exc).__name__} (a bug, see the log)")
                else:
                    if self.health.up:
                        self.ingest.subscription_drops += 1
                    self.mark_down(describe_error(exc))
            self.sleep(backoff.next())

    def _consume(self, backoff: Backoff) -> None:
        with self.app.connection_for_read(heartbeat=10, connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1)
            if self.config.broker_kind == "amqp":
                self._consume_amqp(connection, backoff)
            else:
                self._consume_redis(connection, backoff)

    def _started(self, connection, backoff: Backoff) -> None:
        self._ask_workers_for_heartbeats(connection)
        self.mark_up()
        backoff.reset()

    # ---------------------------------------------------------------- AMQP
    def _consume_amqp(self, connection, backoff: Backoff) -> None:
        channel = connection.channel()
        queues = self._amqp_queues(connection)
        for queue, _ in queues:
            queue(channel).declare()
        if any(not no_ack for _, no_ack in queues):
            channel.basic_qos(0, SHARD_PREFETCH, False)
        tags = [channel.basic_consume(queue=queue.name, no_ack=no_ack,
                                      callback=self._on_amqp_message if no_ack else self._on_shared_message)
                for queue, no_ack in queues]
        amqp_connection = connection.connection
        reader = FrameReader.install(amqp_connection)
        self._started(connection, backoff)
        while not self.stopping:
            try:
                if reader is not None:
                    reader.drain(amqp_connection, DRAIN_TIMEOUT)
                else:
                    connection.drain_events(timeout=DRAIN_TIMEOUT)
            except socket.timeout:
                pass
            self._ack(channel)
            connection.heartbeat_check()
            self.mark_up()
            with self.bugs_contained("the periodic steps"):
                self._periodic(connection)
        try:
            self._ack(channel)
            for tag in tags:
                channel.basic_cancel(tag)
        except Exception:  # stopping anyway; a broker gone meanwhile is fine
            pass

    # --------------------------------------------------------------- Redis
    def _consume_redis(self, connection, backoff: Backoff) -> None:
        channel = connection.channel()
        queue = self._queue(connection)(channel)
        queue.declare()
        if hasattr(channel, "_get_subscribe_topics"):  # kombu >= 5.6 (sentinel compat topics)
            topics = channel._get_subscribe_topics(queue.name)
        else:
            topics = [channel._get_subscribe_topic(queue.name)]
        pubsub = channel.subclient
        pubsub.psubscribe(*topics)
        sock = pubsub.connection._sock
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RCVBUF)
        except OSError:
            pass
        reader = RedisReader(sock, self.ingest, lambda: self.stopping, self.config.event_backlog_max_bytes)
        reader.start()
        try:
            parser = PubSubParser()
            last_ping = time.monotonic()
            subscribed = False
            while not self.stopping:
                data = reader.take(DRAIN_TIMEOUT)
                for payload in parser.feed(data):  # also b"": a parse error left raises
                    self._apply_redis_payload(payload)
                if not subscribed:
                    # Up only once Redis answered the PSUBSCRIBE without an error (the first bytes on
                    # this connection; an ACL user without the command or the channel gets NOPERM):
                    # otherwise up, then down again, at every retry.
                    if not data:
                        if time.monotonic() - reader.last_data > REDIS_SILENCE_LIMIT:
                            raise ConnectionError(f"no reply to PSUBSCRIBE for {REDIS_SILENCE_LIMIT:.0f}s")
                        continue
                    subscribed = True
                    self._started(connection, backoff)
                now = time.monotonic()
                if now - last_ping > REDIS_PING_INTERVAL:
                    last_ping = now
                    reader.send(b"*1\r\n$4\r\nPING\r\n")
                if now - reader.last_data > REDIS_SILENCE_LIMIT:
                    raise ConnectionError(f"no reply from Redis for {REDIS_SILENCE_LIMIT:.0f}s")
                self.mark_up()
                with self.bugs_contained("the periodic steps"):
                    self._periodic(connection)
        finally:
            reader.stop()
            self.ingest.backlog_bytes = 0

    def _apply_redis_payload(self, payload: bytes) -> None:
        try:
            body, content_type = unwrap(payload)
        except MALFORMED_ENVELOPE:
            self.ingest.messages += 1
            with self.state.lock:
                self.state.count_malformed("envelope")
            return
        self.apply_body(body, content_type)

    # ------------------------------------------------------------- periodic
    def _ask_workers_for_heartbeats(self, connection) -> None:
        """Workers answer the `heartbeat` command at once: we learn about them
        without waiting for their next heartbeat (Celery's receiver does the same)."""
        self.app.control.broadcast("heartbeat", connection=connection)

    def _periodic(self, connection) -> None:
        now = time.time()
        if self.config.enable_events and now >= self._next_enable_events:
            self._next_enable_events = now + self.config.enable_events_interval
            self.app.control.enable_events(connection=connection)
        if not self._no_events_hint_logged:
            with self.state.lock:
                silent_for = self.state.seconds_without_task_events(now)
            if silent_for is not None and silent_for > self.config.no_task_events_hint_after:
                self._no_events_hint_logged = True
                self.log.warning(
                    "workers send heartbeats but no task events arrived for %.0fs: the workers probably run "
                    "without -E (worker_send_task_events); start them with -E or run the exporter with "
                    "--enable-events", silent_for)

    def _poll_queue_drops(self) -> None:
        """Its own thread, every QUEUE_STATS_INTERVAL from the start: a slow or
        hung management API never stalls event intake."""
        try:
            while not self.stopping:
                self._read_queue_drops()
                self.sleep(QUEUE_STATS_INTERVAL)
        finally:
            self._management.close()

    def _read_queue_drops(self) -> None:
        """Messages RabbitMQ dropped from our queues (TTL, max length) = published
        into the queue - delivered - still there, from the management API."""
        try:
            for role, name in (("own", self.queue_name), ("shared", self.shard_queue)):
                if name:
                    stats = management_queue(self._management, name)
                    if stats is not None:
                        with self.state.lock:  # a scrape reads ingest.lost_messages under it
                            self.ingest.observe_queue_drops(role, *stats)
        except Exception as exc:  # the management API is optional: never disturb consuming
            self.log.debug("queue statistics unavailable: %s", describe_error(exc))

    @property
    def task_events_missing(self) -> bool:
        return self._no_events_hint_logged


def management_queue(api, queue: str) -> tuple[int, int] | None:
    """(published, dropped) of one queue from its management API counters, or None when
    the API does not say. Every message published into the queue is still in it (ready
    or delivered and unacked), or was acked, or was delivered without ack; the rest was
    dropped (TTL, max length). Unacked deliveries of the acked shared queue must not
    count as dropped, nor redeliveries twice, hence not simply publish - deliver_get."""
    info = api.queue(queue)  # api: a rabbitmq_api.ManagementAPI
    if info is None:
        return None
    stats = info.get("message_stats") or {}
    if "publish" not in stats:
        return None
    settled = stats.get("ack", 0) + stats.get("deliver_no_ack", 0) + stats.get("get_no_ack", 0)
    published = int(stats["publish"])
    return published, int(published - settled - (info.get("messages") or 0))
