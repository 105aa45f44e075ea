"""The least RabbitMQ rights the exporter needs, as docs/brokers.md gives them: with them
events, queue polls and remote control work; with one right less, the missing right is named
(RabbitMQ's ACCESS_REFUSED text, its HTTP 401 reason) in one log line and on /readyz or the
status page.

A RabbitMQ node of this module's own (tests/rabbitmq_node.py): users are made there, never on
the machine's shared RabbitMQ.
"""
import html
import uuid

import pytest

from tests.apps.rabbitapp import client, publish_workload, worked
from tests.harness import HOST, wait_for
from tests.rabbitmq_node import start_node

pytestmark = pytest.mark.integration

VHOST = "celery"
FAST = ("--broker-poll-interval", "1", "--inspect-interval", "1", "--worker-timeout", "6")

# Exactly what docs/brokers.md tells users to run (rabbitmqctl set_permissions -p VHOST USER C W R).
OWN_QUEUE = r"celeryev\.celery-health-exporter\..*"
REPLY_QUEUE = r"[0-9a-f-]{36}\.reply\.celery\.pidbox"
CONFIGURE = rf"^({OWN_QUEUE}|celeryev|celery\.pidbox|reply\.celery\.pidbox|{REPLY_QUEUE})$"
WRITE = rf"^({OWN_QUEUE}|celery\.pidbox|{REPLY_QUEUE})$"
READ = rf"^({OWN_QUEUE}|celeryev|reply\.celery\.pidbox|{REPLY_QUEUE})$"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory)
    try:  # set up and stopped whatever fails: a node left running would outlive the tests
        node.add_vhost(VHOST)
        node.add_user("app", "app-pw")  # the workers and publishers: everything on the vhost
        node.set_permissions(VHOST, "app", ".*", ".*", ".*")
        node.app_url = node.amqp_url("app", "app-pw", VHOST)
        yield node
    finally:
        node.stop()


def exporter_user(node, name: str, *, tags: str = "monitoring", configure=CONFIGURE, write=WRITE,
                  read=READ) -> tuple[str, str]:
    password = f"{name}-pw-{uuid.uuid4().hex}"
    node.add_user(name, password, tags=tags)
    node.set_permissions(VHOST, name, configure, write, read)
    return node.amqp_url(name, password, VHOST), password


def test_with_the_documented_rights_events_queue_polls_and_remote_control_work(node, make_exporter,
                                                                                 make_worker):
    url, password = exporter_user(node, "exporter")
    make_worker(node.app_url, "least", app="tests.apps.rabbitapp", queues="work", concurrency=2)
    exporter = make_exporter(url, *FAST, "--rabbitmq-management-url", node.api_url)
    publisher = client(node.app_url)
    publish_workload(publisher, holes=1, hold=False)
    hostname = f"least@{HOST}"

    def working():
        m = exporter.scrape()
        return m if (worked(m, hostname, holes=1)
                     and m.value("celery_worker_pool_max_concurrency", hostname=hostname) == 2) else None

    m = wait_for(working, 60, 0.5, message="events, queue polls and remote control with the least rights")
    assert {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
        "events": 1, "inspect": 1, "rabbitmq": 1}
    assert m.value("celery_broker_connections") >= 3  # the monitoring tag: the worker's too, not ours only
    log = exporter.log()
    assert "ACCESS_REFUSED" not in log and ": down:" not in log, log
    assert password not in log + exporter.get("/")[1] + m.text


# case: user settings, what must be said, and where (the source that fails)
ONE_RIGHT_LESS = {
    "no read on the celeryev exchange": (
        dict(read=READ.replace("|celeryev|", "|")),
        "ACCESS_REFUSED - access to exchange 'celeryev' in vhost 'celery' refused for user "
        "'no-read'", "events"),
    # remote control refused; events still flow (the heartbeat broadcast at connect is refused
    # silently by the broker: workers are then learnt from their next heartbeat)
    "no write on celery.pidbox": (
        dict(write=WRITE.replace(r"|celery\.pidbox|", "|")),
        "ACCESS_REFUSED - access to exchange 'celery.pidbox' in vhost 'celery' refused for user "
        "'no-pidbox'", "inspect"),
    "no management tag": (
        dict(tags=""),
        "user 'no-tag' has no management tag; give it the monitoring tag", "rabbitmq"),
    "management tag, not monitoring": (
        dict(tags="management"),
        "user 'management-only' has no monitoring tag", "rabbitmq"),
}
USERS = {"no read on the celeryev exchange": "no-read", "no write on celery.pidbox": "no-pidbox",
         "no management tag": "no-tag",
         "management tag, not monitoring": "management-only"}


def test_with_one_right_less_the_missing_right_is_named_once(node, make_exporter):
    exporters, passwords = {}, []
    for case, (settings, _, _) in ONE_RIGHT_LESS.items():
        url, password = exporter_user(node, USERS[case], **settings)
        passwords.append(password)
        exporters[case] = make_exporter(url, *FAST, "--rabbitmq-management-url", node.api_url, wait=False)

    for case, exporter in exporters.items():
        _, said, source = ONE_RIGHT_LESS[case]

        def named():
            page = html.unescape(exporter.get("/")[1])
            return page if said in page and said in exporter.log() else None

        page = wait_for(named, 40, 0.5, message=f"the missing right named ({case})")
        wait_for(lambda: exporter.log().count(f"{source}: ") >= 1, 10, message="logged")
        log = exporter.log()
        assert exporter.alive()
        assert "Traceback" not in log, log
        lines = [line for line in log.splitlines() if said in line and f"{source}: " in line]
        assert len(lines) == 1, (case, lines)  # one line, not one per retry
        status, reason = exporter.get("/readyz")
        if source == "events":  # the essential source: not ready, and why
            assert status == 503 and said in reason and len(reason.strip().splitlines()) == 1, reason
        else:  # a poller short of a right does not make the exporter unready
            assert status == 200 and "events: down" not in log, reason
        for text in (log, page, exporter.get("/metrics")[1], reason):
            assert not any(p in text for p in passwords)

    # without the monitoring tag RabbitMQ lists the user's own connections only: the count is left out
    limited = exporters["management tag, not monitoring"]
    m = wait_for(lambda: (lambda m: m if m.value("celery_exporter_source_up", source="rabbitmq") == 1 else None)(
        limited.scrape()), 20, message="the poller up with the management tag")
    assert m.find("celery_broker_connections") == []
    no_tag = exporters["no management tag"].scrape()
    assert no_tag.value("celery_exporter_source_up", source="rabbitmq") == 0
