"""RabbitMQ over TLS as production runs it: AMQPS with the CA verified and a client certificate
required by the broker, the management API over HTTPS verified with --rabbitmq-management-ca-file.

A RabbitMQ node of this module's own (tests/rabbitmq_node.py): a real worker and the exporter
over amqps://; events, queue polls and remote control work. A wrong CA or a wrong host name is
one line of reason on /readyz, the status page and the log, the exporter up and retrying with
backoff; TLS settings py-amqp cannot read, or a CA file that cannot be read, are bad input (exit
2). No password or key material leaks.
"""
import html
import json
import subprocess
import sys
import time
import uuid

import pytest

from tests.apps.rabbitapp import client, publish_workload, worked
from tests.harness import HOST, ROOT, free_port, wait_for
from tests.rabbitmq_node import start_node

pytestmark = pytest.mark.integration

FAST = ("--broker-poll-interval", "1", "--inspect-interval", "1", "--worker-timeout", "6")
APP = "tests.apps.rabbitapp"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    node = start_node(tmp_path_factory)
    try:  # set up and stopped whatever fails: a node left running would outlive the tests
        node.user, node.password = "app", f"app-pw-{uuid.uuid4().hex}"
        node.add_user(node.user, node.password)
        node.set_permissions("/", node.user, ".*", ".*", ".*")
        node.monitor, node.monitor_password = "monitor", f"mon-pw-{uuid.uuid4().hex}"
        node.add_user(node.monitor, node.monitor_password, tags="monitoring")
        node.set_permissions("/", node.monitor, "", "", "")  # the API reads with the tag alone
        yield node
    finally:
        node.stop()


def worker_tls(node) -> dict:
    pki = node.pki
    return {"ca_certs": str(pki.ca), "cert_reqs": "CERT_REQUIRED", "certfile": str(pki.client_cert),
            "keyfile": str(pki.client_key), "server_hostname": "localhost"}


def api_url(node, host="localhost") -> str:
    return f"https://{node.monitor}:{node.monitor_password}@{host}:{node.api_tls_port}"


def leaks(node, text: str) -> list[str]:
    secrets = [node.password, node.monitor_password, *node.pki.key_lines()]
    return [s for s in secrets if s in text]


def test_events_queue_polls_and_remote_control_over_amqps_and_https(node, make_exporter, make_worker):
    url = node.amqps_url(node.user, node.password)
    tls = worker_tls(node)
    worker = make_worker(url, "tls", app=APP, queues="work", concurrency=2,
                         env={"TEST_BROKER_USE_SSL": json.dumps(tls)})
    exporter = make_exporter(url, *node.client_ssl_options(), *FAST,
                             "--rabbitmq-management-url", api_url(node),
                             "--rabbitmq-management-ca-file", str(node.pki.ca))
    publisher = client(url, tls)
    publish_workload(publisher, holes=2, hold=True)

    hostname = f"tls@{HOST}"

    def seen():
        m = exporter.scrape()
        return m if (worked(m, hostname, holes=2)
                     and m.value("celery_queue_unacked", queue_name="work") == 1
                     and m.value("celery_worker_pool_max_concurrency", hostname=hostname) == 2) else None

    m = wait_for(seen, 60, 0.5, message="task events, the HTTPS queue poll and inspect stats over TLS")
    assert m.value("celery_active_consumer_count", queue_name="hole") == 0  # the black hole, over TLS
    assert {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
        "events": 1, "inspect": 1, "rabbitmq": 1}
    assert m.value("celery_broker_connections") >= 2  # the monitoring tag sees every connection
    # the broker saw them over TLS: every connection of the exporter and the worker is ssl
    connections = node.api("GET", "/api/connections?columns=user,ssl,peer_cert_subject")
    assert connections and all(c["ssl"] for c in connections), connections
    assert all("CN=exporter" in c["peer_cert_subject"] for c in connections), connections

    pages = {path: exporter.get(path)[1] for path in ("/", "/api/findings", "/metrics", "/readyz")}
    pages["log"] = exporter.log()
    assert f"management API https://localhost:{node.api_tls_port}" in pages["/"]
    for where, text in pages.items():
        assert not leaks(node, text), f"a secret leaked into {where}"
    assert worker.proc.poll() is None


# case: (what the events reason says, what the management API reason says), exporter arguments
FAILURES = {
    "wrong CA": ("certificate verify failed", "certificate verify failed"),
    "wrong host name": ("not valid for '127.0.0.1'", "not valid for '127.0.0.1'"),
    # without the management API the queue poller is the AMQP fallback: it fails the same way
    "no client certificate": ("client certificate", "client certificate"),
}


def test_a_wrong_ca_or_host_name_is_one_line_of_reason_and_the_exporter_stays_up(node, make_exporter):
    other_ca = str(node.pki.other_ca)
    args = {
        "wrong CA": (node.amqps_url(node.user, node.password), *node.client_ssl_options(ca=node.pki.other_ca),
                     "--rabbitmq-management-url", api_url(node), "--rabbitmq-management-ca-file", other_ca),
        # the server certificate names localhost only
        "wrong host name": (node.amqps_url(node.user, node.password, host="127.0.0.1"), *node.client_ssl_options(),
                            "--rabbitmq-management-url", api_url(node, host="127.0.0.1"),
                            "--rabbitmq-management-ca-file", str(node.pki.ca)),
        "no client certificate": (node.amqps_url(node.user, node.password), "--broker-ssl-option",
                                  f"ca_certs={node.pki.ca}", "--broker-ssl-option", "cert_reqs=CERT_REQUIRED"),
    }
    started = time.monotonic()
    # started together, judged together: their retries run in parallel
    exporters = {case: make_exporter(*args[case], *FAST, wait=False) for case in FAILURES}
    for case, exporter in exporters.items():
        events_reason, api_reason = FAILURES[case]

        def failed():
            status, reason = exporter.get("/readyz")
            page = html.unescape(exporter.get("/")[1])
            return (status, reason) if (status == 503 and events_reason in reason and api_reason in page
                                        and "inspect: down" in exporter.log()) else None

        status, reason = wait_for(failed, 40, 0.5, message=f"/readyz and / name the failure ({case})")
        assert len(reason.strip().splitlines()) == 1, reason
        m = exporter.scrape()
        assert {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
            "events": 0, "inspect": 0, "rabbitmq": 0}, case
        assert exporter.alive()
        log = exporter.log()
        assert "Traceback" not in log, log
        # one line per source and outage, not one per retry (each retried at least twice by now)
        assert log.count("events: down") == 1 and log.count("rabbitmq: down") == 1, log
        if case != "no client certificate":  # TLS 1.3 tells it either as the alert or as an EOF, by timing
            assert "still down" not in log, log  # the same cause at every retry
        assert api_reason in log and events_reason in log
        for where, text in (("log", log), ("/", exporter.get("/")[1]), ("/metrics", m.text)):
            assert not leaks(node, text), f"a secret leaked into {where} ({case})"
    # retried, not in a tight loop: at most one failed attempt per second and source (events and
    # remote control back off from 1 s, the poller polls every 1 s here)
    seconds = time.monotonic() - started
    for case, exporter in exporters.items():
        failures = {labels["source"]: v for labels, v in
                    exporter.scrape().find("celery_exporter_source_failures_total")}
        assert all(1 <= failures.get(source, 0) <= seconds + 1 for source in ("events", "rabbitmq", "inspect")), \
            (case, failures, seconds)


@pytest.mark.parametrize("case", ["ssl options in an amqps URL", "unreadable management CA file"])
def test_tls_settings_that_cannot_work_are_bad_input(node, tmp_path, case):
    url = node.amqps_url(node.user, node.password)
    if case == "ssl options in an amqps URL":  # kombu would hand them to py-amqp, which refuses them
        args = ["--broker-url", f"{url}?ssl_ca_certs={node.pki.ca}&ssl_cert_reqs=required"]
        expected = "--broker-ssl-option"
    else:
        missing = tmp_path / "no-such-ca.pem"
        args = ["--broker-url", url, "--rabbitmq-management-url", api_url(node),
                "--rabbitmq-management-ca-file", str(missing)]
        expected = f"--rabbitmq-management-ca-file: cannot read {missing}"
    proc = subprocess.run([sys.executable, "-m", "celery_health_exporter", *args, "--listen-address",
                           f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not leaks(node, proc.stderr)
