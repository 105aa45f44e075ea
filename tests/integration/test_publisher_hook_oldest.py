"""The publisher hook in a publisher on the oldest supported Celery (5.2.7, kombu 5.2.4).

The hook runs inside users' processes, so it must count right with the kombu they have.
Ground truth is kombu itself, as in test_publisher_hook.py: the user's errback in the
retry policy records every call kombu makes. The publisher is a real process of the
oldest-Celery venv (tests/celery_versions.py), driven line by line on stdin
(tests/apps/publisherapp.py ``serve``); its broker link is cut and restored with a TCP proxy.
"""
import json
import subprocess
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.celery_versions import OLDEST, python_for
from tests.harness import ROOT, TcpProxy, make_broker, wait_for

pytestmark = pytest.mark.integration
SHIP_INTERVAL = 0.3


class Publisher:
    def __init__(self, python: str, url: str, publisher: str, log_path):
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([python, "-m", "tests.apps.publisherapp", url, publisher, str(SHIP_INTERVAL)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"publisher exited {self.proc.poll()}"
        return json.loads(line)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def amqp_proxied():
    broker = make_broker("amqp")
    parts = urlsplit(broker.url)
    proxy = TcpProxy(parts.hostname, parts.port)
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    yield broker, urlunsplit(parts._replace(netloc=netloc)), proxy
    proxy.close()
    broker.close()


def test_publisher_hook_on_the_oldest_celery_counts_what_kombu_does(amqp_proxied, make_exporter, tmp_path):
    broker, url, proxy = amqp_proxied
    exporter = make_exporter(broker.url, "--no-broker-poll", "--inspect-interval", "0")
    name = f"web-{uuid.uuid4().hex[:6]}"
    publisher = Publisher(python_for(OLDEST["celery"]), url, name, tmp_path / "publisher.log")
    try:
        def shipped():
            m = exporter.scrape()
            return {"publishes": m.value("celery_publish_total", publisher=name),
                    "retries": m.value("celery_publish_retries_total", publisher=name),
                    "exceeded": m.value("celery_publish_retry_policy_exceeded_total", publisher=name),
                    "duration_count": m.value("celery_publish_duration_seconds_count", publisher=name),
                    "failures": {labels["exception"]: v
                                 for labels, v in m.find("celery_publish_failures_total", publisher=name)}}

        queue = f"q-{uuid.uuid4().hex[:6]}"
        assert publisher.ask(send=3, queue=queue) == {"raised": [None] * 3}
        wait_for(lambda: shipped()["publishes"] == 3, 15, message="3 publishes shipped")
        assert shipped()["retries"] == 0

        proxy.cut()
        assert publisher.ask(send=3, queue=queue) == {"raised": ["OperationalError"] * 3}
        local = publisher.ask(snapshot=True)
        calls = local["errback_calls"]
        # kombu 5.2.4 calls the errback for the first publish only (the failed publish and its 3
        # reconnects); kombu 5.7 calls it 4 + 3 + 3 times (test_publisher_hook.py).
        assert len(calls) == 4, calls
        assert all(exc in ("OSError", "ConnectionRefusedError", "ConnectionError") for exc, _ in calls), calls
        snapshot = local["snapshot"]
        assert (snapshot["publishes"], snapshot["retries"], snapshot["failures"]) == (6, 4, {"OperationalError": 3})
        assert snapshot["retry_policy_exceeded"] == 0

        proxy.restore()
        assert publisher.ask(send=1, queue=queue) == {"raised": [None]}
        expected = {"publishes": 7, "retries": 4, "exceeded": 0, "duration_count": 7,
                    "failures": {"OperationalError": 3}}
        wait_for(lambda: shipped() == expected, 15, message=f"totals {expected} shipped after the restore")
    finally:
        code = publisher.close()
    assert code == 0, (tmp_path / "publisher.log").read_text()
