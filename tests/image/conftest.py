"""Fixtures of the image tests: one engine and one build per session; the containers a test
starts are removed when it ends (left running, their health checks every second took a core
from the rest of the suite)."""
import pytest

from tests.image.docker import _session, docker, image, report_lines  # noqa: F401


@pytest.fixture(autouse=True)
def containers_removed_after_the_test():
    engine = _session.get("engine")
    started_before = len(engine.containers) if engine else 0
    yield
    engine = _session.get("engine")
    if engine is not None:
        engine.remove_all(keep=started_before)


def pytest_terminal_summary(terminalreporter):
    lines = report_lines()
    if lines:
        terminalreporter.section("docker image")
        for line in lines:
            terminalreporter.write_line(line)
