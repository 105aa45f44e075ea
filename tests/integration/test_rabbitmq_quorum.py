"""Queues as Celery 5.5+ declares them, on a vhost that is not ``/``: quorum task queues
(``task_default_queue_type = "quorum"``), the native delayed-delivery queues Celery then
declares, and the exporter's own event queue as RabbitMQ 4.x still accepts it.

A RabbitMQ node of this module's own (tests/rabbitmq_node.py), vhost ``/prod``.
"""
import json
import re
import urllib.parse
import uuid

import pytest

from tests.apps.rabbitapp import client, publish_workload, worked
from tests.harness import HOST, wait_for
from tests.rabbitmq_node import start_node

pytestmark = pytest.mark.integration

VHOST = "/prod"
FAST = ("--broker-poll-interval", "1", "--inspect-interval", "1", "--worker-timeout", "6")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory)
    try:  # set up and stopped whatever fails: a node left running would outlive the tests
        node.add_vhost(VHOST)
        node.user, node.password = "app", f"app-pw-{uuid.uuid4().hex}"
        node.add_user(node.user, node.password, tags="monitoring")
        node.set_permissions(VHOST, node.user, ".*", ".*", ".*")
        node.url = node.amqp_url(node.user, node.password, VHOST)
        # a delivery limit by policy on "work"; "hole" has none
        node.api("PUT", f"/api/policies/{urllib.parse.quote(VHOST, safe='')}/work-limit",
                 {"pattern": "^work$", "definition": {"delivery-limit": 5}, "apply-to": "queues"})
        yield node
    finally:
        node.stop()


def queue_names(m) -> set[str]:
    return {labels["queue_name"] for labels, _ in m.find("celery_queue_length")}


def test_quorum_queues_on_a_vhost_length_unacked_consumers_and_black_holes(node, make_exporter, make_worker):
    worker = make_worker(node.url, "quorum", app="tests.apps.rabbitapp", queues="work", concurrency=2,
                         env={"TEST_QUEUE_TYPE": "quorum"})
    exporter = make_exporter(node.url, *FAST, "--rabbitmq-management-url", node.api_url)
    publisher = client(node.url, queue_type="quorum")
    publish_workload(publisher, holes=2, hold=True)  # "hole": a quorum queue nobody consumes

    hostname = f"quorum@{HOST}"

    def settled():
        m = exporter.scrape()
        return m if (worked(m, hostname, holes=2)
                     and m.value("celery_queue_unacked", queue_name="work") == 1
                     and m.value("celery_queue_messages_published_total", queue_name="hole") == 2
                     and m.value("celery_queue_delivery_limit", queue_name="work") == 5) else None

    m = wait_for(settled, 60, 0.5, message="quorum queue figures on /prod")
    types = {q["name"]: q.get("type") for q in node.queues(VHOST)}
    assert types["work"] == types["hole"] == "quorum", types  # what was measured is quorum queues
    assert m.value("celery_active_consumer_count", queue_name="hole") == 0  # the black hole
    assert m.value("celery_queue_unacked", queue_name="hole") == 0
    assert m.value("celery_queue_length", queue_name="work") == 0
    assert m.value("celery_queue_delivery_limit", queue_name="hole") is None  # no limit set: absent, not 0
    # Celery's native delayed delivery (declared with quorum queues): 28 quorum queues that no one
    # consumes by design; they are plumbing, never black holes
    delayed = [name for name in types if name.startswith("celery_delayed_")]
    assert delayed, types
    assert queue_names(m) == {"work", "hole"}
    findings = exporter.get("/api/findings")[1]
    assert "celery_delayed_" not in findings
    assert m.value("celery_exporter_source_up", source="rabbitmq") == 1
    assert worker.proc.poll() is None


def test_the_event_queue_is_durable_with_an_expiry_as_rabbitmq_4_still_accepts(node, make_exporter):
    """Transient non-exclusive queues are a deprecated feature in RabbitMQ 4.x (refused once it
    is denied); exclusive ones die with their connection (a reconnect would lose the events
    published meanwhile). Ours is durable, not exclusive, and expires after --event-queue-expires."""
    exporter = make_exporter(node.url, "--no-broker-poll", "--inspect-interval", "0",
                             "--event-queue-expires", "4", "--event-queue-ttl", "60")

    # its name, from the status page (the earlier test's exporter left one too, until it expires)
    own = re.search(r"queue (celeryev\.celery-health-exporter\.[0-9a-f]+)", exporter.get("/")[1]).group(1)

    def ours():
        out = node.ctl("list_queues", "-q", "-p", VHOST, "--formatter", "json",
                       "name", "durable", "exclusive", "auto_delete", "arguments")
        return [q for q in json.loads(out) if q["name"] == own]

    (queue,) = wait_for(ours, 20, message="the exporter's event queue declared")
    assert (queue["durable"], queue["exclusive"], queue["auto_delete"]) == (True, False, False), queue
    arguments = {key: value for key, _type, value in queue["arguments"]}  # rabbitmqctl's [key, type, value]
    assert arguments["x-expires"] == 4000 and arguments["x-message-ttl"] == 60000, arguments
    assert arguments["x-max-length"] == 1_000_000, arguments

    code, _ = exporter.stop()
    assert code == 0
    name = urllib.parse.quote(queue["name"], safe="")
    path = f"/api/queues/{urllib.parse.quote(VHOST, safe='')}/{name}"
    # without us it stays for --event-queue-expires (a reconnect within it loses nothing), then goes
    wait_for(lambda: not ours(), 30, 1, message="the event queue expired after the exporter left")
    with pytest.raises(Exception, match="404"):
        node.api("GET", path)
