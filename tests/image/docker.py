"""A real Docker engine for the image tests: started with deploy/dev/start-docker.sh, the stand-in
base built with deploy/dev/build-base-image.sh, and the image built from the unmodified Dockerfile
with the legacy builder (no BuildKit, no registry)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass, field

import pytest

from tests.harness import ROOT

IMAGE = "celery-health-exporter:test"
BUILDER = "celery-health-exporter:test-builder"
START_DOCKER = ROOT / "deploy" / "dev" / "start-docker.sh"
BUILD_BASE = ROOT / "deploy" / "dev" / "build-base-image.sh"


@dataclass
class Docker:
    env: dict
    timings: dict = field(default_factory=dict)  # step -> seconds
    notes: list = field(default_factory=list)  # lines for the terminal summary
    containers: list = field(default_factory=list)

    def run(self, *args: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=self.env,
                              **kwargs)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return proc

    def inspect(self, obj: str) -> dict:
        return json.loads(self.run("inspect", obj).stdout)[0]

    def start(self, *args: str, name_prefix: str = "che-test") -> str:
        """docker run -d; the container is removed when the test ends (tests/image/conftest.py)."""
        name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        self.run("run", "-d", "--name", name, "--label", "celery-health-exporter-test=1", *args)
        return name

    def logs(self, name: str) -> str:
        proc = self.run("logs", name, check=False)
        return (proc.stdout + proc.stderr)[-4000:]

    def remove_all(self, keep: int = 0):
        """Remove the containers started since the first ``keep`` ones."""
        if len(self.containers) > keep:
            self.run("rm", "-f", "-v", *self.containers[keep:], check=False)
            del self.containers[keep:]


def start_engine() -> Docker:
    """The engine, or a loud skip when none can start (the only reason to skip the image tests)."""
    try:
        proc = subprocess.run(["bash", str(START_DOCKER)], capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as exc:
        proc = subprocess.CompletedProcess([], 1, "", f"start-docker.sh did not finish: {exc}")
    found = re.search(r"^export DOCKER_HOST=(\S+)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        reason = f"no Docker engine can start here: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
        warnings.warn(reason + " -- the image is NOT tested", UserWarning, stacklevel=1)
        pytest.skip(reason)
    return Docker({**os.environ, "DOCKER_HOST": found.group(1), "DOCKER_BUILDKIT": "0"})


def build_image(docker: Docker, log_dir) -> str:
    """The stand-in base (skipped when it exists), then the image from the unmodified Dockerfile."""
    started = time.monotonic()
    base = subprocess.run(["bash", str(BUILD_BASE)], capture_output=True, text=True, timeout=900, env=docker.env)
    docker.timings["base image"] = time.monotonic() - started
    assert base.returncode == 0, f"build-base-image.sh failed:\n{base.stdout[-2000:]}\n{base.stderr[-3000:]}"

    started = time.monotonic()
    # The builder stage is tagged too: the legacy builder's cache is its intermediate images, and
    # an untagged builder stage would go with the prune below (every build would start over).
    for args in (["--target", "builder", "-t", BUILDER], ["-t", IMAGE]):
        build = docker.run("build", *args, str(ROOT), timeout=900, check=False)
        (log_dir / "docker-build.log").open("a").write(build.stdout + build.stderr)
        assert build.returncode == 0, f"docker build failed:\n{build.stdout[-4000:]}\n{build.stderr[-3000:]}"
    docker.timings["docker build"] = time.monotonic() - started
    # rebuilds leave the previous images untagged: drop those, not the cache of the current ones
    docker.run("image", "prune", "--force", check=False)
    return IMAGE


# The fixtures, imported by tests/image/conftest.py and by tests/deploy/test_compose.py. Each
# import registers them anew, so the engine and the build are kept here: one of each per session.
_session: dict = {}


@pytest.fixture(scope="session")
def docker() -> Docker:
    if "engine" not in _session:
        _session["engine"] = start_engine()
    engine = _session["engine"]
    yield engine
    engine.remove_all()


@pytest.fixture(scope="session")
def image(docker, tmp_path_factory) -> str:
    if "image" not in _session:
        started = time.monotonic()
        _session["image"] = build_image(docker, tmp_path_factory.mktemp("image-build"))
        docker.timings["base + build"] = time.monotonic() - started
    return _session["image"]


def report_lines() -> list[str]:
    """For the terminal summary: what the build and the image cost."""
    engine = _session.get("engine")
    if engine is None or not engine.timings:
        return []
    return ["image build: " + ", ".join(f"{k} {v:.1f}s" for k, v in engine.timings.items()), *engine.notes]
