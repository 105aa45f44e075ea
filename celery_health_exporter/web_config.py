"""Endpoint security from ``--web-config-file``: TLS and basic auth, in the file format
Prometheus exporters share (exporter-toolkit's ``--web.config.file``).

    tls_server_config:
      cert_file: server.crt          # or cert: <PEM>; paths are relative to this file
      key_file: server.key           # or key: <PEM>
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
      client_ca_file: clients-ca.crt # or client_ca: <PEM>
      client_allowed_sans: [scraper.example.org]     # a client certificate must carry one of these SANs
      min_version: TLS12             # TLS10 .. TLS13; max_version too
      cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]   # Go names, TLS <= 1.2
      curve_preferences: [X25519]    # one curve (Python's ssl module sets a single group)
    http_server_config:
      headers: {X-Frame-Options: deny}   # the five security headers exporter-toolkit allows
    basic_auth_users:
      alice: $2y$10$...              # bcrypt hash, e.g. `htpasswd -nBC 10 "" | tr -d ':\\n'`
    rate_limit: {interval: 1s, burst: 20}
    protect_health_endpoints: false  # ours: true puts /healthz and /readyz behind basic auth too

TLS covers the whole port. Basic auth and the rate limit cover ``/metrics``, ``/``
and every other path except ``/healthz`` and ``/readyz`` (probes), unless
``protect_health_endpoints`` is true. Everything is read and checked once at
startup (files, hashes, the certificate and key pair): an error is one line
naming the flag and the line of the file at fault, and exit code 2.

Not supported, and refused rather than silently ignored: ``client_auth_type``
``RequestClientCert`` and ``RequireAnyClientCert`` (Python's ``ssl`` module can
only ask for a client certificate it also verifies), several
``curve_preferences``, and keys this file format does not have.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import ssl
import tempfile
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import bcrypt
import yaml

from .config import ConfigError

FLAG = "--web-config-file"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/health"})  # /health: prometheus-exporter-celery's probe
REALM = "celery-health-exporter"

TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1, "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH = {"": ssl.CERT_NONE, "NoClientCert": ssl.CERT_NONE,
               "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL, "RequireAndVerifyClientCert": ssl.CERT_REQUIRED}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")
# Go's crypto/tls names (tls.CipherSuites()) -> OpenSSL's. TLS 1.3 suites cannot be chosen
# in Go either; they are accepted and always on.
CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": None, "TLS_AES_256_GCM_SHA384": None, "TLS_CHACHA20_POLY1305_SHA256": None,
}
CURVES = {"CurveP256": "prime256v1", "CurveP384": "secp384r1", "CurveP521": "secp521r1", "X25519": "X25519"}
# exporter-toolkit allows exactly these response headers (and checks two of their values).
HEADERS = {
    "content-security-policy": ("Content-Security-Policy", None),
    "x-frame-options": ("X-Frame-Options", ("deny", "sameorigin")),
    "x-content-type-options": ("X-Content-Type-Options", ("nosniff",)),
    "x-xss-protection": ("X-XSS-Protection", None),
    "strict-transport-security": ("Strict-Transport-Security", None),
}
_BCRYPT_HASH = re.compile(r"\$2[abxy]?\$(\d\d)\$[./A-Za-z0-9]{53}")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class WebConfig:
    path: str
    ssl_context: ssl.SSLContext | None = None
    users: dict = field(default_factory=dict)  # user -> bcrypt hash (bytes)
    headers: dict = field(default_factory=dict)
    client_allowed_sans: tuple = ()
    rate_limit: tuple | None = None  # (seconds per request, burst)
    protect_health_endpoints: bool = False

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    def describe(self) -> str:
        parts = ["TLS" if self.tls else "plain HTTP"]
        if self.ssl_context is not None and self.ssl_context.verify_mode != ssl.CERT_NONE:
            parts.append("client certificates")
        if self.users:
            parts.append(f"basic auth ({len(self.users)} users)")
        return ", ".join(parts)


# ------------------------------------------------------------------ parsing

class _Fault(Exception):
    """A problem at a node of the file; becomes a ConfigError naming the line."""

    def __init__(self, node, message: str):
        super().__init__(message)
        self.line = node.start_mark.line + 1 if node is not None else 1
        self.message = message


def _scalar(node, what: str, kinds=("str",)):
    """The value of a scalar node of one of ``kinds`` (str, bool, int); None for null."""
    if node is None or node.tag == "tag:yaml.org,2002:null":
        return None
    if not isinstance(node, yaml.ScalarNode):
        shape = "list" if isinstance(node, yaml.SequenceNode) else "mapping"
        raise _Fault(node, f"{what} must be a {' or '.join(kinds)}, not a {shape}")
    tag = node.tag.rsplit(":", 1)[-1]
    if tag in kinds and tag in ("str", "bool", "int"):
        try:
            return yaml.SafeLoader("").construct_object(node)
        except (yaml.YAMLError, ValueError):
            raise _Fault(node, f"{what}: cannot read {node.value!r}") from None
    if "str" in kinds and tag in ("int", "float", "bool"):
        return node.value  # Go's YAML reads an unquoted 10 into a string field as "10" too
    raise _Fault(node, f"{what} must be a {' or '.join(kinds)}, got {node.value!r}")


def _mapping(node, what: str, allowed: frozenset | None = None) -> dict:
    """A YAML mapping as {key: (key node, value node)}; duplicate and unknown keys are errors."""
    if node is None or node.tag == "tag:yaml.org,2002:null":
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise _Fault(node, f"{what} must be a mapping")
    out = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _Fault(key_node, f"a key of {what} must be a plain string")
        key = key_node.value
        if key in out:
            raise _Fault(key_node, f"duplicate key {key!r} in {what}")
        if allowed is not None and key not in allowed:
            raise _Fault(key_node, f"unknown key {key!r} in {what} (expected one of {', '.join(sorted(allowed))})")
        out[key] = (key_node, value_node)
    return out


def _string_list(node, what: str) -> list[tuple]:
    if node is None or node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        raise _Fault(node, f"{what} must be a list")
    return [(item, _scalar(item, f"an item of {what}")) for item in node.value]


TOP_KEYS = frozenset({"tls_server_config", "http_server_config", "basic_auth_users", "rate_limit",
                      "protect_health_endpoints"})
TLS_KEYS = frozenset({"cert", "key", "client_ca", "cert_file", "key_file", "client_auth_type", "client_ca_file",
                      "client_allowed_sans", "min_version", "max_version", "cipher_suites",
                      "prefer_server_cipher_suites", "curve_preferences"})


def load_web_config(path: str) -> WebConfig:
    """Read and check the whole file now; any problem is a ConfigError naming the line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(FLAG, f"cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(FLAG, f"{path}, line {line}: not valid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(FLAG, f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    try:
        return _build(path, root)
    except _Fault as fault:
        raise ConfigError(FLAG, f"{path}, line {fault.line}: {fault.message}".replace("\n", " ")) from None


def _build(path: str, root) -> WebConfig:
    base = os.path.dirname(os.path.abspath(path))
    top = _mapping(root, "the web config", TOP_KEYS)
    ssl_context, sans = None, ()
    if "tls_server_config" in top:
        ssl_context, sans = _tls(base, *top["tls_server_config"])
    headers = {}
    if "http_server_config" in top:
        headers = _http(*top["http_server_config"])
    users = {}
    if "basic_auth_users" in top:
        for user, (key_node, value_node) in _mapping(top["basic_auth_users"][1], "basic_auth_users").items():
            hashed = _scalar(value_node, f"the password hash of {user!r}")
            if not hashed or not _BCRYPT_HASH.fullmatch(hashed):
                raise _Fault(value_node if hashed else key_node,
                             f"the password of {user!r} must be a bcrypt hash ($2y$10$... , 60 characters)")
            users[user] = hashed.encode()
    rate = None
    if "rate_limit" in top:
        rate = _rate_limit(*top["rate_limit"])
    protect = False
    if "protect_health_endpoints" in top:
        protect = bool(_scalar(top["protect_health_endpoints"][1], "protect_health_endpoints", ("bool",)))
    return WebConfig(path=path, ssl_context=ssl_context, users=users, headers=headers, client_allowed_sans=sans,
                     rate_limit=rate, protect_health_endpoints=protect)


def _tls(base: str, key_node, node):
    tls = _mapping(node, "tls_server_config", TLS_KEYS)
    if not tls:
        return None, ()

    def value(key, kinds=("str",)):
        return _scalar(tls[key][1], key, kinds) if key in tls else None

    def line_of(key):
        return tls[key][0] if key in tls else key_node

    def file(key) -> str | None:
        name = value(key)
        if not name:
            return None
        full = os.path.join(base, name)
        if not os.path.isfile(full):
            raise _Fault(tls[key][1], f"{key} {full!r} does not exist or is not a file")
        if not os.access(full, os.R_OK):
            raise _Fault(tls[key][1], f"{key} {full!r} is not readable")
        return full

    for key in ("cert", "key", "client_ca"):
        if value(key) and value(f"{key}_file"):
            raise _Fault(tls[key][0], f"give {key} or {key}_file, not both")
    cert_file, key_file, ca_file = file("cert_file"), file("key_file"), file("client_ca_file")
    cert_text, key_text, ca_text = value("cert"), value("key"), value("client_ca")
    if not (cert_file or cert_text):
        raise _Fault(key_node, "tls_server_config needs cert_file (or cert)")
    if not (key_file or key_text):
        raise _Fault(key_node, "tls_server_config needs key_file (or key)")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = []
    for key, default in (("min_version", "TLS12"), ("max_version", "TLS13")):
        name = value(key) or default
        if name not in TLS_VERSIONS:
            raise _Fault(tls[key][1], f"{key} must be one of {', '.join(TLS_VERSIONS)}, got {name!r}")
        versions.append(TLS_VERSIONS[name])
    if versions[0] > versions[1]:
        raise _Fault(line_of("min_version"), "min_version is above max_version")
    try:
        context.minimum_version, context.maximum_version = versions
    except (ValueError, ssl.SSLError) as exc:
        raise _Fault(line_of("min_version"), f"this OpenSSL cannot use that TLS version: {exc}") from None

    try:
        _load_pair(context, cert_file, cert_text, key_file, key_text)
    except ssl.SSLError as exc:
        raise _Fault(line_of("cert_file" if cert_file else "cert"),
                     f"cannot use the certificate and key: {exc.reason or exc}") from None

    mode_name = value("client_auth_type") or ""
    if mode_name in UNVERIFIED_CLIENT_AUTH:
        raise _Fault(tls["client_auth_type"][1],
                     f"client_auth_type {mode_name} is not supported: Python's ssl module only asks for client "
                     "certificates it verifies; use RequireAndVerifyClientCert (or VerifyClientCertIfGiven)")
    if mode_name not in CLIENT_AUTH:
        raise _Fault(tls["client_auth_type"][1], f"unknown client_auth_type {mode_name!r} (expected one of "
                     f"{', '.join(k for k in CLIENT_AUTH if k)})")
    mode = CLIENT_AUTH[mode_name]
    if (ca_file or ca_text) and mode == ssl.CERT_NONE:
        raise _Fault(line_of("client_ca_file" if ca_file else "client_ca"),
                     "a client CA is configured without a client_auth_type that verifies client certificates")
    if mode != ssl.CERT_NONE:
        if not (ca_file or ca_text):
            raise _Fault(line_of("client_auth_type"), f"client_auth_type {mode_name} needs client_ca_file (or "
                         "client_ca): the CA that signs the client certificates")
        try:
            context.load_verify_locations(cafile=ca_file, cadata=ca_text or None)
        except (ssl.SSLError, ValueError) as exc:
            raise _Fault(line_of("client_ca_file" if ca_file else "client_ca"),
                         f"cannot load the client CA: {getattr(exc, 'reason', None) or exc}") from None
        context.verify_mode = mode

    sans = tuple(v for _, v in _string_list(tls["client_allowed_sans"][1], "client_allowed_sans")) \
        if "client_allowed_sans" in tls else ()
    if sans and mode != ssl.CERT_REQUIRED:
        raise _Fault(tls["client_allowed_sans"][0],
                     "client_allowed_sans needs client_auth_type RequireAndVerifyClientCert")

    if "cipher_suites" in tls:
        names = []
        for item, name in _string_list(tls["cipher_suites"][1], "cipher_suites"):
            if name not in CIPHERS:
                raise _Fault(item, f"unknown cipher suite {name!r} (Go names, e.g. "
                             "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)")
            if CIPHERS[name]:
                names.append(CIPHERS[name])
        if names:
            try:
                context.set_ciphers(":".join(names))
            except ssl.SSLError:
                raise _Fault(tls["cipher_suites"][0], "none of these cipher suites is available") from None
    if "curve_preferences" in tls:
        curves = _string_list(tls["curve_preferences"][1], "curve_preferences")
        for item, name in curves:
            if name not in CURVES:
                raise _Fault(item, f"unknown curve {name!r} (expected one of {', '.join(CURVES)})")
        if len(curves) > 1:
            raise _Fault(tls["curve_preferences"][0], "give one curve only: Python's ssl module sets a single one")
        if curves:
            context.set_ecdh_curve(CURVES[curves[0][1]])
    prefer_server = value("prefer_server_cipher_suites", ("bool",))
    if prefer_server is False:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    else:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context, sans


def _load_pair(context: ssl.SSLContext, cert_file, cert_text, key_file, key_text) -> None:
    """``load_cert_chain`` reads files only: inline PEM goes through a private temporary
    directory that is removed at once."""
    if cert_file and key_file:
        context.load_cert_chain(cert_file, key_file)
        return
    with tempfile.TemporaryDirectory(prefix="web-config-") as tmp:
        if cert_text:
            cert_file = os.path.join(tmp, "cert.pem")
            with open(os.open(cert_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(cert_text)
        if key_text:
            key_file = os.path.join(tmp, "key.pem")
            with open(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(key_text)
        context.load_cert_chain(cert_file, key_file)


def _http(key_node, node) -> dict:
    http = _mapping(node, "http_server_config", frozenset({"http2", "headers"}))
    if "http2" in http:
        _scalar(http["http2"][1], "http2", ("bool",))  # accepted; aiohttp serves HTTP/1.1
    headers = {}
    if "headers" in http:
        for name, (name_node, value_node) in _mapping(http["headers"][1], "headers").items():
            known = HEADERS.get(name.lower())
            if known is None:
                raise _Fault(name_node, f"header {name!r} cannot be set (allowed: "
                             f"{', '.join(h for h, _ in HEADERS.values())})")
            header, allowed = known
            text = _scalar(value_node, name) or ""
            if not text:
                continue
            if allowed is not None and text.lower() not in allowed:
                raise _Fault(value_node, f"{header} must be one of {', '.join(allowed)}, got {text!r}")
            headers[header] = text
    return headers


def _rate_limit(key_node, node) -> tuple | None:
    rate = _mapping(node, "rate_limit", frozenset({"interval", "burst"}))
    interval = 0.0
    if "interval" in rate:
        raw = _scalar(rate["interval"][1], "interval", ("str", "int"))
        interval = parse_duration(raw)
        if interval is None:
            raise _Fault(rate["interval"][1], f"interval must be a duration such as 1s or 250ms, got {raw!r}")
    burst = _scalar(rate["burst"][1], "burst", ("int",)) if "burst" in rate else 0
    if interval <= 0:
        return None
    if not burst or burst < 1:
        raise _Fault(rate["burst"][1] if "burst" in rate else key_node, "burst must be at least 1")
    return interval, burst


def parse_duration(raw) -> float | None:
    """A Go duration (``1m30s``, ``250ms``, ``0``) in seconds, or None."""
    if isinstance(raw, int):
        return 0.0 if raw == 0 else None
    raw = str(raw).strip()
    if raw == "0":
        return 0.0
    if not raw or _DURATION.sub("", raw):
        return None
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION.findall(raw))


# --------------------------------------------------------------- basic auth

class BasicAuth:
    """Checks ``Authorization: Basic`` against bcrypt hashes.

    * bcrypt.checkpw runs for every attempt that is not a cached success, also for
      user names that do not exist (against a dummy hash of the same cost), so the
      time of an answer tells nothing about which user names exist;
    * successful checks are cached, keyed by an HMAC (under a per-process random
      key) of user, password and hash, so that a scrape every 15 s stays cheap and
      the cache holds nothing a memory dump could brute-force faster than bcrypt;
    * bcrypt runs in two threads of its own, never in the event loop, and at most
      ``max_pending`` checks wait at a time (a flood gets 429 at once, probes and
      authenticated scrapes keep their latency).
    """

    cache_size = 256
    max_pending = 32

    def __init__(self, users: dict[str, bytes], checkpw: Callable[[bytes, bytes], bool] | None = None):
        self.users = dict(users)
        self._checkpw = checkpw or bcrypt.checkpw
        cost = max(int(_BCRYPT_HASH.fullmatch(h.decode()).group(1)) for h in self.users.values())
        self.dummy_hash = bcrypt.hashpw(secrets.token_urlsafe(16).encode(), bcrypt.gensalt(rounds=cost))
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0

    @staticmethod
    def parse_header(header: str | None) -> tuple[str, bytes] | None:
        """``Basic base64(user:password)`` -> (user, password bytes); None when malformed."""
        if not header:
            return None
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        user, sep, password = decoded.partition(b":")
        if not sep:
            return None
        try:
            return user.decode("utf-8"), password
        except UnicodeDecodeError:
            return None

    def _cached(self, user: str, password: bytes) -> tuple[bytes, bytes | None, bool]:
        hashed = self.users.get(user)
        key = hmac.new(self._cache_key, b"\0".join((user.encode(), password, hashed or b"")),
                       hashlib.sha256).digest()
        if hashed is not None and key in self._cache:
            self._cache.move_to_end(key)
            return key, hashed, True
        return key, hashed, False

    def _verify(self, hashed: bytes | None, password: bytes) -> bool:
        """The bcrypt comparison (blocking). Passwords past 72 bytes are cut as bcrypt
        (and exporter-toolkit) does."""
        try:
            ok = self._checkpw(password[:72], hashed or self.dummy_hash)
        except ValueError:  # a hash bcrypt cannot read (checked at startup): fail closed
            return False
        return ok and hashed is not None

    def _remember(self, key: bytes) -> None:
        self._cache[key] = None
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def check(self, user: str, password: bytes) -> bool:
        key, hashed, cached = self._cached(user, password)
        if cached:
            return True
        ok = self._verify(hashed, password)
        if ok:
            self._remember(key)
        return ok

    async def check_async(self, user: str, password: bytes) -> bool | None:
        """``check`` with bcrypt off the event loop; None when too many checks wait already.
        The cache is only touched here, in the loop's thread."""
        key, hashed, cached = self._cached(user, password)
        if cached:
            return True
        if self._pending >= self.max_pending:
            return None
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="basic-auth")
        self._pending += 1
        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._executor, self._verify, hashed, password)
        finally:
            self._pending -= 1
        if ok:
            self._remember(key)
        return ok


class RateLimiter:
    """A token bucket, as exporter-toolkit's ``rate_limit``: one request per ``interval``, bursts of ``burst``."""

    def __init__(self, interval: float, burst: int, clock=time.monotonic):
        self.interval, self.burst, self.clock = interval, burst, clock
        self.tokens = float(burst)
        self.updated = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) / self.interval)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def _san_values(peercert: dict | None) -> set[str]:
    """DNS, IP, e-mail and URI SANs of a verified client certificate (as exporter-toolkit matches them)."""
    return {_normalise_san(value) for kind, value in (peercert or {}).get("subjectAltName", ())
            if kind in ("DNS", "IP Address", "email", "URI") and isinstance(value, str)}


def _normalise_san(value: str) -> str:
    value = value.strip()
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value


def middlewares(web_config: WebConfig | None) -> list:
    """The aiohttp middlewares for this config, in order: client SANs, headers, rate limit, basic auth."""
    from aiohttp import web

    if web_config is None:
        return []
    allowed_sans = {_normalise_san(s) for s in web_config.client_allowed_sans}
    extra_headers = dict(web_config.headers)
    auth = BasicAuth(web_config.users) if web_config.users else None
    limiter = RateLimiter(*web_config.rate_limit) if web_config.rate_limit else None
    protect_health = web_config.protect_health_endpoints

    def unauthorized() -> web.Response:
        return web.Response(status=401, text="Unauthorized\n",
                            headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'})

    @web.middleware
    async def security(request: web.Request, handler):
        if allowed_sans:
            peercert = request.transport.get_extra_info("peercert") if request.transport else None
            if not (_san_values(peercert) & allowed_sans):
                response = web.Response(status=403, text="client certificate has no allowed SAN\n")
                response.force_close()
                return _with_headers(response, extra_headers)
        guarded = protect_health or request.path not in OPEN_PATHS
        if guarded and limiter is not None and not limiter.allow():
            return _with_headers(web.Response(status=429, text="Too Many Requests\n"), extra_headers)
        if guarded and auth is not None:
            credentials = auth.parse_header(request.headers.get("Authorization"))
            if credentials is None:
                return _with_headers(unauthorized(), extra_headers)
            ok = await auth.check_async(*credentials)
            if ok is None:
                return _with_headers(web.Response(status=429, text="Too Many Requests\n"), extra_headers)
            if not ok:
                return _with_headers(unauthorized(), extra_headers)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(extra_headers)
            raise
        return _with_headers(response, extra_headers)

    return [security]


def _with_headers(response, headers: dict):
    response.headers.update(headers)
    return response
