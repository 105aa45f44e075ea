"""The metric definition type and the list of areas that contribute metrics.

Adding a data source's metrics = one module with DEFINITIONS and collect(),
and one line in AREAS.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDef:
    """A metric's contract: name without prefix (counters without ``_total``), type, help, labels."""

    name: str
    kind: str  # counter | gauge | histogram | info
    help: str
    labels: tuple = ()
    source: str = "events"  # which source feeds it (for the docs)

    def exposed_name(self, prefix: str = "celery_") -> str:
        suffix = "_total" if self.kind == "counter" else ""
        return f"{prefix}{self.name}{suffix}"


def counter(name: str, help: str, *labels: str, source: str = "events") -> MetricDef:
    return MetricDef(name, "counter", help, labels, source)


def gauge(name: str, help: str, *labels: str, source: str = "events") -> MetricDef:
    return MetricDef(name, "gauge", help, labels, source)


def histogram(name: str, help: str, *labels: str, source: str = "events") -> MetricDef:
    return MetricDef(name, "histogram", help, labels, source)


_AREA_MODULES = (
    "exporter.metrics.tasks",
    "exporter.metrics.workers",
    "exporter.metrics.exporter_self",
    "exporter.metrics.events_loss",
    "exporter.metrics.cardinality",
    "exporter.metrics.queues",
    "exporter.metrics.host",
    "exporter.metrics.publish",
)


class _Areas:
    """Imported lazily: area modules import this one for the helpers above."""

    def __iter__(self):
        return iter(importlib.import_module(name) for name in _AREA_MODULES)


AREAS = _Areas()


def all_definitions() -> list[MetricDef]:
    return [definition for area in AREAS for definition in area.DEFINITIONS]
