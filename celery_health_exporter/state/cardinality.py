"""Caps on the number of distinct values a label can take.

Task names, worker hostnames, queue names, exception classes and publishers
come from whoever writes to the broker: a bug that puts a uuid in a task name,
or a fleet of short-lived workers with random names, would otherwise grow the
state and every scrape without bound. Past its cap a label's new values are
folded into ``other`` and the folds counted
(``celery_exporter_label_values_folded_total{label}``).

Pure and lock-free: the state model calls it while holding its own lock.
"""
from __future__ import annotations

OTHER = "other"
# Values that never take a slot: the fold target itself and the model's placeholder.
EXEMPT = frozenset({OTHER, "unknown"})


class LabelCap:
    """At most ``limit`` distinct values of one label; further values become ``other``."""

    __slots__ = ("label", "limit", "values", "folded")

    def __init__(self, label: str, limit: int):
        if limit < 1:
            raise ValueError(f"the cap of {label!r} must be at least 1, got {limit}")
        self.label = label
        self.limit = limit
        self.values: set[str] = set()
        self.folded = 0  # values replaced by "other" (one per fold() call that folded)

    def fold(self, value: str) -> str:
        """``value`` if it already has a slot or a slot is free (taking it), else ``other``."""
        if value in self.values or value in EXEMPT:
            return value
        if len(self.values) < self.limit:
            self.values.add(value)
            return value
        self.folded += 1
        return OTHER

    def admits(self, value: str) -> bool:
        """Whether ``fold(value)`` would keep the value (without taking a slot or counting)."""
        return value in self.values or value in EXEMPT or len(self.values) < self.limit

    def forget(self, value: str) -> None:
        """Free the slot of a value whose series are gone (a purged worker)."""
        self.values.discard(value)

    def __len__(self) -> int:
        return len(self.values)


class CardinalityCaps:
    """One ``LabelCap`` per capped label, named as the metrics' label keys."""

    def __init__(self, *, task_names: int = 1000, workers: int = 1000, queues: int = 1000,
                 exceptions: int = 200, publishers: int = 1000):
        self.name = LabelCap("name", task_names)
        self.hostname = LabelCap("hostname", workers)
        self.queue_name = LabelCap("queue_name", queues)
        self.exception = LabelCap("exception", exceptions)
        self.publisher = LabelCap("publisher", publishers)

    @classmethod
    def from_config(cls, config) -> "CardinalityCaps":
        return cls(task_names=config.max_task_names, workers=config.max_workers, queues=config.max_queues,
                   exceptions=config.max_exceptions, publishers=config.max_publishers)

    def __iter__(self):
        return iter((self.name, self.hostname, self.queue_name, self.exception, self.publisher))
