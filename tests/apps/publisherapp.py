"""A publishing application for the publisher-hook tests (a web app, in short).

``make_app(broker_url)`` returns an app with a known retry policy
(``max_retries=3``, short intervals) whose errback records every call, the way
a user's own errback would: the hook must chain it, not replace it.
"""
from celery import Celery

RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.1}


class RecordingErrback:
    """The user's errback: kombu calls it with (exc, interval)."""

    def __init__(self):
        self.calls = []

    def __call__(self, exc, interval):
        self.calls.append((type(exc).__name__, interval))


def make_app(broker_url: str, *, errback=None, name: str = "publisherapp") -> Celery:
    app = Celery(name, broker=broker_url, set_as_current=False)
    policy = dict(RETRY_POLICY)
    if errback is not None:
        policy["errback"] = errback
    app.conf.update(
        task_publish_retry=True,
        task_publish_retry_policy=policy,
        result_backend=None,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
    )
    return app
