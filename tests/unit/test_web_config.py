"""--web-config-file: the exporter-toolkit YAML read and checked at startup, the TLS
context built from it, and the basic-auth middleware (bcrypt, no user-name timing
leak, cached successes, open probes)."""
from __future__ import annotations

import asyncio
import base64
import ssl
import statistics
import time
from pathlib import Path

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from celery_health_exporter.config import ConfigError
from celery_health_exporter.web_config import BasicAuth, RateLimiter, load_web_config, middlewares, parse_duration
from tests.certs import make_pki

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


HASH_ALICE = bcrypt.hashpw(b"wonderland", bcrypt.gensalt(rounds=4)).decode()
HASH_BOB = bcrypt.hashpw(b"builder", bcrypt.gensalt(rounds=4)).decode()


def write(tmp_path: Path, text: str, name="web.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ------------------------------------------------------------------ parsing


def test_tls_and_users_with_paths_relative_to_the_file(tmp_path, pki):
    conf = tmp_path / "conf"
    conf.mkdir()
    for key in ("server_crt", "server_key"):
        (conf / pki[key].name).write_bytes(pki[key].read_bytes())
    path = write(conf, f"""
tls_server_config:
  cert_file: server.crt
  key_file: server.key
basic_auth_users:
  alice: {HASH_ALICE}
  "bob": '{HASH_BOB}'
""")
    wc = load_web_config(path)
    assert wc.tls and wc.ssl_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert wc.ssl_context.maximum_version == ssl.TLSVersion.TLSv1_3
    assert wc.ssl_context.verify_mode == ssl.CERT_NONE
    assert wc.users == {"alice": HASH_ALICE.encode(), "bob": HASH_BOB.encode()}
    assert not wc.protect_health_endpoints and wc.describe() == "TLS, basic auth (2 users)"


def test_client_certificates_inline_pem_and_options(tmp_path, pki):
    indent = lambda p: "\n".join("    " + line for line in p.read_text().splitlines())  # noqa: E731
    path = write(tmp_path, f"""
tls_server_config:
  cert: |
{indent(pki["server_crt"])}
  key: |
{indent(pki["server_key"])}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki["ca"]}
  client_allowed_sans: [scraper.test, 10.0.0.1]
  min_version: TLS13
  cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, TLS_AES_128_GCM_SHA256]
  curve_preferences: [X25519]
  prefer_server_cipher_suites: false
http_server_config:
  http2: false
  headers:
    x-frame-options: DENY
    Strict-Transport-Security: max-age=31536000
rate_limit: {{interval: 250ms, burst: 3}}
protect_health_endpoints: true
""")
    wc = load_web_config(path)
    ctx = wc.ssl_context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert not ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"} == {"ECDHE-ECDSA-AES128-GCM-SHA256"}
    assert wc.client_allowed_sans == ("scraper.test", "10.0.0.1")
    assert wc.headers == {"X-Frame-Options": "DENY", "Strict-Transport-Security": "max-age=31536000"}
    assert wc.rate_limit == (0.25, 3) and wc.protect_health_endpoints and not wc.users


def test_an_empty_file_enables_nothing(tmp_path):
    wc = load_web_config(write(tmp_path, "# nothing yet\n"))
    assert (wc.ssl_context, wc.users, wc.headers, wc.rate_limit) == (None, {}, {}, None)


@pytest.mark.parametrize("text, line, fragment", [
    ("basic_auth_users:\n  alice: x\n bob: y\n", 3, "not valid YAML"),
    ("tls_config:\n  cert_file: a\n", 1, "unknown key 'tls_config'"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_ca_fil: x\n", 4,
     "unknown key 'client_ca_fil' in tls_server_config"),
    ("tls_server_config:\n  cert_file: nope.crt\n  key_file: {key}\n", 2, "does not exist"),
    ("tls_server_config:\n  key_file: {key}\n", 1, "needs cert_file"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {ca}\n", 2, "cannot use the certificate and key"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: RequireAnyClientCert\n", 4,
     "not supported"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: Sometimes\n", 4,
     "unknown client_auth_type"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n\n  client_ca_file: {ca}\n", 5,
     "without a client_auth_type"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: RequireAndVerifyClientCert\n",
     4, "needs client_ca_file"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  client_auth_type: VerifyClientCertIfGiven\n"
     "  client_ca_file: {ca}\n  client_allowed_sans: [a]\n", 6, "needs client_auth_type RequireAndVerify"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  min_version: TLS14\n", 4, "min_version must be"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  min_version: TLS13\n  max_version: TLS12\n", 4,
     "above max_version"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  cipher_suites:\n    - TLS_RC4\n", 5,
     "unknown cipher suite"),
    ("tls_server_config:\n  cert_file: {crt}\n  key_file: {key}\n  curve_preferences: [X25519, CurveP256]\n", 4,
     "one curve only"),
    ("basic_auth_users:\n  alice: {alice}\n  bob: not-a-hash\n", 3, "must be a bcrypt hash"),
    ("basic_auth_users:\n  alice: {alice}\n  alice: {alice}\n", 3, "duplicate key 'alice'"),
    ("basic_auth_users:\n  - alice\n", 2, "must be a mapping"),
    ("http_server_config:\n  headers:\n    X-Powered-By: me\n", 3, "cannot be set"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n", 3, "must be one of deny, sameorigin"),
    ("protect_health_endpoints: maybe\n", 1, "must be a bool"),
    ("rate_limit:\n  interval: fast\n  burst: 1\n", 2, "must be a duration"),
    ("- just\n- a list\n", 1, "must be a mapping"),
])
def test_a_bad_file_names_the_flag_and_the_line(tmp_path, pki, text, line, fragment):
    path = write(tmp_path, text.format(crt=pki["server_crt"], key=pki["server_key"], ca=pki["ca"], alice=HASH_ALICE))
    with pytest.raises(ConfigError) as err:
        load_web_config(path)
    message = str(err.value)
    assert message.startswith(f"--web-config-file: {path}, line {line}: "), message
    assert fragment in message and "\n" not in message


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--web-config-file: cannot read .*missing.yml"):
        load_web_config(str(tmp_path / "missing.yml"))


@pytest.mark.parametrize("raw, seconds", [("1s", 1.0), ("250ms", 0.25), ("1m30s", 90.0), ("0", 0.0), (0, 0.0),
                                          ("1.5h", 5400.0), ("fast", None), ("1s2", None), ("", None)])
def test_go_durations(raw, seconds):
    assert parse_duration(raw) == seconds


# ------------------------------------------------------------------ basic auth


def counting_checkpw(calls):
    def checkpw(password, hashed):
        calls.append((password, hashed))
        return bcrypt.checkpw(password, hashed)
    return checkpw


def test_unknown_users_cost_one_bcrypt_against_a_dummy_hash_of_the_same_cost():
    calls = []
    auth = BasicAuth({"alice": HASH_ALICE.encode()}, checkpw=counting_checkpw(calls))
    assert auth.dummy_hash[:7] == HASH_ALICE.encode()[:7]  # "$2b$04$": same cost
    assert auth.check("mallory", b"wonderland") is False
    assert auth.check("alice", b"wrong") is False
    assert calls == [(b"wonderland", auth.dummy_hash), (b"wrong", HASH_ALICE.encode())]


def test_successes_are_cached_failures_never():
    calls = []
    auth = BasicAuth({"alice": HASH_ALICE.encode()}, checkpw=counting_checkpw(calls))
    assert [auth.check("alice", b"wonderland") for _ in range(3)] == [True, True, True]
    assert len(calls) == 1
    assert [auth.check("alice", b"nope") for _ in range(3)] == [False, False, False]
    assert len(calls) == 4
    assert all(key not in auth._cache for key in (b"nope", b"wonderland"))  # keys are HMACs, not passwords
    auth.cache_size = 2
    for i in range(5):
        auth._remember(bytes([i]))
    assert len(auth._cache) == 2


def test_no_user_name_timing_leak_with_real_bcrypt():
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=8))
    auth = BasicAuth({"alice": hashed})

    def timed(user):
        started = time.perf_counter()
        assert auth.check(user, b"wrong") is False
        return time.perf_counter() - started

    known = statistics.median(timed("alice") for _ in range(7))
    unknown = statistics.median(timed("nobody") for _ in range(7))
    assert 0.5 < unknown / known < 2.0, (known, unknown)


@pytest.mark.parametrize("header, parsed", [
    (None, None), ("", None), ("Bearer abc", None), ("Basic !!!", None),
    ("Basic " + base64.b64encode(b"no-colon").decode(), None),
    ("Basic " + base64.b64encode(b"\xff\xfe:pw").decode(), None),
    ("basic " + base64.b64encode(b"alice:pa:ss").decode(), ("alice", b"pa:ss")),
    ("Basic " + base64.b64encode("zoë:pässwörd".encode()).decode(), ("zoë", "pässwörd".encode())),
])
def test_authorization_header_parsing(header, parsed):
    assert BasicAuth.parse_header(header) == parsed


def test_passwords_past_72_bytes_compare_like_bcrypt_does():
    long_password = b"x" * 72
    auth = BasicAuth({"alice": bcrypt.hashpw(long_password, bcrypt.gensalt(rounds=4))})
    assert auth.check("alice", long_password + b"ignored by bcrypt") is True
    assert auth.check("alice", b"x" * 71) is False


def test_rate_limiter_is_a_token_bucket():
    now = [0.0]
    limiter = RateLimiter(1.0, 2, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert [limiter.allow(), limiter.allow()] == [True, False]


# ------------------------------------------------------------------ the middleware in a real aiohttp server


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def _serve(tmp_path, text, requests):
    wc = load_web_config(write(tmp_path, text))
    app = web.Application(middlewares=middlewares(wc))

    async def handler(request):
        return web.Response(text=f"{request.path} ok")

    for path in ("/metrics", "/healthz", "/readyz", "/"):
        app.router.add_get(path, handler)
    async with TestClient(TestServer(app)) as client:
        out = []
        for path, headers in requests:
            response = await client.get(path, headers=headers)
            out.append((response.status, await response.text(), dict(response.headers)))
        return out


def test_middleware_guards_metrics_and_index_but_not_the_probes(tmp_path):
    text = f"basic_auth_users:\n  alice: {HASH_ALICE}\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n"
    results = asyncio.run(_serve(tmp_path, text, [
        ("/metrics", {}), ("/metrics", basic("alice", "nope")), ("/metrics", basic("mallory", "wonderland")),
        ("/metrics", basic("alice", "wonderland")), ("/", {}), ("/", basic("alice", "wonderland")),
        ("/healthz", {}), ("/readyz", {}), ("/nowhere", {}), ("/nowhere", basic("alice", "wonderland")),
    ]))
    statuses = [status for status, _, _ in results]
    assert statuses == [401, 401, 401, 200, 401, 200, 200, 200, 401, 404]
    assert results[0][2]["WWW-Authenticate"].startswith('Basic realm="celery-health-exporter"')
    assert results[3][1] == "/metrics ok" and results[6][1] == "/healthz ok"
    assert all(headers.get("X-Frame-Options") == "deny" for _, _, headers in results)


def test_protect_health_endpoints_and_rate_limit(tmp_path):
    text = (f"basic_auth_users:\n  alice: {HASH_ALICE}\nprotect_health_endpoints: true\n"
            "rate_limit:\n  interval: 1m\n  burst: 4\n")
    results = asyncio.run(_serve(tmp_path, text, [
        ("/healthz", {}), ("/readyz", {}), ("/healthz", basic("alice", "wonderland")),
        ("/metrics", basic("alice", "wonderland")), ("/metrics", basic("alice", "wonderland")),
    ]))
    assert [status for status, _, _ in results] == [401, 401, 200, 200, 429]


def test_a_flood_of_checks_is_refused_not_queued():
    auth = BasicAuth({"alice": HASH_ALICE.encode()})
    auth.max_pending = 0
    assert asyncio.run(auth.check_async("alice", b"nope")) is None
    auth.max_pending = 1
    assert asyncio.run(auth.check_async("alice", b"wonderland")) is True
    auth.max_pending = 0  # a cached success needs no bcrypt, so no slot either
    assert asyncio.run(auth.check_async("alice", b"wonderland")) is True
