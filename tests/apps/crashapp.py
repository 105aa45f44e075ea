"""Tasks whose outcome the worker's main process cannot unpickle: it stops on an
unrecoverable error (exit code 0 on Celery <= 5.2, 1 since 5.3).

TEST_INSTALL_HOOK=1 turns the worker hook on the documented way, install(app).
"""
import os

from celery.exceptions import Reject

from tests.apps.testapp import UnpicklableError, app

if os.environ.get("TEST_INSTALL_HOOK") == "1":
    from celery_health_exporter.hooks.worker import install

    install(app)


@app.task(name="tests.reject_unpicklable")
def reject_unpicklable():
    """Kills the main process on every Celery version (retry_unpicklable only up to 5.2)."""
    raise Reject(UnpicklableError(1, "nope"), requeue=False)
