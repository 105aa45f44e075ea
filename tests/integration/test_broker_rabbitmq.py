"""The RabbitMQ poller against the RabbitMQ of this machine: management API, AMQP fallback, failures.

Each test has a vhost and a user of its own (``make_amqp_broker``). RabbitMQ
refreshes the management API's queue figures every 5 s, hence the waits.
"""
import http.server
import logging
import socket
import threading
import time
import uuid

import pytest

from celery_health_exporter.config import Config
from celery_health_exporter.broker import make_app
from celery_health_exporter.sources.rabbitmq import RabbitMQSource
from celery_health_exporter.state.model import ClusterState
from tests.apps.brokerapp import client
from tests.celery_versions import each_worker_celery
from tests.harness import RABBITMQ_API, TcpProxy, free_port, make_amqp_broker, rabbitmq_api, wait_for

pytestmark = pytest.mark.integration

POLL = ("--broker-poll-interval", "1")
STATS_WAIT = 30  # the management API's figures lag by up to collect_statistics_interval (5 s)


@pytest.fixture
def amqp():
    broker = make_amqp_broker()
    yield broker
    broker.close()


def queue_names(m):
    return {labels["queue_name"] for labels, _ in m.find("celery_queue_length")}


@each_worker_celery
def test_black_hole_unacked_consumers_and_counters_from_the_management_api(amqp, make_exporter, make_worker,
                                                                           worker_celery):
    exporter = make_exporter(amqp.url, "--rabbitmq-management-url", RABBITMQ_API, *POLL)
    publisher = client(amqp.url)
    for _ in range(3):
        publisher.send_task("brokers.noop", queue="hole")  # nobody consumes "hole"
    worker = make_worker(amqp.url, "holder", celery=worker_celery, queues="work", concurrency=1,
                         app="tests.apps.brokerapp")
    publisher.send_task("brokers.hold", queue="work")  # acks_late, never returns: stays unacked

    def settled():
        m = exporter.scrape()
        return m if (m.value("celery_queue_length", queue_name="hole") == 3
                     and m.value("celery_queue_messages_published_total", queue_name="hole") == 3
                     and m.value("celery_queue_unacked", queue_name="work") == 1
                     and m.value("celery_queue_messages_delivered_total", queue_name="work") == 1
                     # (RabbitMQ refreshes the consumer count and the message counts at different times)
                     and m.value("celery_active_consumer_count", queue_name="work") == 1) else None

    m = wait_for(settled, STATS_WAIT, 0.5, message="queue figures from the management API")
    assert m.value("celery_active_consumer_count", queue_name="hole") == 0  # the black hole
    assert m.value("celery_queue_unacked", queue_name="hole") == 0
    assert m.value("celery_queue_messages_delivered_total", queue_name="hole") == 0
    assert m.value("celery_queue_length", queue_name="work") == 0
    assert m.value("celery_queue_messages_acked_total", queue_name="work") == 0
    assert m.value("celery_queue_messages_redelivered_total", queue_name="work") == 0
    # Celery's own queues (the worker's pidbox, every celeryev.* receiver, ours too) are not reported
    assert queue_names(m) == {"hole", "work"}
    assert m.value("celery_exporter_source_up", source="rabbitmq") == 1
    assert m.value("celery_broker_up", broker=amqp.url.replace(amqp.password, "***")) == 1
    assert m.value("celery_broker_connections") >= 2  # the exporter's events and the worker at least
    assert worker.proc.poll() is None

    rabbitmq_api("DELETE", f"/api/queues/{amqp.vhost}/hole")
    wait_for(lambda: queue_names(exporter.scrape()) == {"work"}, 10, message="deleted queue gone from /metrics")

    _, page = exporter.get("/")
    for text in (exporter.scrape().text, page, exporter.log()):
        assert amqp.password not in text
    assert "management API http://127.0.0.1:15672" in page


def test_wrong_credentials_and_api_down_mean_source_down_with_one_line_each_then_recovery(amqp, make_exporter):
    proxy = TcpProxy("127.0.0.1", 15672)
    monitor, password = f"mon-{amqp.vhost}", f"pw-{uuid.uuid4().hex}"
    try:
        # The monitoring user does not exist yet: 401 on every poll.
        exporter = make_exporter(amqp.url, "--rabbitmq-management-url",
                                 f"http://{monitor}:{password}@127.0.0.1:{proxy.port}", *POLL)
        wait_for(lambda: "HTTP 401" in exporter.log(), 10, message="401 logged")
        m = exporter.scrape()
        assert m.value("celery_exporter_source_up", source="rabbitmq") == 0
        assert m.value("celery_broker_up", broker=amqp.url.replace(amqp.password, "***")) == 0
        assert m.find("celery_queue_length") == []
        assert exporter.get("/readyz")[0] == 200  # a poller down does not make the exporter unready
        time.sleep(3.5)  # several failed polls at 1 s...
        assert exporter.log().count("rabbitmq: down") == 1  # ...one line
        assert f"login failed for user '{monitor}'" in exporter.log()

        # Fixed: the user now exists with that password.
        rabbitmq_api("PUT", f"/api/users/{monitor}", {"password": password, "tags": "monitoring"})
        rabbitmq_api("PUT", f"/api/permissions/{amqp.vhost}/{monitor}",
                     {"configure": "", "write": "", "read": ".*"})
        rabbitmq_api("PUT", f"/api/queues/{amqp.vhost}/waiting", {"durable": False})
        wait_for(lambda: exporter.scrape().value("celery_queue_length", queue_name="waiting") == 0, 15,
                 message="recovery after the credentials were fixed")
        assert exporter.scrape().value("celery_exporter_source_up", source="rabbitmq") == 1
        assert exporter.log().count("rabbitmq: connected") == 1  # its first success

        # The API goes away (nothing listens any more): down again, one more line, values dropped.
        proxy.cut()
        wait_for(lambda: exporter.scrape().value("celery_exporter_source_up", source="rabbitmq") == 0, 10,
                 message="source down with the API gone")
        assert exporter.scrape().find("celery_queue_length") == []
        time.sleep(2.5)
        log = exporter.log()
        assert log.count("rabbitmq: down") == 2
        assert "cannot connect to the management API at http://127.0.0.1:" in log

        proxy.restore()
        wait_for(lambda: exporter.scrape().value("celery_queue_length", queue_name="waiting") == 0, 15,
                 message="recovery after the API came back")
        assert exporter.log().count("rabbitmq: recovered") == 1
        _, page = exporter.get("/")
        for text in (exporter.scrape().text, page, exporter.log()):
            assert password not in text and amqp.password not in text
    finally:
        proxy.close()
        try:
            rabbitmq_api("DELETE", f"/api/users/{monitor}")
        except Exception:
            pass


def test_without_management_url_passive_declares_give_ready_and_consumers_and_say_what_is_missing(
        amqp, make_exporter):
    publisher = client(amqp.url)
    for _ in range(2):
        publisher.send_task("brokers.noop", queue="named")
    exporter = make_exporter(amqp.url, "--queues", "named,ghost", *POLL)

    def seen():
        m = exporter.scrape()
        return m if m.value("celery_queue_length", queue_name="named") == 2 else None

    m = wait_for(seen, 10, message="length from a passive declare")
    assert m.value("celery_active_consumer_count", queue_name="named") == 0
    assert m.find("celery_queue_unacked") == []  # AMQP cannot tell: absent, not 0
    assert m.find("celery_queue_messages_published_total") == []
    assert m.find("celery_queue_length", queue_name="ghost") == []  # no such queue on the broker
    assert m.value("celery_exporter_source_up", source="rabbitmq") == 1
    _, page = exporter.get("/")
    assert "no --rabbitmq-management-url" in page and "unacked counts" in page
    assert exporter.log().count("no --rabbitmq-management-url") == 1


# ------------------------------------------------------------------------------------------
# Failure classification, in process (the poller object itself, no exporter subprocess)

def poller(broker_url, api_url, **overrides) -> tuple[RabbitMQSource, ClusterState]:
    config = Config(broker_url=broker_url, rabbitmq_management_url=api_url, broker_poll_interval=1)
    state = ClusterState()
    source = RabbitMQSource(config, state, make_app(config))
    for name, value in overrides.items():  # on the management API client
        setattr(source.api, name, value)
    return source, state


class _HtmlErrorPage(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
        status = 502 if "queues" in self.path else 200
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_failures_are_named_clearly_values_dropped_and_logged_once_per_change(amqp, caplog):
    caplog.set_level(logging.WARNING, logger="celery_health_exporter.sources.rabbitmq")
    silent = socket.socket()  # accepts connections, never answers: a hung API
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    html = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HtmlErrorPage)
    threading.Thread(target=html.serve_forever, daemon=True).start()
    try:
        source, state = poller(amqp.url, RABBITMQ_API)
        assert source.poll_once() and state.broker.snapshot is not None
        assert state.broker.snapshot.queues == {}  # an empty vhost: nothing, and not a failure

        source.api.base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        source.api.request_timeout = 0.5
        for _ in range(3):
            assert not source.poll_once()
        assert state.broker.snapshot is None and not source.health.up
        assert "no answer from the management API" in state.broker.reason and "0.5s" in state.broker.reason

        source.api.base = f"http://127.0.0.1:{html.server_address[1]}"
        assert not source.poll_once()
        assert state.broker.reason.startswith("HTTP 502 from the management API")

        source.api.base = RABBITMQ_API
        source.api.vhost = "no-such-vhost"
        assert not source.poll_once()
        assert "HTTP 404" in state.broker.reason and "vhost 'no-such-vhost' not found" in state.broker.reason

        source.api.base = f"http://127.0.0.1:{free_port()}"  # nothing listens
        assert not source.poll_once()
        assert "cannot connect to the management API" in state.broker.reason
        source.close()

        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 4, lines  # the outage starts, then one line per change of cause
        assert "rabbitmq: down: no answer" in lines[0]
        assert "still down, now: HTTP 502" in lines[1]
        assert "still down, now: HTTP 404" in lines[2]
        assert "still down, now: cannot connect" in lines[3]

        # An HTML page where JSON was expected (HTTP 200): named as such.
        source, state = poller(amqp.url, f"http://127.0.0.1:{html.server_address[1]}")
        source.api.vhost = "x"
        html.RequestHandlerClass = _HtmlOkPage
        assert not source.poll_once()
        assert "not JSON from the management API" in state.broker.reason and "text/html" in state.broker.reason
        source.close()

        # An answer bigger than the limit is refused, not buffered.
        source, state = poller(amqp.url, RABBITMQ_API, max_response_bytes=50)
        rabbitmq_api("PUT", f"/api/queues/{amqp.vhost}/some-queue", {"durable": False})
        assert not source.poll_once()
        assert "limit" in state.broker.reason
        source.close()
    finally:
        html.shutdown()
        silent.close()


class _HtmlOkPage(_HtmlErrorPage):
    def do_GET(self):  # noqa: N802
        body = b"<html><body>Please log in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _BrokenJsonPages(http.server.BaseHTTPRequestHandler):
    """A management API gone wrong: JSON cut short, a lying Content-Length, a slow drip."""

    mode = "truncated"

    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b'[{"name": "q1", "messages_ready": 3}, {"name": "q2", "mess'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if self.mode == "truncated":  # well framed, but not a whole JSON document
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.mode == "short":  # promises more than it sends, then hangs up
            self.send_header("Content-Length", str(len(body) * 10))
            self.end_headers()
            self.wfile.write(body)
        else:  # drip: one byte at a time, never done within the timeout
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)

    def log_message(self, *args):
        pass


def test_truncated_short_and_dripping_answers_are_named_and_the_source_recovers(amqp):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BrokenJsonPages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        source, state = poller(amqp.url, f"http://127.0.0.1:{server.server_address[1]}")
        source.api.request_timeout = 0.5
        expected = {"truncated": "not JSON from the management API",
                    "short": "management API at",
                    "drip": "no answer from the management API"}
        for mode, reason in expected.items():
            _BrokenJsonPages.mode = mode
            started = time.monotonic()
            assert not source.poll_once()
            assert reason in state.broker.reason, (mode, state.broker.reason)
            assert state.broker.snapshot is None and not source.health.up
            assert time.monotonic() - started < 3  # bounded by the request timeout, whatever the server does
        source.api.base = RABBITMQ_API  # the real API again: back up by itself
        assert source.poll_once() and state.broker.snapshot is not None and source.health.up
        source.close()
    finally:
        server.shutdown()


def test_messages_the_broker_drops_from_a_queue_are_read_from_the_management_api(amqp):
    """What celery_exporter_events_lost_messages_total is built from: published, and what is
    neither queued nor settled (acked or delivered without ack)."""
    from kombu import Connection, Exchange, Queue

    from celery_health_exporter.sources.events import management_queue
    from celery_health_exporter.sources.rabbitmq_api import ManagementAPI, management_access

    config = Config(broker_url=amqp.url, rabbitmq_management_url=RABBITMQ_API)
    exchange = Exchange("drops", type="fanout", durable=False)
    queue = Queue("overflowing", exchange=exchange, durable=False, max_length=1)
    with Connection(amqp.url) as connection:
        queue(connection.channel()).declare()
        producer = connection.Producer(exchange=exchange)
        for i in range(4):
            producer.publish({"n": i}, serializer="json")
    api = ManagementAPI(management_access(config, make_app(config)))
    # The broker's statistics are refreshed every few seconds, later on a busy broker (one
    # CI run waited more than 20 s). On failure the last reading is shown, not just False.
    readings = []

    def dropped_three():
        readings.append(management_queue(api, "overflowing"))
        return readings[-1] == (4, 3)

    try:
        wait_for(dropped_three, 60, interval=1, message="3 of 4 messages dropped by x-max-length=1")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last readings (published, dropped): {readings[-5:]}") from None
