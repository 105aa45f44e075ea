"""Queues and the broker, polled from the broker itself (RabbitMQ management API or AMQP, Redis keys)."""
from __future__ import annotations

from .definitions import counter, gauge

Q = "queue_name"
BOTH, RABBITMQ, REDIS = "rabbitmq, redis", "rabbitmq", "redis"

LENGTH = gauge("queue_length", "Messages ready in the queue, waiting for a consumer (RabbitMQ messages_ready; "
               "Redis: LLEN of the queue plus its priority sub-queues).", Q)
LENGTH_BY_PRIORITY = gauge("queue_length_by_priority", "Messages ready in the queue per priority step "
                           "(Redis priority sub-queues; kombu floors a priority to its step).", Q, "priority")
UNACKED = gauge("queue_unacked", "Messages delivered to a consumer and not yet acknowledged (Redis: entries of "
                "the `unacked` hash attributed by routing key; see celery_broker_unacked_sampled).", Q)
OLDEST_UNACKED_AGE = gauge("queue_oldest_unacked_age_seconds", "Seconds since the oldest unacknowledged "
                           "message of the queue was delivered (Redis). Past celery_broker_visibility_timeout_seconds"
                           " kombu re-delivers it: the task runs twice.", Q)
VISIBILITY_TIMEOUT = gauge("broker_visibility_timeout_seconds", "Redis transport visibility_timeout the "
                           "exporter was given (kombu default 3600): unacked messages older than this are "
                           "re-delivered.")
UNACKED_SAMPLED = gauge("broker_unacked_sampled", "1 when celery_queue_unacked was scaled up from a sample of the "
                        "Redis `unacked` hash (more entries than the scan budget), 0 when counted exactly.")
CONSUMERS = gauge("active_consumer_count", "Consumers of the queue (RabbitMQ: the broker's count; Redis: workers "
                  "whose active_queues include it in the last remote-control poll, 0 when no worker answered; "
                  "absent while that is unknown, see celery_broker_consumers_known). 0 with messages waiting = a "
                  "black hole.", Q)
ACTIVE_WORKERS = gauge("active_worker_count", "Live workers whose active_queues include the queue, from the last "
                       "remote-control poll (prometheus-exporter-celery's family). 0 for a queue the broker or an "
                       "earlier poll named that no live worker consumes; absent while that is unknown (see "
                       "celery_broker_consumers_known).", Q)
ACTIVE_PROCESSES = gauge("active_process_count", "Pool processes of those workers (inspect stats; a worker "
                         "without child processes, e.g. --pool solo or threads, adds 0, as in "
                         "prometheus-exporter-celery).", Q)
CONSUMERS_KNOWN = gauge("broker_consumers_known", "1 when celery_active_consumer_count is known for every queue: "
                        "always on RabbitMQ (the broker counts), on Redis while remote-control polls succeed "
                        "(--inspect-interval > 0); 0 when it is unknown and the count absent.")
UTILISATION = gauge("queue_consumer_utilisation", "Fraction of time the queue could deliver to its consumers at "
                    "once (RabbitMQ consumer_utilisation; absent without consumers).", Q)
PUBLISHED = counter("queue_messages_published", "Messages published into the queue, the broker's cumulative count "
                    "(RabbitMQ message_stats.publish; 0 until the queue has activity).", Q)
DELIVERED = counter("queue_messages_delivered", "Messages delivered to consumers, the broker's cumulative count "
                    "(RabbitMQ message_stats.deliver_get).", Q)
REDELIVERED = counter("queue_messages_redelivered", "Messages delivered again after a consumer failed to ack them "
                      "(RabbitMQ message_stats.redeliver).", Q)
ACKED = counter("queue_messages_acked", "Messages acknowledged by consumers (RabbitMQ message_stats.ack).", Q)
DELIVERY_LIMIT = gauge("queue_delivery_limit", "RabbitMQ quorum queue: deliveries of a message after which the "
                       "broker drops or dead-letters it (x-delivery-limit argument or delivery-limit policy, the "
                       "lower). A task whose worker keeps dying while running it (acks_late) is lost there without "
                       "a Celery event; compare with celery_queue_messages_redelivered_total. Absent for classic "
                       "queues and where no limit is set (RabbitMQ 4.x then applies 20).", Q)
OLDEST_UNSTARTED = gauge("queue_oldest_unstarted_task_age_seconds", "Age of the oldest task sent or received but "
                         "not started, from events (from its ETA for ETA tasks; absent when none waits).", Q)
BROKER_UP = gauge("broker_up", "1 when the last poll of the broker's queues succeeded; 0 while it fails (the queue "
                  "numbers are then absent, not stale).", "broker")
CONNECTIONS = gauge("broker_connections", "Client connections to the broker's vhost (RabbitMQ management API); "
                    "churn shows reconnect storms.")

DEFINITIONS = (LENGTH, LENGTH_BY_PRIORITY, UNACKED, OLDEST_UNACKED_AGE, VISIBILITY_TIMEOUT, UNACKED_SAMPLED,
               CONSUMERS, ACTIVE_WORKERS, ACTIVE_PROCESSES, CONSUMERS_KNOWN, UTILISATION, PUBLISHED, DELIVERED, REDELIVERED, ACKED, DELIVERY_LIMIT, OLDEST_UNSTARTED, BROKER_UP,
               CONNECTIONS)

_COUNTERS = ((PUBLISHED, "published"), (DELIVERED, "delivered"), (REDELIVERED, "redelivered"), (ACKED, "acked"))


def collect(ctx):
    state = ctx.state
    broker = getattr(state, "broker", None)
    if broker is None:
        return
    now = ctx.now
    for queue, age in broker.oldest_unstarted(state, now).items():
        yield OLDEST_UNSTARTED, (queue,), age
    yield from _active_workers(state, broker, now)
    if broker.up is None:  # no broker poller configured
        return
    yield BROKER_UP, (broker.broker,), 1 if broker.up else 0
    snapshot = broker.snapshot
    if snapshot is None:
        return
    if snapshot.visibility_timeout is not None:
        yield VISIBILITY_TIMEOUT, (), snapshot.visibility_timeout
    if snapshot.unacked_sampled is not None:
        yield UNACKED_SAMPLED, (), 1 if snapshot.unacked_sampled else 0
    if snapshot.connections is not None:
        yield CONNECTIONS, (), snapshot.connections
    worker_consumers = broker.consumers_from_workers(state, now) if snapshot.consumers_from_workers else None
    yield CONSUMERS_KNOWN, (), 0 if snapshot.consumers_from_workers and worker_consumers is None else 1
    for name, stats in snapshot.queues.items():
        labels = (name,)
        yield LENGTH, labels, stats.ready
        if stats.by_priority is not None:
            for priority, length in stats.by_priority.items():
                yield LENGTH_BY_PRIORITY, (name, priority), length
        if stats.unacked is not None:
            yield UNACKED, labels, stats.unacked
        if stats.oldest_unacked_at is not None:
            yield OLDEST_UNACKED_AGE, labels, max(0.0, now - stats.oldest_unacked_at)
        if stats.consumers is not None:
            yield CONSUMERS, labels, stats.consumers
        elif worker_consumers is not None:
            yield CONSUMERS, labels, worker_consumers.get(name, 0)
        if stats.consumer_utilisation is not None:
            yield UTILISATION, labels, stats.consumer_utilisation
        for definition, attribute in _COUNTERS:
            value = getattr(stats, attribute)
            if value is not None:
                yield definition, labels, value
        if stats.delivery_limit is not None:
            yield DELIVERY_LIMIT, labels, stats.delivery_limit


def _active_workers(state, broker, now):
    """Per queue: live workers consuming it and their pool processes. Known when the
    consumers are (the same rules as celery_active_consumer_count from the workers)."""
    workers = broker.consumers_from_workers(state, now)
    if workers is None:
        return
    processes: dict[str, int] = {}
    for hostname, queues in state.worker_queues.items():
        worker = state.workers.get(hostname)
        if worker is not None and not worker.up:
            continue
        pool = (worker.pool_processes if worker is not None else None) or 0
        for queue in queues:
            processes[queue] = processes.get(queue, 0) + pool
    # Queues consumed before, or that the broker has, stay at 0 rather than vanish (a queue
    # that lost its last worker is what the count is watched for).
    named = set(workers) | {queue for queues in state.worker_queues.values() for queue in queues}
    if broker.snapshot is not None:
        named.update(broker.snapshot.queues)
    for queue in sorted(named):
        if broker.accept(queue):
            yield ACTIVE_WORKERS, (queue,), workers.get(queue, 0)
            yield ACTIVE_PROCESSES, (queue,), processes.get(queue, 0)
