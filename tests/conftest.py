import time
from collections import defaultdict

import pytest

from tests.harness import ExporterProcess, WorkerProcess, make_broker


@pytest.fixture
def make_exporter(tmp_path):
    """Start exporters as real subprocesses; each is stopped with SIGTERM at the end
    and must exit 0 within 5 s (the contract of the daemon)."""
    started = []

    def start(broker_url, *extra, wait=True, env=None, **process_options):
        exporter = ExporterProcess(broker_url, *extra, log_path=tmp_path / f"exporter-{len(started)}.log", env=env,
                                   **process_options)
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


@pytest.fixture
def redis_broker():
    """A Redis test database of its own (flushed, leased from other pytest processes)."""
    b = make_broker("redis")
    yield b
    b.close()


# ------------------------------------------------------------------ cost of each part of the suite
# What each area of the suite costs (setup, call and teardown of its tests, session fixtures such
# as the image build or the old-Celery venv included where they are first used), printed at the
# end of every run: the README's table of CI costs is read from it.
_area_seconds: dict[str, float] = defaultdict(float)
_area_tests: dict[str, int] = defaultdict(int)
_session_started = time.monotonic()


def _area(nodeid: str) -> str:
    parts = nodeid.split("::", 1)[0].split("/")
    area = parts[1] if len(parts) > 2 else "(top)"
    return f"{area} (Celery 5.2.7 workers)" if "celery-5.2.7" in nodeid else area


def pytest_runtest_logreport(report):
    _area_seconds[_area(report.nodeid)] += report.duration
    if report.when == "call":
        _area_tests[_area(report.nodeid)] += 1


def pytest_terminal_summary(terminalreporter):
    if not _area_seconds:
        return
    terminalreporter.section("time per area")
    for area, seconds in sorted(_area_seconds.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{area:<40} {_area_tests[area]:>4} tests {seconds:>8.1f} s")
    terminalreporter.write_line(f"{'whole session':<40} {sum(_area_tests.values()):>4} tests "
                                f"{time.monotonic() - _session_started:>8.1f} s")
