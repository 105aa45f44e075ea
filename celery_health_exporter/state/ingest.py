"""What the events source knows about its own intake: what the broker dropped, what waits.

Kept apart from the cluster model: these numbers describe the pipe, not the
cluster. Plain integers written by the events thread and read at scrape
time (a torn read of an int cannot happen in CPython).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IngestStats:
    # event messages the broker dropped before we read them, by reason
    # (RabbitMQ: our queue's TTL or max length, read from the management API)
    lost_messages: dict = field(default_factory=dict)
    # times the broker closed our subscription while we were consuming (Redis:
    # every event published until we subscribe again is gone)
    subscription_drops: int = 0
    # bytes read from the broker and not yet applied (Redis reader buffer)
    backlog_bytes: int = 0
    # messages received, and message bodies that could not be used
    messages: int = 0
    # last raw estimate per queue role, to credit a loss only once it is stable
    _pending: dict = field(default_factory=dict)
    # per role: the queue's publish counter, the figure two snapshots agreed on in
    # this life of the queue, and what its earlier lives lost
    _published: dict = field(default_factory=dict)
    _agreed: dict = field(default_factory=dict)
    _earlier: dict = field(default_factory=dict)

    def observe_queue_drops(self, role: str, published: int, dropped: int) -> None:
        """One stats snapshot of a queue: its ``published`` counter and the messages it
        ``dropped`` (see sources.events.management_queue). Credited when two snapshots
        agree (the broker's statistics lag behind by a few seconds), never going backwards.

        When the publish counter goes down, the queue was deleted
        (``--event-queue-expires``) and declared again and the broker counts from zero:
        what the earlier life lost is kept and the new drops are added to it."""
        if published < self._published.get(role, 0):
            self._earlier[role] = self._earlier.get(role, 0) + self._agreed.pop(role, 0)
            self._pending.pop(role, None)
        self._published[role] = published
        dropped = max(0, dropped)
        if self._pending.get(role) == dropped:
            self._agreed[role] = max(self._agreed.get(role, 0), dropped)
            total = self._earlier.get(role, 0) + self._agreed[role]
            if total > 0:
                key = f"queue_dropped_{role}"
                self.lost_messages[key] = max(self.lost_messages.get(key, 0), total)
        self._pending[role] = dropped
