import pytest

from tests.harness import ExporterProcess, WorkerProcess, make_broker


@pytest.fixture
def make_exporter(tmp_path):
    """Start exporters as real subprocesses; each is stopped with SIGTERM at the end
    and must exit 0 within 5 s (the contract of the daemon)."""
    started = []

    def start(broker_url, *extra, wait=True, env=None):
        exporter = ExporterProcess(broker_url, *extra, log_path=tmp_path / f"exporter-{len(started)}.log", env=env)
        started.append(exporter)
        return exporter.wait_ready() if wait else exporter

    yield start
    for exporter in started:
        code, seconds = exporter.stop()
        assert code == 0, f"exporter exited {code}:\n{exporter.log()}"
        assert seconds < 5


@pytest.fixture
def make_worker(tmp_path):
    """Start real Celery workers; ``celery=`` picks the Celery version they run on (one of
    tests.celery_versions.WORKER_CELERY; the newest, this Python's, by default)."""
    from tests.celery_versions import NEWEST, python_for

    started = []

    def start(broker_url, name, *, celery=NEWEST, **kwargs):
        kwargs.setdefault("python", python_for(celery))
        worker = WorkerProcess(broker_url, name, log_path=tmp_path / f"worker-{name}.log", **kwargs)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture(params=["amqp", "redis"])
def broker(request):
    b = make_broker(request.param)
    yield b
    b.close()
