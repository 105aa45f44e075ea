"""prometheus-exporter-celery (danihodovic/celery-exporter) as a drop-in: its flags and CE_* variables
read as ours, and the families and labels it has, from hand-made events (no broker)."""
import time

import pytest
from prometheus_client import Histogram
from prometheus_client.parser import text_string_to_metric_families

from celery_health_exporter.cli import config_from_args, main
from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.state.model import ClusterState

URL = "redis://redis:6379/0"
# The peer's --buckets default as its --help shows it (prometheus_client's, ending in inf)
PEER_DEFAULT_BUCKETS = ",".join(map(str, Histogram.DEFAULT_BUCKETS))


def parse(argv, env=None):
    notices = []
    config = config_from_args(argv, env or {}, notice=notices.append)
    return config, notices


def test_a_command_line_written_for_the_peer_starts_with_the_same_meaning():
    config, notices = parse([
        "--broker-url", URL, "--host", "127.0.0.1", "--port", "9999", f"--buckets={PEER_DEFAULT_BUCKETS}",
        "--purge-offline-worker-metrics", "0", "--worker-timeout", "0", "--generic-hostname-task-sent-metric",
        "--generic-hostname-worker-task-metric", "--default-queue-name", "default", "--accept-content", "json",
        "--retry-interval", "5", "-Q", "a,b", "--static-label", "env=prod", "--metric-prefix", "celery_",
        "--broker-transport-option", "visibility_timeout=7200", "--log-level", "TRACE",
        "--queue-wait-buckets", "0.5,1,inf"])
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 9999)
    assert config.runtime_buckets == tuple(Histogram.DEFAULT_BUCKETS[:-1])
    assert config.queue_wait_buckets == (0.5, 1.0)
    assert config.purge_offline_after == float("inf") and config.worker_timeout == float("inf")
    assert config.task_sent_hostname is False and config.generic_worker_task_hostname is True
    assert config.default_queue_name == "default" and config.queues == ("a", "b")
    assert config.static_labels == {"env": "prod"}
    assert config.broker_transport_options == {"visibility_timeout": 7200}
    assert config.log_level == "DEBUG"
    # one line per flag that is read differently, naming ours
    said = "\n".join(notices)
    for flag, ours in (("--host/--port", "--listen-address 127.0.0.1:9999"), ("--buckets", "--runtime-buckets"),
                       ("--purge-offline-worker-metrics", "--purge-offline-after"),
                       ("--retry-interval", "reconnects"), ("--accept-content", "JSON"), ("TRACE", "DEBUG"),
                       ("--worker-timeout 0", "never")):
        assert any(flag in line and ours in line for line in notices), (flag, said)
    assert len(notices) == 7


def test_the_peers_ce_variables_as_its_docker_image_reads_them():
    env = {"CE_BROKER_URL": URL, "CE_PORT": "9100", "CE_STATIC_LABEL": "env=prod team=data",
           "CE_BROKER_TRANSPORT_OPTION": "global_keyprefix=app1: visibility_timeout=60",
           "CE_GENERIC_HOSTNAME_TASK_SENT_METRIC": "y", "CE_GENERIC_HOSTNAME_WORKER_TASK_METRIC": "0",
           "CE_BUCKETS": "1,2,5", "CE_PURGE_OFFLINE_WORKER_METRICS": "120", "CE_QUEUES": "celery,reports",
           "CE_DEFAULT_QUEUE_NAME": "celery", "CE_METRIC_PREFIX": "app_"}
    config, notices = parse([], env)
    assert config.broker_url == URL and (config.listen_host, config.listen_port) == ("0.0.0.0", 9100)
    assert config.static_labels == {"env": "prod", "team": "data"}  # click splits on whitespace
    assert config.broker_transport_options == {"global_keyprefix": "app1:", "visibility_timeout": 60}
    assert config.task_sent_hostname is False and config.generic_worker_task_hostname is False
    assert config.runtime_buckets == (1, 2, 5) and config.purge_offline_after == 120
    assert config.queues == ("celery", "reports") and config.default_queue_name == "celery"
    assert config.metric_prefix == "app_"
    assert any("CE_PORT" in line and "--port" in line for line in notices)


def test_our_own_flags_and_variables_win_over_the_peers():
    config, _ = parse(["--port", "9101"], {"CE_BROKER_URL": "redis://ce:6379/0", "CE_PORT": "9100",
                                            "CELERY_EXPORTER_BROKER_URL": URL, "CE_METRIC_PREFIX": "app_",
                                            "CELERY_EXPORTER_METRIC_PREFIX": "ours_"})
    assert config.broker_url == URL and config.listen_port == 9101 and config.metric_prefix == "ours_"


def test_defaults_without_the_peers_flags():
    config, notices = parse(["--broker-url", URL])
    assert notices == []
    assert config.task_sent_hostname is True and config.generic_worker_task_hostname is False
    assert config.default_queue_name == "unknown" and (config.listen_host, config.listen_port) == ("0.0.0.0", 9808)


@pytest.mark.parametrize("argv, flag", [
    (["--listen-address", "0.0.0.0:9808", "--port", "9100"], "--listen-address"),
    (["--port", "http"], "--listen-address"),
    (["--buckets", "1,x"], "--runtime-buckets"),
    (["--purge-offline-worker-metrics", "-5"], "--purge-offline-after"),
    (["--default-queue-name", " "], "--default-queue-name"),
    (["--host"], "--host"),
])
def test_bad_peer_input_is_one_line_naming_our_flag_and_exit_2(argv, flag, capsys, monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    assert main(["--broker-url", URL, *argv]) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if "error" in line]
    assert len(error) == 1 and flag in error[0] and "Traceback" not in err


# ------------------------------------------------------------------ the model, read as the peer's families

def ev(kind, now, **fields):
    return {"type": kind, "timestamp": now, "utcoffset": 0, **fields}


def metrics(state) -> dict:
    text = StateCollector(state, [], prefix="celery_").render()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run(state, uuid, at, *, worker="celery@w1", publisher="gen42@web-1", queue="q1", sent=True, received_after=2.0,
        started_after=3.0):
    """A task published at ``at``, received and started later by ``worker``."""
    if sent:
        state.apply(ev("task-sent", at, uuid=uuid, name="app.add", queue=queue, hostname=publisher), at)
    state.apply(ev("task-received", at + received_after, uuid=uuid, name="app.add", hostname=worker),
                at + received_after)
    state.apply(ev("task-started", at + started_after, uuid=uuid, hostname=worker), at + started_after)
    state.apply(ev("task-succeeded", at + started_after + 1, uuid=uuid, hostname=worker, runtime=1.0),
                at + started_after + 1)


def fresh(**options):
    now = float(int(time.time()) - 100)  # whole seconds: an ETA is written to the second below
    options.setdefault("task_histograms_by_worker", False)  # the daemon's default
    return ClusterState(queue_wait_buckets=(1, 5, 10), utcoffset=0, **options), now


def test_task_sent_is_labelled_with_the_publishers_host_or_generic():
    state, now = fresh()
    run(state, "a", now)
    run(state, "b", now, publisher="gen43@web-1")  # another process on the same host: one series
    run(state, "c", now, publisher="web-2")
    m = metrics(state)
    assert m[("celery_task_sent_total", (("hostname", "web-1"), ("name", "app.add"), ("queue_name", "q1")))] == 2
    assert m[("celery_task_sent_total", (("hostname", "web-2"), ("name", "app.add"), ("queue_name", "q1")))] == 1
    state, now = fresh(task_sent_hostname=False)
    run(state, "a", now)
    run(state, "c", now, publisher="web-2")
    m = metrics(state)
    assert m[("celery_task_sent_total", (("hostname", "generic"), ("name", "app.add"), ("queue_name", "q1")))] == 2


def test_queue_wait_counts_from_publication_and_prefetch_wait_from_receipt():
    state, now = fresh()
    run(state, "a", now, received_after=2.0, started_after=3.0)
    m = metrics(state)
    labels = (("name", "app.add"), ("queue_name", "q1"))
    assert m[("celery_task_queue_wait_time_sum", labels)] == pytest.approx(3.0)
    assert m[("celery_task_prefetch_wait_time_sum", labels)] == pytest.approx(1.0)


def test_without_a_task_sent_queue_wait_falls_back_to_receipt():
    state, now = fresh()
    run(state, "a", now, sent=False, received_after=2.0, started_after=3.0)
    m = metrics(state)
    labels = (("name", "app.add"), ("queue_name", "unknown"))
    assert m[("celery_task_queue_wait_time_sum", labels)] == pytest.approx(1.0)
    assert m[("celery_task_queue_wait_time_count", labels)] == 1


def test_an_eta_in_the_future_is_not_waiting():
    state, now = fresh()
    state.apply(ev("task-sent", now, uuid="e", name="app.add", queue="q1", hostname="web-1"), now)
    eta = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now + 10))
    state.apply(ev("task-received", now + 1, uuid="e", name="app.add", hostname="celery@w1", eta=eta), now + 1)
    state.apply(ev("task-started", now + 12, uuid="e", hostname="celery@w1"), now + 12)
    m = metrics(state)
    assert m[("celery_task_queue_wait_time_sum", (("name", "app.add"), ("queue_name", "q1")))] == pytest.approx(2.0)


def test_generic_worker_hostname_sums_the_workers_flows_once():
    state, now = fresh(generic_worker_task_hostname=True, task_histograms_by_worker=True)
    run(state, "a", now, worker="celery@w1")
    run(state, "b", now, worker="celery@w2")
    m = metrics(state)
    labels = (("hostname", "generic"), ("name", "app.add"), ("queue_name", "q1"))
    assert m[("celery_task_succeeded_total", labels)] == 2
    assert m[("celery_task_runtime_count", labels)] == 2
    assert not [key for key in m if key[0] == "celery_task_succeeded_total" and ("hostname", "celery@w1") in key[1]]
    assert state.runtime_by_name() == {"app.add": (2, 2.0)}


def test_generic_worker_hostname_keeps_the_crash_detection_per_worker():
    state, now = fresh(generic_worker_task_hostname=True)
    state.apply(ev("worker-heartbeat", now, hostname="celery@w1", pid=1, freq=2.0, active=1, processed=0), now)
    run(state, "a", now)
    state.apply(ev("task-received", now + 5, uuid="lost", name="app.add", hostname="celery@w1"), now + 5)
    state.apply(ev("task-started", now + 6, uuid="lost", hostname="celery@w1"), now + 6)
    state.apply(ev("task-failed", now + 7, uuid="lost", hostname="celery@w1",
                   exception="WorkerLostError('Worker exited prematurely: exitcode 0 Job: 1.')"), now + 7)
    m = metrics(state)
    labels = (("exception", "WorkerLostError"), ("hostname", "generic"), ("name", "app.add"), ("queue_name", "q1"))
    assert m[("celery_task_failed_total", labels)] == 1
    state.apply(ev("worker-offline", now + 8, hostname="celery@w1"), now + 8)  # its main process is gone
    m = metrics(state)
    assert m[("celery_worker_unrecoverable_errors_total", (("exception", "unknown"), ("hostname", "celery@w1")))] == 1


def test_default_queue_name_labels_tasks_whose_queue_nothing_tells():
    state, now = fresh(unknown_queue="celery")
    run(state, "a", now, sent=False)
    m = metrics(state)
    assert m[("celery_task_succeeded_total", (("hostname", "celery@w1"), ("name", "app.add"),
                                              ("queue_name", "celery")))] == 1


def test_active_worker_and_process_counts_per_queue_from_remote_control():
    state, now = fresh()
    for hostname, pid in (("celery@w1", 1), ("celery@w2", 2), ("celery@solo", 3)):
        state.apply(ev("worker-online", now, hostname=hostname, pid=pid, freq=2.0), now)
    state.apply_stats("celery@w1", {"pool": {"processes": [11, 12, 13]}}, now)
    state.apply_stats("celery@w2", {"pool": {"processes": [21, 22]}}, now)
    state.apply_stats("celery@solo", {"pool": {}}, now)  # solo pool: no child processes
    state.apply_active_queues("celery@w1", [{"name": "q1"}, {"name": "q2"}])
    state.apply_active_queues("celery@w2", [{"name": "q1"}])
    state.apply_active_queues("celery@solo", [{"name": "q2"}])
    assert not [key for key in metrics(state) if key[0] == "celery_active_worker_count"]  # no poll yet: unknown
    state.remote_control_polled(now, 1000)
    m = metrics(state)
    assert m[("celery_active_worker_count", (("queue_name", "q1"),))] == 2
    assert m[("celery_active_process_count", (("queue_name", "q1"),))] == 5
    assert m[("celery_active_worker_count", (("queue_name", "q2"),))] == 2
    assert m[("celery_active_process_count", (("queue_name", "q2"),))] == 3
    state.apply(ev("worker-offline", now + 1, hostname="celery@w2"), now + 1)
    m = metrics(state)  # q1 lost a worker: still reported, with what is left
    assert m[("celery_active_worker_count", (("queue_name", "q1"),))] == 1
    assert m[("celery_active_process_count", (("queue_name", "q1"),))] == 3
