"""RabbitMQ queues: the management HTTP API (``rabbitmq_api``), or AMQP passive declares without it.

With ``--rabbitmq-management-url`` one listing request per 500 queues
(``columns=`` keeps each item to a few fields) gives ready, unacked,
consumers, consumer utilisation and the broker's cumulative message counts;
one more gives the vhost's client connections. Credentials default to the
broker URL's, the vhost is the broker URL's.

Without it, each queue named in ``--queues`` or seen in events is declared
passively over AMQP: ready messages and consumers only, and no discovery of
queues nobody mentioned (the black holes). The log and the status page say so.
"""
from __future__ import annotations

import time

from ..state.events import Report, count, count_refused, finite_number, ignore
from ..state.queues import BrokerState, QueuesSnapshot, QueueStats
from .queues_common import PollError, QueuePoller
from .rabbitmq_api import MONITORING_TAGS, ManagementAPI, management_access

COLUMNS = ",".join((
    "name", "messages_ready", "messages_unacknowledged", "consumers", "consumer_utilisation",
    "message_stats.publish", "message_stats.deliver_get", "message_stats.redeliver", "message_stats.ack",
    "type", "arguments", "effective_policy_definition",  # a quorum queue's delivery limit
))
MISSING_WITHOUT_API = (
    "no --rabbitmq-management-url: queue lengths and consumer counts come from AMQP passive declares of the "
    "queues named in --queues or seen in events only; unacked counts, consumer utilisation, message counters, "
    "connections and the discovery of queues nobody mentioned (black holes) need the management API")
NO_MONITORING_TAG = (
    "user {user!r} has no monitoring tag: RabbitMQ shows it its own connections only, so "
    "celery_broker_connections is left out (rabbitmqctl set_user_tags {user} monitoring)")


def queue_stats(item: dict, report: Report = ignore) -> QueueStats | None:
    """One item of the queues listing. ``message_stats`` is absent until a queue
    has activity, and a new queue's counts until the next stats emission: 0.

    Numbers go through state.events' readers: a bad one (not a number, not finite,
    negative, beyond 2**53) is reported and its metric left out for this poll (a
    counter absent for one poll, not reset); a bad ready count leaves out the queue
    (None), since its length is the one number a queue must have."""
    stats = item.get("message_stats")
    stats = stats if isinstance(stats, dict) else {}

    def counted(value) -> int | None:
        return 0 if value is None else count(value, report)

    ready = counted(item.get("messages_ready"))
    if ready is None:
        return None
    return QueueStats(
        ready=ready,
        unacked=counted(item.get("messages_unacknowledged")),
        consumers=counted(item.get("consumers")),
        consumer_utilisation=finite_number(item.get("consumer_utilisation"), 0.0, 1.0, report),  # a fraction
        published=counted(stats.get("publish")),
        delivered=counted(stats.get("deliver_get")),
        redelivered=counted(stats.get("redeliver")),
        acked=counted(stats.get("ack")),
        delivery_limit=delivery_limit(item, report),
    )


def delivery_limit(item: dict, report: Report = ignore) -> int | None:
    """A quorum queue's limit: its ``x-delivery-limit`` argument or its policy's
    ``delivery-limit``, the lower where both are set (as RabbitMQ applies them).
    None for other queue types, without a limit, or for a negative one (4.x: unlimited)."""
    if item.get("type") != "quorum":
        return None
    limits = []
    for holder, key in (("arguments", "x-delivery-limit"), ("effective_policy_definition", "delivery-limit")):
        values = item.get(holder)
        if isinstance(values, dict) and values.get(key) is not None:
            value = values[key]
            if isinstance(value, int | float) and value < 0:
                continue
            limit = count(value, report)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


class RabbitMQSource(QueuePoller):
    name = "rabbitmq"
    kind = "amqp"

    def __init__(self, config, state, app):
        self.api_url = config.rabbitmq_management_url.rstrip("/")
        self.missing = "" if self.api_url else MISSING_WITHOUT_API
        super().__init__(config, state, app)
        self.api = ManagementAPI(management_access(config, app)) if self.api_url else None
        self._monitoring: bool | None = None  # has our API user the monitoring tag? asked at each poll
        self._amqp = None
        self._channel = None

    def describe(self) -> str:
        if self.api is None:
            return self.missing
        where = f"management API {self.api.base} (vhost {self.api.vhost!r}, user {self.api.user!r})"
        return f"{where}; {NO_MONITORING_TAG.format(user=self.api.user)}" if self._monitoring is False else where

    # ------------------------------------------------------------- lifecycle
    def wake(self) -> None:
        if self.api is not None:
            self.api.cancel()

    def close(self) -> None:
        if self.api is not None:
            self.api.close()
        self._channel = None  # released with its connection
        connection, self._amqp = self._amqp, None
        if connection is not None:
            connection.release()

    # ------------------------------------------------------------------ poll
    def poll(self) -> QueuesSnapshot:
        if self.api is None:
            return self._poll_amqp()
        queues: dict[str, QueueStats] = {}
        refused: list[str] = []
        for item in self.api.queues(COLUMNS):
            name = item.get("name")
            if isinstance(name, str) and self.accept(name):
                stats = queue_stats(item, refused.append)
                if stats is not None:
                    queues[name] = stats
        connections = self.api.connections()
        self._monitoring = self._has_monitoring_tag()
        count_refused(self.state, refused)
        return QueuesSnapshot(queues=queues, taken_at=time.time(),
                              # without the monitoring tag RabbitMQ lists the user's own connections only
                              connections=len(connections) if connections is not None and self._monitoring
                              else None)

    def _has_monitoring_tag(self) -> bool:
        try:
            tags = self.api.tags()
        except PollError:  # /api/whoami not reachable (a proxy that forwards some paths only): unknown
            tags = None
        if tags is None or tags & MONITORING_TAGS:
            return True  # an API that does not say is taken at its word
        if self._monitoring is not False:  # logged when it becomes so, not at every poll
            self.log.warning("%s: %s", self.name, NO_MONITORING_TAG.format(user=self.api.user))
        return False

    # ------------------------------------------------------- AMQP fallback
    def _poll_amqp(self) -> QueuesSnapshot:
        if self._amqp is None:
            self._amqp = self.app.connection_for_read(connect_timeout=5, heartbeat=0)
            self._amqp.ensure_connection(max_retries=1)
        with self.state.lock:
            names = BrokerState.known_queues(self.state)
        names.update(self.config.queues)
        queues: dict[str, QueueStats] = {}
        refused: list[str] = []
        for name in sorted(n for n in names if self.accept(n)):
            if self._channel is None:
                self._channel = self._amqp.channel()
            try:
                _, ready, consumers = self._channel.queue_declare(queue=name, passive=True)
            except self._amqp.channel_errors:  # 404: no such queue; the broker closed the channel
                self._channel = None
                continue
            ready, consumers = count(ready, refused.append), count(consumers, refused.append)
            if ready is not None:
                queues[name] = QueueStats(ready=ready, consumers=consumers)
        count_refused(self.state, refused)
        return QueuesSnapshot(queues=queues, taken_at=time.time())
