"""Session fixtures of the image tests: one engine, one build, containers removed at the end."""
from __future__ import annotations

import time

import pytest

from tests.image.docker import Docker, build_image, start_engine


@pytest.fixture(scope="session")
def docker(request) -> Docker:
    engine = start_engine()
    yield engine
    engine.remove_all()


@pytest.fixture(scope="session")
def image(docker, tmp_path_factory, request) -> str:
    started = time.monotonic()
    name = build_image(docker, tmp_path_factory.mktemp("image-build"))
    docker.timings["engine + base + build"] = time.monotonic() - started
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("image build: " + ", ".join(f"{k} {v:.1f}s" for k, v in docker.timings.items()))
    return name
