"""Event intake: what the broker dropped before the exporter could read it, and what still waits."""
from __future__ import annotations

from .definitions import counter, gauge

LOST = counter(
    "exporter_events_lost_messages",
    "Event messages the broker dropped before the exporter read them, by reason: queue_dropped_own / "
    "queue_dropped_shared = RabbitMQ dropped them from our event queue (message TTL or max length; needs "
    "--rabbitmq-management-url). Absent when nothing was lost or it cannot be known.", "reason")
DROPS = counter(
    "exporter_events_subscription_drops",
    "Times the broker closed the events subscription while the exporter consumed it. On Redis (pub/sub) every "
    "event published until the exporter subscribes again is lost; on RabbitMQ our queue keeps them for "
    "--event-queue-expires seconds.")
BACKLOG = gauge(
    "exporter_events_backlog_bytes",
    "Event bytes already read from the broker but not yet applied (Redis: read ahead so that Redis never "
    "has to drop the subscription).")

DEFINITIONS = (LOST, DROPS, BACKLOG)


def collect(ctx):
    for source in ctx.sources:
        ingest = getattr(source, "ingest", None)
        if source.name != "events" or ingest is None:
            continue
        for reason, count in ingest.lost_messages.items():
            yield LOST, (reason,), count
        yield DROPS, (), ingest.subscription_drops
        yield BACKLOG, (), ingest.backlog_bytes
