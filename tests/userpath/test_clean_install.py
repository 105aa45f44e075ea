"""The exporter as a user installs it: `pip install .` into a fresh venv, nothing else,
run as the console script outside the checkout, against the real brokers."""
from __future__ import annotations

import uuid

import pytest

from tests.apps.testapp import client
from tests.harness import RABBITMQ_API, free_port, make_amqp_broker, wait_for

from .conftest import make_user_venv

pytestmark = pytest.mark.integration


def installed_exporter(venv, tmp_path) -> dict:
    return {"command": (str(venv.bin / "celery-health-exporter"),), "cwd": tmp_path,
            "env": {"PATH": venv.env()["PATH"]}}


def poll_flags(broker) -> list[str]:
    flags = ["--broker-poll-interval", "1", "--inspect-interval", "2"]
    return flags + (["--rabbitmq-management-url", RABBITMQ_API] if broker.kind == "amqp" else [])


def test_a_clean_install_reads_both_brokers(user_venv, broker, make_exporter, make_worker, tmp_path):
    """Events (a task counted), the broker poller (celery_broker_up, a queue length) and
    remote control, with only what `pip install .` brought."""
    assert not user_venv.imports("pytest")  # really not the test interpreter
    queue = f"q-{uuid.uuid4().hex[:6]}"
    exporter = make_exporter(broker.url, *poll_flags(broker), "--queues", f"{queue},{queue}-idle",
                             **installed_exporter(user_venv, tmp_path))
    worker = make_worker(broker.url, "clean", queues=queue)
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
             message="worker up")
    publisher = client(broker.url)
    publisher.send_task("tests.add", (1, 2), queue=queue)
    publisher.send_task("tests.add", (1, 2), queue=f"{queue}-idle")  # nobody consumes it
    wait_for(lambda: exporter.scrape().value("celery_task_succeeded_total", name="tests.add",
                                             hostname=worker.hostname, queue_name=queue) == 1, 30,
             message="task counted")
    wait_for(lambda: exporter.scrape().value("celery_queue_length", queue_name=f"{queue}-idle") == 1, 30,
             message="queue length of the idle queue")
    poller = "rabbitmq" if broker.kind == "amqp" else "redis"
    wait_for(lambda: {labels["source"]: value for labels, value in exporter.scrape().find(
        "celery_exporter_source_up")} == {"events": 1, "inspect": 1, poller: 1}, 30, message="every source up")
    assert exporter.scrape().value("celery_broker_up") == 1


def test_version_and_help_of_the_console_script_and_the_module(user_venv, tmp_path):
    version = user_venv.run(user_venv.python, "-m", "celery_health_exporter", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("celery-health-exporter "), version
    helped = user_venv.run(str(user_venv.bin / "celery-health-exporter"), "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--broker-url" in helped.stdout, helped


@pytest.fixture(scope="module")
def venv_without_packaging(tmp_path_factory):
    """A clean install from which `packaging` was removed: what kombu's Redis
    transport imports (kombu >= 5.5) and what the first releases forgot to declare."""
    venv = make_user_venv(tmp_path_factory.mktemp("broken-venv") / "venv", ".")
    removed = venv.run(venv.python, "-m", "pip", "uninstall", "-y", "-q", "packaging")
    assert removed.returncode == 0, removed
    assert not venv.imports("packaging")
    return venv


def test_a_missing_transport_dependency_is_one_line_and_exit_2(venv_without_packaging, tmp_path):
    exporter = str(venv_without_packaging.bin / "celery-health-exporter")
    result = venv_without_packaging.run(exporter, "--broker-url", "redis://127.0.0.1:6379/0",
                                        "--listen-address", f"127.0.0.1:{free_port()}", cwd=tmp_path, timeout=30)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "missing dependency" in lines[0] and "'packaging'" in lines[0] and "redis://" in lines[0], lines[0]
    assert result.stdout == ""

    doctor = venv_without_packaging.run(exporter, "doctor", "--broker-url", "redis://127.0.0.1:6379/0",
                                        "--duration", "1s", cwd=tmp_path, timeout=30)
    assert doctor.returncode == 2 and "'packaging'" in doctor.stderr and "Traceback" not in doctor.stderr, doctor


def test_a_broker_that_does_not_need_the_missing_package_still_works(venv_without_packaging, make_exporter,
                                                                     tmp_path):
    """The check is per broker: RabbitMQ needs no `packaging`, so the same install serves it."""
    amqp = make_amqp_broker()
    try:
        exporter = make_exporter(amqp.url, *poll_flags(amqp), **installed_exporter(venv_without_packaging,
                                                                                     tmp_path))
        wait_for(lambda: exporter.scrape().value("celery_broker_up") == 1, 30, message="broker polled")
    finally:
        amqp.close()
