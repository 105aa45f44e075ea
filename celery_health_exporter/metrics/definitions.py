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
    # A family named by another tool (Flower's flower_*) keeps its name whatever --metric-prefix says.
    prefix: str | None = None

    def family_name(self, prefix: str = "celery_") -> str:
        """The name in the exposition (counters without ``_total``)."""
        return (self.prefix if self.prefix is not None else prefix) + self.name

    def exposed_name(self, prefix: str = "celery_") -> str:
        suffix = "_total" if self.kind == "counter" else ""
        return f"{self.family_name(prefix)}{suffix}"


def counter(name: str, help: str, *labels: str, prefix: str | None = None) -> MetricDef:
    return MetricDef(name, "counter", help, labels, prefix)


def gauge(name: str, help: str, *labels: str, prefix: str | None = None) -> MetricDef:
    return MetricDef(name, "gauge", help, labels, prefix)


def histogram(name: str, help: str, *labels: str, prefix: str | None = None) -> MetricDef:
    return MetricDef(name, "histogram", help, labels, prefix)


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
    "celery_health_exporter.metrics.flower",
)


class _Areas:
    """Imported lazily: area modules import this one for the helpers above."""

    def __iter__(self):
        return iter(importlib.import_module(name) for name in _AREA_MODULES)


AREAS = _Areas()


def all_definitions() -> list[MetricDef]:
    return [definition for area in AREAS for definition in area.DEFINITIONS]
