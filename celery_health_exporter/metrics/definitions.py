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
    "celery_health_exporter.metrics.tasks",
    "celery_health_exporter.metrics.workers",
    "celery_health_exporter.metrics.exporter_self",
    "celery_health_exporter.metrics.events_loss",
    "celery_health_exporter.metrics.cardinality",
    "celery_health_exporter.metrics.queues",
    "celery_health_exporter.metrics.host",
    "celery_health_exporter.metrics.publish",
    "celery_health_exporter.metrics.beat",
)


class _Areas:
    """Imported lazily: area modules import this one for the helpers above."""

    def __iter__(self):
        return iter(importlib.import_module(name) for name in _AREA_MODULES)


AREAS = _Areas()


def all_definitions() -> list[MetricDef]:
    return [definition for area in AREAS for definition in area.DEFINITIONS]
