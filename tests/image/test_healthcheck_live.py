"""`celery-health-exporter healthcheck --pid N` against real exporter processes on the machine's Redis:
the listen address, TLS, protected probes, client certificates and an unready exporter, outside
Docker (tests/image/test_image.py runs the same check as the image's HEALTHCHECK)."""
from __future__ import annotations

import os
import subprocess
import sys

import bcrypt
import pytest

from tests.harness import ROOT, free_port, make_redis_broker, wait_for
from tests.certs import make_pki

pytestmark = pytest.mark.integration
PASSWORD = "hc-Pa55word"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def redis_url():
    broker = make_redis_broker()
    yield broker.url
    broker.close()


def healthcheck(pid: int, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celery_health_exporter", "healthcheck", "--pid", str(pid)],
                          capture_output=True, text=True, timeout=60, cwd=cwd, env={**os.environ, **(env or {})})


def healthy(pid: int, env: dict | None = None, cwd=ROOT) -> str | None:
    """The check's stdout when it passes; None (and wait_for polls again) while it fails."""
    proc = healthcheck(pid, env, cwd)
    assert proc.returncode in (0, 1), proc
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_follows_a_wildcard_listen_address_from_the_environment(make_exporter, redis_url, tmp_path):
    port = free_port()
    # The harness passes --listen-address 127.0.0.1:<its port>; this exporter listens where its
    # environment says instead: the flag is left out by starting it with the command directly.
    log = open(tmp_path / "exporter.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "celery_health_exporter", "--inspect-interval", "0"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "CELERY_BROKER_URL": redis_url,
                                 "CELERY_EXPORTER_LISTEN_ADDRESS": f"0.0.0.0:{port}"})
    try:
        out = wait_for(lambda: proc.poll() is None and healthy(proc.pid), 30, message="healthcheck passes")
        assert out == f"ready: http://127.0.0.1:{port}/readyz: ok", out
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        log.close()
    # and once the exporter is gone, the check fails with one line
    gone = healthcheck(proc.pid)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1, gone


def test_an_exporter_that_is_not_ready_is_unhealthy(make_exporter, tmp_path):
    closed = free_port()  # nothing listens there: the broker is unreachable, /readyz says 503
    exporter = make_exporter(f"redis://127.0.0.1:{closed}/0", "--inspect-interval", "0", wait=False)
    wait_for(lambda: exporter.alive() and exporter.get("/readyz")[0] == 503, 20, message="exporter up, not ready")
    proc = healthcheck(exporter.proc.pid)
    assert proc.returncode == 1, proc
    assert proc.stderr.startswith(f"unhealthy: http://127.0.0.1:{exporter.port}/readyz: 503 "), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


def test_tls_with_protected_probes_and_a_relative_web_config(make_exporter, redis_url, tmp_path, pki):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    workdir = tmp_path / "exporter-cwd"
    workdir.mkdir()
    (workdir / "web.yml").write_text(f"""
tls_server_config:
  cert_file: {pki["server_crt"]}
  key_file: {pki["server_key"]}
basic_auth_users:
  prometheus: {hashed}
protect_health_endpoints: true
""")
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "bad-pw").write_text("wrong\n")
    # relative to the exporter's working directory, not the healthcheck's
    exporter = make_exporter(redis_url, "--web-config-file", "web.yml", "--inspect-interval", "0", wait=False,
                             cwd=workdir)
    url = f"https://127.0.0.1:{exporter.port}/readyz"
    creds = {"CELERY_EXPORTER_HEALTHCHECK_USERNAME": "prometheus",
             "CELERY_EXPORTER_HEALTHCHECK_PASSWORD_FILE": str(tmp_path / "pw")}
    out = wait_for(lambda: exporter.alive() and healthy(exporter.proc.pid, creds), 30, message="healthy over TLS")
    assert out == f"ready: {url}: ok"

    without = healthcheck(exporter.proc.pid)
    assert without.returncode == 1
    assert "needs basic auth (protect_health_endpoints: true)" in without.stderr, without.stderr
    wrong = healthcheck(exporter.proc.pid, {**creds, "CELERY_EXPORTER_HEALTHCHECK_PASSWORD_FILE": str(tmp_path / "bad-pw")})
    assert wrong.returncode == 1 and f"{url}: 401 Unauthorized" in wrong.stderr, wrong.stderr


def test_required_client_certificates(make_exporter, redis_url, tmp_path, pki):
    web = tmp_path / "web.yml"
    web.write_text(f"""
tls_server_config:
  cert_file: {pki["server_crt"]}
  key_file: {pki["server_key"]}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki["ca"]}
""")
    exporter = make_exporter(redis_url, "--web-config-file", str(web), "--inspect-interval", "0", wait=False)
    client = {"CELERY_EXPORTER_HEALTHCHECK_CERT_FILE": str(pki["client_crt"]),
              "CELERY_EXPORTER_HEALTHCHECK_KEY_FILE": str(pki["client_key"])}
    out = wait_for(lambda: exporter.alive() and healthy(exporter.proc.pid, client), 30, message="healthy with mTLS")
    assert out == f"ready: https://127.0.0.1:{exporter.port}/readyz: ok"
    without = healthcheck(exporter.proc.pid)
    assert without.returncode == 1 and "requires client certificates" in without.stderr, without.stderr
    # a certificate from another CA: refused (in or after the TLS 1.3 handshake), and the line says so
    rogue = healthcheck(exporter.proc.pid, {"CELERY_EXPORTER_HEALTHCHECK_CERT_FILE": str(pki["rogue_client_crt"]),
                                            "CELERY_EXPORTER_HEALTHCHECK_KEY_FILE": str(pki["rogue_client_key"])})
    assert rogue.returncode == 1, rogue
    assert ("did not accept the client certificate" in rogue.stderr or "TLS handshake failed" in rogue.stderr), \
        rogue.stderr
