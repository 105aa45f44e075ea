"""Session fixtures of the image tests: one engine, one build, containers removed at the end."""
from tests.image.docker import docker, image, report_lines  # noqa: F401


def pytest_terminal_summary(terminalreporter):
    lines = report_lines()
    if lines:
        terminalreporter.section("docker image")
        for line in lines:
            terminalreporter.write_line(line)
