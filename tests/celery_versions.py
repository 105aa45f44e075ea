"""The Celery versions the integration tests run workers on: the ONE place of the pins.

The exporter itself always runs from this machine's Python (the newest Celery the
project allows, installed with ``pip install -e '.[test]'``). Workers (and, where a
test says so, publishers) also run on the oldest supported release: a virtualenv
with exactly ``OLDEST`` and the project installed in it, built once and cached
across runs under ``~/.cache/celery-health-exporter-tests/``, keyed by the pins,
the Python version and a hash of pyproject.toml (rebuilt when any of them changes or
when the cached one no longer verifies).

Tests take the version as ``worker_celery`` with ``@each_worker_celery``; their ids read
``celery-5.7.0`` (the newest, whatever is installed) and ``celery-5.2.7``, so
``-k 'not celery-5.2.7'`` leaves the old-version pass out.
"""
from __future__ import annotations

import functools
import hashlib
import shutil
import sys
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

import pytest

from tests.cached_venvs import cached_python

ROOT = Path(__file__).resolve().parent.parent

# The oldest supported release, with the kombu and redis-py it is tested with. pyproject.toml's
# lower bounds (celery>=5.2.7, kombu[redis]>=5.2.4, redis>=4.5) must match these.
OLDEST = {"celery": "5.2.7", "kombu": "5.2.4", "redis": "4.5.5"}
NEWEST = "newest"  # the machine's Python, whatever pyproject.toml let pip install there
# What `worker_celery` takes: the newest and the oldest.
WORKER_CELERY = [NEWEST, OLDEST["celery"]]



def newest_version() -> str:
    return installed_version("celery")


def version_id(worker_celery: str) -> str:
    """The test id of a version: celery-5.7.0 (newest, as installed), celery-5.2.7."""
    return f"celery-{newest_version() if worker_celery == NEWEST else worker_celery}"


each_worker_celery = pytest.mark.parametrize("worker_celery", WORKER_CELERY, ids=version_id)


def is_oldest(worker_celery: str) -> bool:
    return worker_celery == OLDEST["celery"]


def python_for(worker_celery: str) -> str:
    """The interpreter that runs a worker of this Celery version."""
    if worker_celery == NEWEST:
        return sys.executable
    if worker_celery != OLDEST["celery"]:
        raise ValueError(f"no environment for Celery {worker_celery!r}: one of {WORKER_CELERY}")
    return oldest_python()


# ------------------------------------------------------------------ the cached virtualenv

def _key() -> str:
    pyproject = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    pins = "-".join(f"{name}{version}" for name, version in OLDEST.items())
    return f"py{sys.version_info.major}.{sys.version_info.minor}-{pins}-{pyproject}"


_VERIFY = """
import json, sys
from importlib.metadata import version
import celery, kombu, redis  # the worker's own imports
import celery.bin.celery, celery.worker, celery.concurrency.prefork
import celery_health_exporter.hooks.worker, celery_health_exporter.hooks.publisher
from celery_health_exporter.hooks.worker import install
json.dump({name: version(name) for name in sys.argv[1:]}, sys.stdout)
"""


def _install(run, python: Path) -> None:
    # A copy of the sources: building in the work tree would race other test runs
    # and the editable install's egg-info there.
    with tempfile.TemporaryDirectory(prefix="che-src-") as src:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src)
        shutil.copytree(ROOT / "celery_health_exporter", Path(src) / "celery_health_exporter",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        constraints = Path(src) / "constraints.txt"  # pip may not move these, as a dependency or not
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in OLDEST.items()))
        run(python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
            "-c", constraints, src, *(f"{name}=={version}" for name, version in OLDEST.items()))


@functools.cache
def oldest_python() -> str:
    """The python of a venv with exactly OLDEST and the project; built at most once per key."""
    return cached_python("venv-", _key(), f"Celery {OLDEST['celery']} test", OLDEST, _VERIFY, _install)


@pytest.fixture(scope="session")
def oldest_celery_python() -> str:
    """Session-scoped: the interpreter of the oldest-Celery venv (built or reused)."""
    return oldest_python()
