"""The hooks run inside users' workers, publishers and beat: importing one (and
calling its install) must load nothing beyond Celery, kombu and the standard
library, so that users' worker images need none of the exporter's own
dependencies (aiohttp, bcrypt, yaml, psutil, prometheus_client, redis)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HOOKS = ["celery_health_exporter.hooks.worker", "celery_health_exporter.hooks.publisher",
         "celery_health_exporter.hooks.beat"]
# What Celery and kombu are made of: modules they bring are theirs, not ours.
CELERY_FAMILY = {"celery", "kombu", "billiard", "vine", "amqp", "click", "click_didyoumean", "click_repl",
                 "click_plugins", "dateutil", "tzlocal", "tzdata", "six"}
EXPORTER_ONLY = {"aiohttp", "bcrypt", "yaml", "psutil", "prometheus_client", "redis", "hiredis", "multidict",
                 "yarl", "aiosignal", "frozenlist"}

LOADED = """
import importlib, json, sys
from celery import Celery
import celery.signals, celery.worker.control, celery.worker.state, kombu
app = Celery("hooked", broker="memory://", set_as_current=False)
before = set(sys.modules)
module = importlib.import_module({module!r})
if hasattr(module, "install"):
    module.install(app)
print(json.dumps(sorted({{name.split(".")[0] for name in set(sys.modules) - before}})))
"""


def packages_loaded_by(module: str) -> set[str]:
    """Top-level packages that importing ``module`` (and calling its install) adds to
    a process that already imported what the hooks use of Celery."""
    out = subprocess.run([sys.executable, "-c", LOADED.format(module=module)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return set(json.loads(out))


@pytest.mark.parametrize("hook", HOOKS)
def test_importing_and_installing_a_hook_loads_only_celery_kombu_and_the_standard_library(hook):
    added = packages_loaded_by(hook)
    foreign = added - set(sys.stdlib_module_names) - CELERY_FAMILY - {"celery_health_exporter"}
    assert not foreign, f"{hook} loads {sorted(foreign)}"
    assert not added & EXPORTER_ONLY


def test_the_measurement_sees_what_a_module_loads():
    """The daemon side, measured the same way, does load the exporter's own dependencies."""
    assert {"celery_health_exporter", "aiohttp", "prometheus_client"} <= packages_loaded_by(
        "celery_health_exporter.app")
