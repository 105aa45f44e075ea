"""TLS and basic auth on a real exporter process (--web-config-file): wrong password 401,
right one 200, probes open, client certificates verified, a bad file exits 2 with its line."""
from __future__ import annotations

import base64
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from tests.harness import ROOT, Metrics, free_port, make_redis_broker, wait_for
from tests.certs import make_pki

pytestmark = pytest.mark.integration
PASSWORD = "s3cret-scrape-pw"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def redis_url():
    return make_redis_broker().url


def client_context(pki, cert: str | None = None, **versions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        ctx.load_cert_chain(str(pki[f"{cert}_crt"]), str(pki[f"{cert}_key"]))
    for attribute, value in versions.items():
        setattr(ctx, attribute, value)
    return ctx


def get(url: str, ctx: ssl.SSLContext | None, auth: tuple[str, str] | None = None) -> tuple[int, str, dict]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10, context=ctx) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def start(make_exporter, redis_url, tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    # no remote-control poller: it is not under test and its stop takes seconds
    return make_exporter(redis_url, "--web-config-file", str(path), "--inspect-interval", "0", wait=False)


def test_tls_with_basic_auth(make_exporter, redis_url, tmp_path, pki):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    exporter = start(make_exporter, redis_url, tmp_path, "web.yml", f"""
tls_server_config:
  cert_file: {pki["server_crt"]}
  key_file: {pki["server_key"]}
basic_auth_users:
  prometheus: {hashed}
http_server_config:
  headers:
    X-Content-Type-Options: nosniff
""")
    base = f"https://127.0.0.1:{exporter.port}"
    ctx = client_context(pki)
    wait_for(lambda: exporter.alive() and get(base + "/readyz", ctx)[0] == 200, 20, message="ready over TLS")

    status, body, headers = get(base + "/metrics", ctx)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ") and headers["X-Content-Type-Options"] \
        == "nosniff"
    assert "celery_" not in body

    def timed(auth):
        started = time.perf_counter()
        status = get(base + "/metrics", ctx, auth)[0]
        return status, time.perf_counter() - started

    wrong, wrong_took = timed(("prometheus", "guess"))
    unknown, unknown_took = timed(("admin", PASSWORD))
    assert (wrong, unknown) == (401, 401)
    # both paid a bcrypt of cost 10 (the unknown user against a dummy hash): no user-name oracle
    reference = min(timeit_checkpw(hashed) for _ in range(3))
    assert wrong_took > 0.6 * reference and unknown_took > 0.6 * reference, (wrong_took, unknown_took, reference)

    status, body, _ = get(base + "/metrics", ctx, ("prometheus", PASSWORD))
    assert status == 200
    assert Metrics(body).value("celery_exporter_source_up", source="events") == 1
    status, body, _ = get(base + "/", ctx, ("prometheus", PASSWORD))
    assert status == 200 and "celery-health-exporter" in body
    assert get(base + "/", ctx)[0] == 401
    # probes stay open; TLS still applies to them
    assert get(base + "/healthz", ctx)[:2] == (200, "ok\n")
    assert get(base + "/readyz", ctx)[0] == 200
    # plain HTTP on the TLS port gets no page, and neither does a client that does not trust the CA
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/healthz", timeout=5).read()
    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen(base + "/healthz", timeout=5, context=ssl.create_default_context()).read()
    assert isinstance(err.value.reason, ssl.SSLCertVerificationError)
    # TLS 1.2 is the default floor: a TLS 1.1-only client does not get in
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(base + "/healthz", client_context(pki, maximum_version=ssl.TLSVersion.TLSv1_1))
    assert PASSWORD not in exporter.log() and hashed not in exporter.log()


def timeit_checkpw(hashed: str) -> float:
    started = time.perf_counter()
    bcrypt.checkpw(b"guess", hashed.encode())
    return time.perf_counter() - started


def test_client_certificates_and_protected_probes(make_exporter, redis_url, tmp_path, pki):
    exporter = start(make_exporter, redis_url, tmp_path, "mtls.yml", f"""
tls_server_config:
  cert_file: {pki["server_crt"]}
  key_file: {pki["server_key"]}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki["ca"]}
  client_allowed_sans: [scraper.test]
  min_version: TLS13
""")
    base = f"https://127.0.0.1:{exporter.port}"
    good = client_context(pki, "client")
    wait_for(lambda: exporter.alive() and get(base + "/readyz", good)[0] == 200, 20, message="ready over mTLS")

    status, body, _ = get(base + "/metrics", good)
    assert status == 200 and Metrics(body).value("celery_exporter_source_up", source="events") == 1
    # a certificate from our CA whose SAN is not allowed: the handshake works, the request does not
    assert get(base + "/metrics", client_context(pki, "other_client"))[0] == 403
    # no certificate, or one from a CA we do not trust: no TLS session at all
    for ctx in (client_context(pki), client_context(pki, "rogue_client")):
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            get(base + "/healthz", ctx)
    # min_version TLS13: a TLS 1.2 client is refused
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(base + "/healthz", client_context(pki, "client", maximum_version=ssl.TLSVersion.TLSv1_2))
    assert exporter.alive()


def test_protect_health_endpoints_puts_the_probes_behind_basic_auth(make_exporter, redis_url, tmp_path):
    hashed = bcrypt.hashpw(b"probe-pw", bcrypt.gensalt(rounds=4)).decode()
    exporter = start(make_exporter, redis_url, tmp_path, "probes.yml",
                     f"basic_auth_users:\n  kubelet: {hashed}\nprotect_health_endpoints: true\n")
    base = f"http://127.0.0.1:{exporter.port}"
    wait_for(lambda: exporter.alive() and get(base + "/readyz", None, ("kubelet", "probe-pw"))[0] == 200, 20,
             message="ready")
    assert [get(base + path, None)[0] for path in ("/healthz", "/readyz", "/metrics", "/")] == [401] * 4
    assert get(base + "/healthz", None, ("kubelet", "probe-pw"))[:2] == (200, "ok\n")


@pytest.mark.parametrize("text, line, fragment", [
    ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /nonexistent.key\n", 2, "does not exist"),
    ("basic_auth_users:\n  prometheus: plaintext-password\n", 2, "must be a bcrypt hash"),
    ("basic_auth_users:\n  a: b\n c: d\n", 3, "not valid YAML"),
    ("tls_server_config: {}\nbasic_auth: {}\n", 2, "unknown key 'basic_auth'"),
])
def test_a_malformed_web_config_exits_2_with_the_line(tmp_path, text, line, fragment):
    path = tmp_path / "web.yml"
    path.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "celery_health_exporter", "--broker-url", "redis://127.0.0.1:6379/0",
                           "--listen-address", f"127.0.0.1:{free_port()}", "--web-config-file", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"--web-config-file: {path}, line {line}: " in proc.stderr and fragment in proc.stderr
    assert "plaintext-password" not in proc.stderr  # a password put where its hash belongs is not echoed
