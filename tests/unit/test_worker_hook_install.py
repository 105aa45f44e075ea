"""`celery_health_exporter.hooks.worker.install(app)`: the documented way to turn the
worker hook on, and the stdlib-only child listing it relies on."""
from __future__ import annotations

import os
import subprocess

from celery import Celery

from celery_health_exporter.hooks import worker as hook
from celery_health_exporter.hooks.protocol import WORKER_HOOK_CONF_KEY
from tests.harness import wait_for


def test_install_marks_the_app_and_is_idempotent():
    app = Celery("installed", broker="memory://", set_as_current=False)
    errors = hook._hook.errors
    hook.install(app)
    hook.install(app)
    assert app.conf[WORKER_HOOK_CONF_KEY] == 1
    assert hook._hook.errors == errors


def test_install_never_raises_into_the_host_process():
    errors = hook._hook.errors
    hook.install(object())  # not a Celery app: counted, not raised
    assert hook._hook.errors == errors + 1


def test_child_pids_lists_direct_children_only():
    child = subprocess.Popen(["sh", "-c", "sleep 30 & wait"])
    try:
        children = hook.child_pids(os.getpid())
        assert child.pid in children
        grandchildren = wait_for(lambda: hook.child_pids(child.pid), 10, message="sh forked sleep")
        assert not grandchildren & children
    finally:
        child.kill()
        child.wait()
    assert child.pid not in hook.child_pids(os.getpid())
