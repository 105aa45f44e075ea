"""Seed 000's crash where it really happens: a task's exception that cannot be unpickled
kills the worker's main process ("Unrecoverable error: TypeError(...)"), with exit code
0 on Celery 5.2.7 (`self.retry(exc=...)`) and 1 on the newest (`raise Reject(...)`; its
retry wraps the exception instead). The exporter names it on both: exactly with the
worker hook, as a lower bound from the events without it."""
import uuid

import pytest

from tests.apps.testapp import client
from tests.celery_versions import each_worker_celery, is_oldest
from tests.harness import wait_for

pytestmark = pytest.mark.integration

FAST = ("--worker-timeout", "4", "--inspect-interval", "0")


@each_worker_celery
@pytest.mark.parametrize("hook", [True, False], ids=["hook", "no-hook"])
def test_a_worker_that_dies_on_an_unpicklable_exception_is_named(redis_broker, make_exporter, make_worker,
                                                                   worker_celery, hook):
    exporter = make_exporter(redis_broker.url, *FAST)
    queue = f"crash-{uuid.uuid4().hex[:6]}"
    worker = make_worker(redis_broker.url, "crash", queues=queue, celery=worker_celery, app="tests.apps.crashapp",
                         env={"TEST_INSTALL_HOOK": "1" if hook else "0"})
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
             message="worker up")
    task = "tests.retry_unpicklable" if is_oldest(worker_celery) else "tests.reject_unpicklable"
    client(redis_broker.url).send_task(task, queue=queue)

    # billiard waits ~30 s for the pool before the main process exits
    assert worker.proc.wait(90) == (0 if is_oldest(worker_celery) else 1)  # what a supervisor sees
    assert "Unrecoverable error: TypeError" in worker.log()
    exception = "TypeError" if hook else "unknown"
    wait_for(lambda: exporter.scrape().value("celery_worker_unrecoverable_errors_total",
                                             hostname=worker.hostname, exception=exception) == 1, 30,
             message=f"the crash counted with exception={exception}")
    m = exporter.scrape()
    assert m.sum("celery_worker_unrecoverable_errors_total") == 1  # once, not once per piece of evidence
    unpicklable = m.value("celery_task_unpicklable_exceptions_total", name=task, exception="UnpicklableError")
    assert unpicklable == (1 if hook else None)
