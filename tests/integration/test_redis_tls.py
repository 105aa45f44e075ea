"""Redis that speaks TLS only (``port 0``, ``tls-port``), with a password and client certificates,
as managed Redis services run it: a real worker and the exporter over ``rediss://`` with the CA
verified. Events, queue polls and remote control work; a wrong CA, a wrong hostname or a missing
client certificate is one line of reason, the exporter staying up and retrying with backoff; a
missing certificate file is bad input (exit 2); no password or key material leaks.
"""
import subprocess
import sys
import time
import uuid
from urllib.parse import urlencode

import pytest
import redis

from tests.apps.testapp import client
from tests.harness import HOST, ROOT, free_port, wait_for
from tests.certs import make_certificates
from tests.redis_servers import tls_redis

pytestmark = pytest.mark.integration

FAST = ("--broker-poll-interval", "1", "--inspect-interval", "1", "--worker-timeout", "6")


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    directory = tmp_path_factory.mktemp("redis-tls")
    certs = make_certificates(directory / "certs")
    password = f"tls-pw-{uuid.uuid4().hex}"
    server = tls_redis(directory / "redis", certs, auth_clients=True, extra=[f"requirepass {password}"])
    server.client_options["password"] = password
    server.start()
    yield certs, server, password
    server.stop()


def url(server, password, *, host="localhost", **tls_query) -> str:
    return f"rediss://:{password}@{host}:{server.tls_port}/0?{urlencode(tls_query)}"


def verified(certs, **overrides) -> dict:
    return {"ssl_cert_reqs": "required", "ssl_ca_certs": str(certs.ca), "ssl_certfile": str(certs.client_cert),
            "ssl_keyfile": str(certs.client_key), **overrides}


def test_events_queues_and_remote_control_over_verified_tls_with_a_client_certificate(tls, make_exporter,
                                                                                      make_worker):
    certs, server, password = tls
    broker = url(server, password, **verified(certs))
    make_worker(broker, "tls", queues="celery")
    # The TLS settings also work as --broker-ssl-option (the URL without a query).
    exporter = make_exporter(url(server, password), *FAST, "--queues", "tls-hole",
                             *(arg for key, value in verified(certs).items()
                               for arg in ("--broker-ssl-option", f"{key}={value}")))
    publisher = client(broker)
    for i in range(3):
        publisher.send_task("tests.add", args=(i, i))
        publisher.send_task("tests.add", args=(i, i), queue="tls-hole")

    def seen():
        m = exporter.scrape()
        return m if (m.value("celery_task_succeeded_total", name="tests.add", hostname=f"tls@{HOST}",
                             queue_name="celery") == 3
                     and m.value("celery_queue_length", queue_name="tls-hole") == 3
                     and m.value("celery_active_consumer_count", queue_name="celery") == 1) else None

    m = wait_for(seen, 40, message="task events, the queue poll and the worker's active_queues over TLS")
    assert m.value("celery_active_consumer_count", queue_name="tls-hole") == 0  # a black hole, seen over TLS
    assert m.value("celery_broker_consumers_known") == 1
    assert {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
        "events": 1, "inspect": 1, "redis": 1}
    # TLS only: plain text is refused on the port the exporter uses, and there is no other port
    with pytest.raises(redis.ConnectionError):
        redis.Redis("localhost", server.tls_port, password=password, socket_timeout=5).ping()

    pages = {path: exporter.get(path)[1] for path in ("/", "/api/findings", "/metrics", "/readyz")}
    pages["log"] = exporter.log()
    assert "***@localhost" in pages["/"]
    for where, text in pages.items():
        assert password not in text, f"the Redis password leaked into {where}"
        for line in certs.key_lines():
            assert line not in text, f"client key material leaked into {where}"


FAILURES = {  # case: (what the reason must say, the host in the URL)
    "wrong CA": ("certificate verify failed", "localhost"),
    "wrong hostname": ("not valid for '127.0.0.1'", "127.0.0.1"),
    "no client certificate": ("client certificate", "localhost"),
}


def test_tls_failures_are_one_line_of_reason_and_the_exporter_stays_up(tls, make_exporter):
    certs, server, password = tls
    queries = {
        "wrong CA": verified(certs, ssl_ca_certs=str(certs.other_ca)),
        "wrong hostname": verified(certs),
        "no client certificate": {"ssl_cert_reqs": "required", "ssl_ca_certs": str(certs.ca)},
    }
    started = time.monotonic()
    # Started together, judged together: each waits out its retries in parallel.
    exporters = {case: make_exporter(url(server, password, host=host, **queries[case]), *FAST, wait=False)
                 for case, (_, host) in FAILURES.items()}

    def down_with_reason(case):
        status, reason = exporters[case].get("/readyz")
        return (status, reason) if status == 503 and FAILURES[case][0] in reason else None

    for case, exporter in exporters.items():
        status, reason = wait_for(lambda: down_with_reason(case), 30, message=f"/readyz names the failure ({case})")
        assert len(reason.strip().splitlines()) == 1, reason
        m = exporter.scrape()
        assert {labels["source"]: v for labels, v in m.find("celery_exporter_source_up")} == {
            "events": 0, "inspect": 0, "redis": 0}, case
    for case, exporter in exporters.items():
        # the remote-control poller retries last (after --inspect-interval): then every source has failed
        wait_for(lambda: "inspect: down" in exporter.log(), 20, message=f"every source tried ({case})")
        assert exporter.alive()
        log = exporter.log()
        assert "Traceback" not in log, log
        assert log.count("events: down") == 1 and log.count("redis: down") == 1, log
        assert FAILURES[case][0] in log, log
        assert password not in log and password not in exporter.get("/")[1]
    # Retries, not a tight loop: at most one attempt per second and source (events back off from
    # 1 s, the poller polls every 1 s here, remote control backs off from 1 s); every failed
    # attempt counts in celery_exporter_source_failures_total.
    seconds = time.monotonic() - started
    for case, exporter in exporters.items():
        failures = {labels["source"]: v for labels, v in
                    exporter.scrape().find("celery_exporter_source_failures_total")}
        assert all(1 <= failures.get(source, 0) <= seconds + 1 for source in ("events", "redis", "inspect")), \
            (case, failures, seconds)


@pytest.mark.parametrize("where", ["url", "flag"])
def test_a_missing_certificate_file_is_bad_input(tls, tmp_path, where):
    certs, server, password = tls
    missing = tmp_path / "no-such-ca.pem"
    if where == "url":
        args = ["--broker-url", url(server, password, **verified(certs, ssl_ca_certs=str(missing)))]
    else:
        args = ["--broker-url", url(server, password), "--broker-ssl-option", f"ssl_ca_certs={missing}"]
    proc = subprocess.run([sys.executable, "-m", "celery_health_exporter", *args, "--listen-address",
                           f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "ssl_ca_certs" in lines[0], proc.stderr
    assert password not in proc.stderr
