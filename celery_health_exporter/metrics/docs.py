"""Generate docs/metrics.md from the metric definitions: ``python -m celery_health_exporter.metrics.docs > docs/metrics.md``."""
from __future__ import annotations

import sys

from .definitions import AREAS

HEADER = """# Metrics

Generated from the definitions in `celery_health_exporter/metrics/` by `python -m celery_health_exporter.metrics.docs > docs/metrics.md`;
a test fails when this file is out of date. Names are shown with the default `--metric-prefix celery_`.
Every series also carries the `--static-label` labels. A metric that a source cannot provide is absent,
never 0. Series of a worker or queue that went away disappear (workers after `--purge-offline-after`).

Standard `process_*` and `python_info` metrics of the exporter process are served too.
"""


def render() -> str:
    lines = [HEADER]
    for area in AREAS:
        title = (area.__doc__ or area.__name__).strip().splitlines()[0]
        lines.append(f"\n## {area.__name__.rsplit('.', 1)[-1].replace('_', ' ').capitalize()}\n\n{title}\n")
        lines.append("| metric | type | labels | meaning |")
        lines.append("| --- | --- | --- | --- |")
        for d in area.DEFINITIONS:
            labels = ", ".join(f"`{label}`" for label in d.labels) or "—"
            lines.append(f"| `{d.exposed_name()}` | {d.kind} | {labels} | {d.help.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
