"""Other Celery exporters the side-by-side tests run next to this one: the ONE place of their pins.

prometheus-exporter-celery (danihodovic/celery-exporter), the released version from PyPI, in a
virtualenv of its own (it pins its own Celery, Flask and prometheus-client), built once and
cached under ``~/.cache/celery-health-exporter-tests/`` like the old-Celery venv of
tests/celery_versions.py, keyed by the pin and the Python version (rebuilt when the cached
one no longer verifies).

Its wheel installs a package named ``src`` and no console script; its Docker image runs
``cli(auto_envvar_prefix="CE")``, which ``PEER_COMMAND`` does too.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

from tests.cached_venvs import cached_python

# The release, with the dependencies its image runs (poetry.lock of the tag v0.11.2): its wheel's
# ranges let pip take a kombu that needs a redis-py the wheel excludes, and not packaging, which
# kombu's Redis transport imports.
DANIHODOVIC = {"prometheus-exporter-celery": "0.11.2", "celery": "5.5.2", "kombu": "5.5.2", "redis": "5.2.1",
               "amqp": "5.3.1", "prometheus-client": "0.21.1", "packaging": "24.2"}
_RUN = "import sys; from src.cli import cli; sys.argv[0] = 'celery-exporter'; cli(auto_envvar_prefix='CE')"

_VERIFY = """
import json, sys
from importlib.metadata import version
from src.cli import cli
from src.exporter import Exporter
import kombu.transport.redis
json.dump({name: version(name) for name in sys.argv[1:]}, sys.stdout)
"""


def _key() -> str:
    pins = "-".join(f"{name}{version}" for name, version in list(DANIHODOVIC.items())[:1])
    return f"py{sys.version_info.major}.{sys.version_info.minor}-{pins}"


def _install(run, python: Path) -> None:
    run(python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
        *(f"{name}=={version}" for name, version in DANIHODOVIC.items()))


@functools.cache
def danihodovic_python() -> str:
    """The python of a venv with the released prometheus-exporter-celery; built at most once per key."""
    return cached_python("peer-", _key(), f"{DANIHODOVIC}", DANIHODOVIC, _VERIFY, _install)


def danihodovic_command() -> tuple[str, ...]:
    """The peer's command line up to its flags (run it from a neutral directory: cwd=tempfile.gettempdir())."""
    return (danihodovic_python(), "-c", _RUN)
