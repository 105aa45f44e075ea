"""The publisher hook in a real publishing app, its broker link cut and restored with a TCP proxy.

Ground truth for retries is kombu itself: the user's errback in the retry
policy records every call kombu makes, and the hook must count exactly as many.
With max_retries=3, kombu 5.7 calls the errback 4 times for the first publish
after the link is lost (the failed publish + 3 reconnects) and 3 times for the
next ones (3 reconnects: the connection is known to be down).
"""
import os
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from kombu.connection import Connection

from celery_health_exporter.hooks.publisher import instrument
from tests.apps.publisherapp import RETRY_POLICY, RecordingErrback, make_app
from tests.harness import TcpProxy, make_broker, wait_for

pytestmark = pytest.mark.integration
SHIP_INTERVAL = 0.3


def through(proxy, url):
    parts = urlsplit(url)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    return urlunsplit(parts._replace(netloc=netloc))


def _proxied(broker):
    parts = urlsplit(broker.url)
    proxy = TcpProxy(parts.hostname, parts.port)
    yield through(proxy, broker.url), proxy
    proxy.close()


@pytest.fixture
def proxied(broker):
    yield from _proxied(broker)


@pytest.fixture
def amqp_proxied():
    """The detection of a runaway retry does not depend on the broker: RabbitMQ only."""
    broker = make_broker("amqp")
    try:
        for url, proxy in _proxied(broker):
            yield broker, url, proxy
    finally:
        broker.close()


@pytest.fixture
def hooks():
    started = []
    yield started
    for hook in started:
        hook.stop(flush=False)


def publish_metrics(exporter, publisher):
    m = exporter.scrape()
    return {
        "publishes": m.value("celery_publish_total", publisher=publisher),
        "retries": m.value("celery_publish_retries_total", publisher=publisher),
        "exceeded": m.value("celery_publish_retry_policy_exceeded_total", publisher=publisher),
        "failures": {labels["exception"]: v for labels, v in m.find("celery_publish_failures_total",
                                                                   publisher=publisher)},
        "duration_count": m.value("celery_publish_duration_seconds_count", publisher=publisher),
        "ship_errors": m.value("celery_publish_hook_errors_total", publisher=publisher, stage="ship"),
    }


def test_retries_and_failures_counted_exactly_and_shipped_after_the_outage(broker, proxied, make_exporter, hooks):
    url, proxy = proxied
    exporter = make_exporter(broker.url, "--no-broker-poll", "--inspect-interval", "0")
    user_errback = RecordingErrback()
    app = make_app(url, errback=user_errback)
    publisher = f"web-{uuid.uuid4().hex[:6]}"
    hook = instrument(app, interval=SHIP_INTERVAL, publisher=publisher)
    hooks.append(hook)
    queue = f"q-{uuid.uuid4().hex[:6]}"

    for _ in range(3):
        app.send_task("tests.add", (1, 2), queue=queue)
    wait_for(lambda: publish_metrics(exporter, publisher)["publishes"] == 3, 15, message="3 publishes shipped")
    assert publish_metrics(exporter, publisher)["retries"] == 0

    proxy.cut()
    raised = []
    for _ in range(3):
        with pytest.raises(Exception) as info:
            app.send_task("tests.add", (1, 2), queue=queue)
        raised.append(type(info.value).__name__)
    assert raised == ["OperationalError"] * 3
    assert len(user_errback.calls) == 4 + 3 + 3  # the user's errback still runs, as kombu calls it
    local = hook.snapshot()
    assert (local["publishes"], local["retries"], local["failures"]) == (6, 10, {"OperationalError": 3})
    assert local["retry_policy_exceeded"] == 0  # 4 <= max_retries + 1: kombu kept to the policy

    time.sleep(3 * SHIP_INTERVAL)  # the shipping thread fails meanwhile and keeps the totals
    assert hook.snapshot()["hook_errors"].get("ship", 0) >= 1
    assert publish_metrics(exporter, publisher)["publishes"] == 3  # nothing reached the exporter

    proxy.restore()
    app.send_task("tests.add", (1, 2), queue=queue)
    expected = {"publishes": 7, "retries": 10, "exceeded": 0, "failures": {"OperationalError": 3},
                "duration_count": 7}
    got = wait_for(lambda: (lambda m: m if {k: m[k] for k in expected} == expected else None)(
        publish_metrics(exporter, publisher)), 15, message=f"totals {expected} shipped after the restore")
    assert got["ship_errors"] >= 1  # the hook's own failed sends are shipped too
    assert len(user_errback.calls) == 10
    assert all(name in ("OSError", "ConnectionRefusedError", "ConnectionError") for name, _ in user_errback.calls)
    assert exporter.scrape().value("celery_exporter_events_total", type="exporter-publisher-stats") >= 2


def test_a_kombu_that_ignores_the_retry_policy_is_caught_while_it_retries(amqp_proxied, make_exporter, hooks,
                                                                          monkeypatch):
    """The kombu bug the issue recalls: the policy's max_retries is ignored and the
    publish retries forever. Reproduced by dropping max_retries in Connection.ensure."""
    broker, url, proxy = amqp_proxied
    exporter = make_exporter(broker.url, "--no-broker-poll", "--inspect-interval", "0")
    user_errback = RecordingErrback()
    app = make_app(url, errback=user_errback)
    hook = instrument(app, interval=SHIP_INTERVAL)  # default label: the host name
    hooks.append(hook)
    queue = f"q-{uuid.uuid4().hex[:6]}"
    app.send_task("tests.add", (1, 2), queue=queue)

    original = Connection.ensure
    monkeypatch.setattr(Connection, "ensure",
                        lambda self, obj, fun, errback=None, max_retries=None, **kw:
                        original(self, obj, fun, errback=errback, max_retries=None, **kw))
    proxy.cut()
    done = threading.Event()
    outcome = []

    def publish():
        try:
            app.send_task("tests.add", (1, 2), queue=queue)
            outcome.append("ok")
        except Exception as exc:  # pragma: no cover - reported below
            outcome.append(repr(exc))
        done.set()

    threading.Thread(target=publish, daemon=True).start()
    wait_for(lambda: hook.snapshot()["retry_policy_exceeded"] == 1, 10, message="exceeded while still retrying")
    assert not done.is_set()  # still retrying: counted live, not at the end
    assert len(user_errback.calls) > RETRY_POLICY["max_retries"] + 1
    proxy.restore()
    assert done.wait(10) and outcome == ["ok"]
    monkeypatch.undo()

    publisher = socket.gethostname()
    got = wait_for(lambda: (lambda m: m if m["exceeded"] == 1 and m["retries"] == len(user_errback.calls)
                            and m["publishes"] == 2 else None)(publish_metrics(exporter, publisher)),
                   15, message="exceeded shipped")
    assert got["failures"] == {}
    assert hook.snapshot()["retry_policy_exceeded"] == 1  # counted once for the one publish


# ------------------------------------------------------------ no broker needed

def test_instrument_before_configuration_uses_the_later_policy(hooks):
    """instrument() right after Celery(): the policy and errback set later still apply."""
    app = make_app("amqp://guest:guest@127.0.0.1:1//")  # nothing listens on port 1
    app.conf.task_publish_retry_policy = {}
    hook = instrument(app, interval=60)
    hooks.append(hook)
    user_errback = RecordingErrback()
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.01,
                                          "interval_max": 0.01, "errback": user_errback}
    with pytest.raises(Exception) as info:
        app.send_task("tests.add", (1, 2))
    assert type(info.value).__name__ == "OperationalError"
    snap = hook.snapshot()
    # Never connected: kombu's default_channel tries max_retries (1) reconnects, then raises.
    assert snap["retries"] == len(user_errback.calls) == 1
    assert (snap["publishes"], snap["failures"], snap["retry_policy_exceeded"]) == (1, {"OperationalError": 1}, 0)
    assert instrument(app) is hook  # idempotent


def test_hook_failures_never_reach_the_caller(hooks, monkeypatch):
    app = make_app("memory://")
    hook = instrument(app, interval=60, publisher="p")
    hooks.append(hook)
    monkeypatch.setattr("celery_health_exporter.hooks.publisher.bisect_left", lambda *a: 1 / 0)
    result = app.send_task("tests.add", (1, 2))
    assert result.id

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("broken")

        def __setattr__(self, name, value):
            raise RuntimeError("broken")

    monkeypatch.setattr(hook, "_local", Broken())
    assert app.send_task("tests.add", (1, 2)).id
    assert hook.snapshot()["hook_errors"] == {"record": 1, "wrap": 1}
    monkeypatch.undo()
    app.send_task("tests.add", (1, 2))
    assert hook.snapshot()["publishes"] == 1  # the publish after the repairs counted normally
    assert instrument(object()) is None  # not even a bad argument raises


def test_a_forked_process_is_a_new_publisher_instance(hooks):
    app = make_app("memory://")
    hook = instrument(app, interval=60, publisher="p")
    hooks.append(hook)
    app.send_task("tests.add", (1, 2))
    parent_instance = hook.instance
    pid = os.fork()
    if pid == 0:  # gunicorn --preload: instrument() ran in the master, this is a worker
        ok = (hook.instance != parent_instance and hook.snapshot()["publishes"] == 0 and hook._thread is None)
        app.send_task("tests.add", (1, 2))
        ok = ok and hook.snapshot()["publishes"] == 1 and hook._thread is not None
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hook.instance == parent_instance and hook.snapshot()["publishes"] == 1
