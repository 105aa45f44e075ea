"""Cardinality caps: label values folded into `other` past --max-task-names, --max-workers, --max-queues, --max-exceptions and --max-publishers."""
from __future__ import annotations

from .definitions import counter, gauge

FOLDED = counter("exporter_label_values_folded", "Label values replaced by `other` because the label reached its "
                 "cap (--max-task-names, --max-workers, --max-queues, --max-exceptions, --max-publishers), by "
                 "label key.", "label")
DISTINCT = gauge("exporter_label_values", "Distinct values a capped label holds now (at most its cap), by "
                 "label key.", "label")

DEFINITIONS = (FOLDED, DISTINCT)


def collect(ctx):
    caps = getattr(ctx.state, "cardinality", None)  # a state.cardinality.CardinalityCaps
    if caps is None:
        return
    for cap in caps:
        yield FOLDED, (cap.label,), cap.folded
        yield DISTINCT, (cap.label,), len(cap)
