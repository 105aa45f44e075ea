"""The broker part of the model: queues as the broker last reported them.

Pure Python, no I/O. A broker poller builds a complete ``QueuesSnapshot`` and
hands it over with ``BrokerState.replace``: the whole set of queues is
replaced, so a queue that vanished from the broker vanishes from the metrics.
When a poll fails, ``BrokerState.fail`` drops the snapshot: numbers that can
no longer be checked are not served as if they were current.

Attached to ``ClusterState`` as ``state.broker``; guarded by ``state.lock``
like the rest of the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

UNKNOWN = "unknown"
UNSTARTED_STATES = ("PENDING", "RECEIVED")


@dataclass(slots=True)
class QueueStats:
    """One queue, as one poll saw it. ``None`` means the broker cannot tell."""

    ready: int
    unacked: int | None = None
    consumers: int | None = None  # None on Redis: counted from the workers' active_queues instead
    consumer_utilisation: float | None = None
    published: int | None = None
    delivered: int | None = None
    redelivered: int | None = None
    acked: int | None = None
    delivery_limit: int | None = None  # RabbitMQ quorum queue: deliveries before a message is dropped/dead-lettered
    by_priority: dict[str, int] | None = None  # priority step -> ready messages (Redis)
    oldest_unacked_at: float | None = None  # unix time of the oldest delivery not yet acked (Redis)


@dataclass
class QueuesSnapshot:
    queues: dict[str, QueueStats]
    taken_at: float
    connections: int | None = None  # client connections to the vhost (RabbitMQ management API)
    visibility_timeout: float | None = None  # Redis: seconds after which kombu re-delivers unacked messages
    unacked_sampled: bool | None = None  # Redis: True when unacked counts were scaled up from a sample
    consumers_from_workers: bool = False  # Redis: consumer counts come from the workers' active_queues


def _accept_all(name: str) -> bool:
    return True


class BrokerState:
    """What the broker poller knows. ``up`` is None while no poller is configured."""

    def __init__(self):
        self.kind = ""  # amqp | redis
        self.broker = ""  # masked broker URL, the label of celery_broker_up
        self.up: bool | None = None
        self.reason = "not polled yet"
        self.snapshot: QueuesSnapshot | None = None
        self.accept: Callable[[str], bool] = _accept_all
        self.missing = ""  # what this broker/mode cannot provide, for the status page

    # ----------------------------------------------------------- the poller
    def configure(self, *, kind: str, broker: str, accept: Callable[[str], bool] | None = None,
                  missing: str = "") -> None:
        self.kind, self.broker, self.missing = kind, broker, missing
        self.accept = accept or _accept_all
        self.up = False

    def replace(self, snapshot: QueuesSnapshot) -> None:
        """A successful poll: its queues are now the whole truth."""
        self.snapshot = snapshot
        self.up = True
        self.reason = "ok"

    def fail(self, reason: str) -> None:
        """A failed poll: last values are dropped, not served stale."""
        self.snapshot = None
        self.up = False
        self.reason = reason

    # ------------------------------------------------------ from the events
    def oldest_unstarted(self, cluster, now: float) -> dict[str, float]:
        """Per queue, the age of the oldest task sent or received but not started.

        Counted from publication (task-sent) when known, else from receipt; a task
        with an ETA counts from its ETA, and one whose ETA is still ahead is not late.
        """
        oldest: dict[str, float] = {}
        for record in cluster.tasks.values():
            if record.state not in UNSTARTED_STATES:
                continue
            since = record.sent_at if record.sent_at is not None else record.received_at
            if since is None:
                continue
            if record.eta is not None and record.eta > since:
                since = record.eta
            if since > now:
                continue
            queue = cluster.queue_for(record)
            if not self.accept(queue):
                continue
            age = now - since
            if age > oldest.get(queue, -1.0):
                oldest[queue] = age
        return oldest

    @staticmethod
    def known_queues(cluster) -> set[str]:
        """Queues the events and the remote-control poller have named (Redis
        discovery: a queue nobody declared a binding for is still worth a look)."""
        names = {key[-1] for key in cluster.sent}  # (name, publisher, queue)
        names.update(cluster.queue_of_name.values())
        for worker in cluster.workers.values():
            names.update(queue for _, queue in worker.flows)
        for queues in cluster.worker_queues.values():
            names.update(queues)
        for record in cluster.tasks.values():
            if record.queue:
                names.add(record.queue)
        names.discard(UNKNOWN)
        names.discard("")
        return names

    @staticmethod
    def consumers_from_workers(cluster, now: float) -> dict[str, int] | None:
        """Workers consuming each queue, from their active_queues. None (unknown:
        the count is absent) while no recent remote-control poll succeeded or a
        live worker's queues are not known yet; otherwise a queue no worker
        consumes has 0, also when there is no live worker at all. Workers known
        to be down do not count."""
        valid_until = cluster.remote_control_valid_until
        if valid_until is None or now > valid_until:
            return None
        if any(worker.up and hostname not in cluster.worker_queues for hostname, worker in cluster.workers.items()):
            return None  # a live worker whose queues are not known yet (it started since the last poll)
        counts: dict[str, int] = {}
        for hostname, queues in cluster.worker_queues.items():
            worker = cluster.workers.get(hostname)
            if worker is not None and not worker.up:
                continue
            for queue in queues:
                counts[queue] = counts.get(queue, 0) + 1
        return counts
