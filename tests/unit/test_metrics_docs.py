from pathlib import Path

from celery_health_exporter.metrics import all_definitions
from celery_health_exporter.metrics.docs import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_docs_metrics_md_is_generated_from_the_definitions():
    assert DOC.read_text() == render(), (
        "docs/metrics.md is out of date: run `python -m celery_health_exporter.metrics.docs > docs/metrics.md`")


def test_every_metric_is_defined_once_with_help():
    definitions = all_definitions()
    names = [d.exposed_name() for d in definitions]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(definitions) >= 20
    for d in definitions:
        assert d.help.strip() and d.kind in ("counter", "gauge", "histogram"), d
