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


def serve(broker_url: str, publisher: str, interval: float) -> None:
    """A publishing process driven line by line (JSON) on stdin, for tests that run the hook
    under another Celery/kombu (``python -m tests.apps.publisherapp URL PUBLISHER INTERVAL``).

    ``{"send": N, "queue": Q}`` publishes N times and answers the exception class of each
    (null when it went out); ``{"snapshot": true}`` answers the hook's local totals and the
    user's errback calls; end of input stops the hook and the process.
    """
    import json
    import sys

    from celery_health_exporter.hooks.publisher import instrument

    errback = RecordingErrback()
    app = make_app(broker_url, errback=errback)
    hook = instrument(app, interval=interval, publisher=publisher)
    for line in sys.stdin:
        command = json.loads(line)
        if "send" in command:
            raised = []
            for _ in range(command["send"]):
                try:
                    app.send_task("tests.add", (1, 2), queue=command["queue"])
                    raised.append(None)
                except Exception as exc:  # what the caller sees: the hook must not change it
                    raised.append(type(exc).__name__)
            answer = {"raised": raised}
        else:
            answer = {"snapshot": hook.snapshot(), "errback_calls": errback.calls}
        print(json.dumps(answer), flush=True)
    hook.stop(flush=True)


if __name__ == "__main__":
    import sys

    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]))
