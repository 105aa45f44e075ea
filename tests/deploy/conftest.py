"""Shared helpers for the deployment tests (Dockerfile, Helm chart, compose)."""
from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "celery-health-exporter"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yaml"
GRAFANA_DIR = ROOT / "grafana"
COMPOSE_DIR = ROOT / "deploy" / "compose"


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


@pytest.fixture(scope="session")
def project_version() -> str:
    version = pyproject()["project"]["version"]
    assert version, "pyproject.toml has no project.version"
    return version


def source_dashboards() -> list[Path]:
    return sorted(GRAFANA_DIR.glob("*.json"))
