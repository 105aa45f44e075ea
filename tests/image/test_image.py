"""The Docker image, built from the unmodified Dockerfile and run for real on this machine's brokers.

With --network host the containers reach RabbitMQ and Redis on 127.0.0.1 and we reach them. Each run
uses a listen port other than the default 9808, one uses --web-config-file TLS: the image's own
HEALTHCHECK must follow both and turn Docker's health status to `healthy`, and to `unhealthy`
when the exporter is not ready. The first test builds the stand-in base and the image (cold:
minutes, hence the timeout); the others reuse them.
"""
from __future__ import annotations

import base64
import http.client
import ssl
import urllib.error
import urllib.request

import bcrypt
import pytest

from tests.harness import ROOT, Metrics, free_port, make_amqp_broker, make_redis_broker, wait_for
from tests.certs import make_pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
UID = 10001
# Docker's own health checks, quicker than the image's production values (see the Dockerfile)
FAST_HEALTH = ["--health-interval", "1s", "--health-timeout", "10s", "--health-retries", "2",
               "--health-start-period", "60s"]
PASSWORD = "image-scrape-pw"


def get(url: str, context: ssl.SSLContext | None = None, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(params=["amqp", "redis"])
def broker(request):
    made = make_amqp_broker() if request.param == "amqp" else make_redis_broker()
    yield made
    made.close()


def wait_on(docker, name: str, predicate, message: str, timeout: float = 120):
    """wait_for, failing at once if the container stops, and with its health log and output."""
    stopped = object()

    def check():
        if not docker.inspect(name)["State"]["Running"]:
            return stopped
        return predicate()

    try:
        result = wait_for(check, timeout, message=f"{name}: {message}")
        if result is stopped:
            raise AssertionError(f"{name} stopped while waiting for {message}")
        return result
    except AssertionError as exc:
        state = docker.inspect(name)["State"]
        checks = "\n".join(f"  {e['ExitCode']}: {e['Output'].strip()}" for e in (state.get("Health") or {}).get("Log", []))
        raise AssertionError(f"{exc} (status {state['Status']}, exit code {state['ExitCode']})\n"
                             f"health checks:\n{checks}\nlogs:\n{docker.logs(name)}") from None


def wait_healthy(docker, name: str, base: str, context=None, auth=None) -> dict:
    """/readyz 200, celery_broker_up 1, then Docker's health status `healthy`; returns the health."""
    wait_on(docker, name, lambda: get(base + "/readyz", context)[0] == 200, "/readyz 200")

    def broker_up():
        status, body = get(base + "/metrics", context, auth)
        assert status == 200, (status, body[:200])
        return Metrics(body).sum("celery_broker_up") == 1 and Metrics(body).find("celery_broker_up")

    wait_on(docker, name, broker_up, "celery_broker_up 1")
    return wait_on(docker, name, lambda: (h := docker.inspect(name)["State"].get("Health") or {}).get("Status") == "healthy" and h,
                   "docker health `healthy`")


def test_runs_on_a_non_default_port_and_docker_sees_it_healthy(docker, image, broker):
    port = free_port()
    assert port != 9808
    name = docker.start("--network", "host", *FAST_HEALTH, image,
                        "--broker-url", broker.url, "--listen-address", f"0.0.0.0:{port}")
    health = wait_healthy(docker, name, f"http://127.0.0.1:{port}")
    # the image's HEALTHCHECK asked the port the exporter listens on, and its readiness
    outputs = [entry["Output"] for entry in health["Log"]]
    assert f"ready: http://127.0.0.1:{port}/readyz: ok\n" in outputs, outputs


def test_tls_web_config_mounted_read_only(docker, image, tmp_path):
    pki = make_pki(tmp_path / "pki")
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    (tmp_path / "pki" / "web.yml").write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: {hashed}\n")
    # readable by the image's user (uid 10001), not writable by it
    (tmp_path / "pki").chmod(0o755)
    for path in (tmp_path / "pki").iterdir():
        path.chmod(0o644)
    broker = make_redis_broker()
    port = free_port()
    try:
        name = docker.start("--network", "host", *FAST_HEALTH, "-v", f"{tmp_path / 'pki'}:/etc/exporter:ro",
                            "-e", f"CELERY_BROKER_URL={broker.url}",
                            "-e", f"CELERY_EXPORTER_LISTEN_ADDRESS=0.0.0.0:{port}",
                            image, "--web-config-file", "/etc/exporter/web.yml")
        context = ssl.create_default_context(cafile=str(pki["ca"]))  # the server certificate, verified
        auth = "Basic " + base64.b64encode(f"prometheus:{PASSWORD}".encode()).decode()
        health = wait_healthy(docker, name, f"https://127.0.0.1:{port}", context, auth)
        outputs = [entry["Output"] for entry in health["Log"]]
        assert f"ready: https://127.0.0.1:{port}/readyz: ok\n" in outputs, outputs
        assert get(f"https://127.0.0.1:{port}/metrics", context)[0] == 401  # basic auth is on
        with pytest.raises((OSError, http.client.HTTPException)):  # TLS only: plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).read()
    finally:
        broker.close()


def test_an_exporter_that_is_not_ready_turns_unhealthy(docker, image):
    closed = free_port()  # no broker there: the exporter serves, /readyz answers 503
    port = free_port()
    name = docker.start("--network", "host", "--health-interval", "1s", "--health-timeout", "10s",
                        "--health-retries", "2", "--health-start-period", "1s", image,
                        "--broker-url", f"redis://127.0.0.1:{closed}/0", "--listen-address", f"127.0.0.1:{port}")
    wait_on(docker, name, lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 503, "/readyz 503")
    health = wait_on(docker, name, lambda: (h := docker.inspect(name)["State"].get("Health") or {}).get("Status") == "unhealthy" and h,
                     "docker health `unhealthy`")
    last = health["Log"][-1]
    assert last["ExitCode"] == 1 and f"http://127.0.0.1:{port}/readyz: 503" in last["Output"], last


def test_runs_as_a_numeric_non_root_user_and_stays_small(docker, image):
    config = docker.inspect(image)["Config"]
    assert config["User"] == f"{UID}:{UID}", config["User"]
    assert config["Entrypoint"] == ["celery-health-exporter"] and not config["Cmd"]
    assert config["Healthcheck"]["Test"] == ["CMD", "celery-health-exporter", "healthcheck"]
    ids = docker.run("run", "--rm", "--entrypoint", "id", image).stdout.split()
    assert ids[:2] == [f"uid={UID}(exporter)", f"gid={UID}(exporter)"], ids
    # no pip, setuptools or wheel left in the image (the base's nor the venv's)
    left = docker.run("run", "--rm", "--entrypoint", "python", image, "-c",
                      "import importlib.util as u; print([m for m in ('pip', 'setuptools', 'wheel') "
                      "if u.find_spec(m)])").stdout.strip()
    assert left == "[]", left

    size = docker.inspect(image)["Size"]
    base = next(line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines()
                if line.startswith("FROM ") and " AS " not in line)
    base_size = docker.inspect(base)["Size"]
    added = size - base_size
    line = (f"image {image}: {size / 1e6:.0f} MB ({added / 1e6:.0f} MB on top of the base {base}, "
            f"{base_size / 1e6:.0f} MB: the stand-in, larger than the official slim image)")
    docker.notes.append(line)
    # the venv with the exporter and its dependencies; no compilers, no caches
    assert added < 100e6, line
    assert size < 450e6, line
