"""One validated configuration for the whole exporter.

Every flag can also come from an environment variable ``CELERY_EXPORTER_<FLAG>``;
the broker URL also from ``CELERY_BROKER_URL``. Validation happens here, before
anything connects or listens, so that bad input ends with one line and exit 2.
"""
from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit


SUPPORTED_SCHEMES = {
    "amqp": "amqp", "amqps": "amqp", "pyamqp": "amqp",
    "redis": "redis", "rediss": "redis", "sentinel": "redis",
}
DEFAULT_RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
DEFAULT_QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 10800)


class ConfigError(ValueError):
    """Bad input: carries the flag at fault so the message can name it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class Config:
    broker_url: str
    broker_transport_options: dict = field(default_factory=dict)
    broker_ssl_options: dict = field(default_factory=dict)
    listen_host: str = "0.0.0.0"
    listen_port: int = 9808
    metric_prefix: str = "celery_"
    static_labels: dict = field(default_factory=dict)
    worker_timeout: float = 15.0
    purge_offline_after: float = 600.0
    runtime_buckets: tuple = DEFAULT_RUNTIME_BUCKETS
    queue_wait_buckets: tuple = DEFAULT_QUEUE_WAIT_BUCKETS
    task_histograms_by_worker: bool = False
    max_tracked_tasks: int = 100_000
    enable_events: bool = False
    enable_events_interval: float = 60.0
    event_queue_ttl: float = 120.0
    event_queue_expires: float = 300.0
    event_queue_max_length: int = 1_000_000
    event_backlog_max_bytes: int = 512 << 20
    shard_task_events: str = ""  # RabbitMQ: shared task-event queue of sharded replicas
    no_task_events_hint_after: float = 60.0
    log_level: str = "INFO"
    log_format: str = "text"
    # events on/off: off gives the host-only mode (a DaemonSet beside workers)
    events: bool = True
    # remote control poller (inspect): 0 disables it
    inspect_interval: float = 30.0
    inspect_timeout: float = 1.0
    stall_after: float = 300.0
    revoked_interval: float = 0.0
    lost_task_grace: float = 30.0
    task_sent_grace: float = 10.0
    # beat hook: a silent beat is down after beat_timeout; a due time unsent beat_missed_grace later is missed
    beat_timeout: float = 30.0
    beat_missed_grace: float = 60.0
    # broker pollers
    broker_poll_interval: float = 15.0
    broker_poll: bool = True
    rabbitmq_management_url: str = ""
    rabbitmq_management_ca_file: str = ""
    queue_include: str = ""
    queue_exclude: str = ""
    queues: tuple = ()
    # host agent
    host_metrics: bool = False
    host_scan_interval: float = 5.0
    host_worker_pattern: str = ""
    # endpoint security (--web-config-file): a web_config.WebConfig, read and checked at startup
    web_config_file: str = ""
    web_config: object = None
    # cardinality caps: past these, new values of the label are folded into "other"
    max_task_names: int = 1000
    max_workers: int = 1000
    max_queues: int = 1000
    max_exceptions: int = 200
    max_publishers: int = 1000
    # prometheus-exporter-celery's labelling choices (--generic-hostname-*, --default-queue-name)
    task_sent_hostname: bool = True
    generic_worker_task_hostname: bool = False
    default_queue_name: str = "unknown"
    # Flower's metric families beside ours (--flower-metrics), for Flower's dashboard and alerts
    flower_metrics: bool = False

    @property
    def broker_kind(self) -> str:
        """'amqp' or 'redis': the family of the broker, whatever the URL's spelling."""
        return SUPPORTED_SCHEMES[urlsplit(self.broker_url.split(";")[0]).scheme]

    @property
    def masked_broker_url(self) -> str:
        return mask_url(self.broker_url)

    def secrets(self) -> list[str]:
        """Strings that must never leave the process (passwords in the broker's and the
        management API's URLs, the Sentinels' password, a client key's passphrase)."""
        found = []
        for part in (*self.broker_url.split(";"), self.rabbitmq_management_url):
            try:
                password = urlsplit(part).password
            except ValueError:
                password = None
            if password:
                found.extend({password, unquote(password)})
        for options, key in ((self.broker_transport_options.get("sentinel_kwargs"), "password"),
                             (self.broker_ssl_options, "password"), (self.broker_ssl_options, "ssl_password")):
            if isinstance(options, dict) and isinstance(options.get(key), str) and options[key]:
                found.append(options[key])
        return found


_URL_PASSWORD = re.compile(r"(://[^:/@;]*:)[^@;]*@")


def mask_url(url: str) -> str:
    """``amqp://user:secret@host`` -> ``amqp://user:***@host``, for each failover URL.
    A regex, not a URL parser: it must work on the malformed URLs we report as errors."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def validate_broker_url(url: str, flag: str = "--broker-url") -> str:
    if not url:
        raise ConfigError(flag, "no broker URL given (set --broker-url or CELERY_BROKER_URL)")
    for part in url.split(";"):
        try:
            parts = urlsplit(part)
            parts.port  # noqa: B018 - raises ValueError for a non-numeric port
        except ValueError as exc:
            raise ConfigError(flag, f"malformed URL {mask_url(part)!r}: {exc}") from None
        if parts.scheme not in SUPPORTED_SCHEMES:
            raise ConfigError(
                flag,
                f"unsupported transport {parts.scheme or '(none)'!r} in {mask_url(part)!r}; "
                f"expected one of {', '.join(sorted(SUPPORTED_SCHEMES))}",
            )
        if not parts.hostname and parts.scheme != "sentinel":
            raise ConfigError(flag, f"no host in {mask_url(part)!r}")
        if SUPPORTED_SCHEMES[parts.scheme] == "redis" and parts.scheme != "sentinel":
            db = parts.path.strip("/")
            if db and not db.isdigit():
                raise ConfigError(flag, f"Redis database must be a number, got {db!r} in {mask_url(part)!r}")
        query = parse_qs(parts.query)
        if SUPPORTED_SCHEMES[parts.scheme] == "amqp" and any(key.startswith("ssl") for key in query):
            # kombu hands them to py-amqp as ssl_ca_certs=..., which py-amqp does not take
            # (every connection would fail with a TypeError): say where they go instead.
            raise ConfigError(flag, f"TLS settings in the query of {mask_url(part)!r} are not read by py-amqp; "
                              "give them as --broker-ssl-option ca_certs=... certfile=... keyfile=... "
                              "cert_reqs=CERT_REQUIRED")
        for key, values in query.items():  # rediss://...?ssl_ca_certs=/ca.pem
            if key in TLS_FILE_KEYS:
                for value in values:
                    _readable_tls_file(value, key, flag)
    return url


# TLS options that name files: kombu's amqp ones and redis-py's (URL query or --broker-ssl-option).
TLS_FILE_KEYS = ("ca_certs", "certfile", "keyfile", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile")


def _readable_tls_file(path, key: str, flag: str) -> None:
    """A certificate or key file that cannot be read would fail every connection
    attempt with an error that does not name it (redis-py says "Error 2 connecting
    to host:port. No such file or directory."): bad input, said at start. Only the
    path is ever shown, never what the file holds."""
    try:
        with open(str(path), "rb"):
            pass
    except OSError as exc:
        raise ConfigError(flag, f"{key}={path}: cannot read it: {exc.strerror or exc}") from None


def validate_readable_file(path: str, flag: str) -> str:
    """An optional file flag (empty: not given) that must be readable now."""
    if path:
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(flag, f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def validate_ssl_options(options: dict, flag: str = "--broker-ssl-option") -> dict:
    for key in TLS_FILE_KEYS:
        if key in options:
            _readable_tls_file(options[key], key, flag)
    return options


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def parse_key_values(items: list[str], flag: str, *, json_values: bool) -> dict:
    """KEY=VALUE items into a dict; values parsed as JSON where they parse (if asked)."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            raise ConfigError(flag, f"expected KEY=VALUE, got {item!r}")
        if json_values:
            try:
                value = json.loads(value)
            except ValueError:
                pass
        result[key] = value
    return result


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def parse_static_labels(items: list[str]) -> dict:
    labels = parse_key_values(items, "--static-label", json_values=False)
    from .metrics.definitions import all_definitions  # here: the metric modules import this one's users

    # A static label that a metric also has would appear twice in its series, and
    # Prometheus rejects the whole scrape for that.
    taken = {"le", "quantile"} | {name for d in all_definitions() for name in d.labels}
    for key in labels:
        if not _LABEL_NAME.match(key) or key.startswith("__"):
            raise ConfigError("--static-label", f"{key!r} is not a valid Prometheus label name")
        if key in taken:
            raise ConfigError("--static-label", f"{key!r} is a label of the exporter's own metrics")
    return labels


def split_env_list(value: str) -> list[str]:
    """An env var for a repeatable KEY=VALUE flag: items separated by commas
    (a comma only splits where the next item starts with ``KEY=``, so JSON values keep theirs)."""
    if not value.strip():
        return []
    return [p.strip() for p in re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_.\-]*=)", value)]


def parse_buckets(text: str, flag: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(flag, f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ConfigError(flag, "needs at least one bucket")
    if any(later <= earlier for earlier, later in zip(values, values[1:])):
        raise ConfigError(flag, f"buckets must be strictly increasing, got {text!r}")
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise ConfigError(flag, "buckets must be finite (+Inf is added automatically)")
    return values


def parse_listen_address(text: str, flag: str = "--listen-address") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(flag, f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_listen_socket(host: str, port: int, flag: str = "--listen-address") -> socket.socket:
    """Bind now, during validation: a port in use is bad input, not a crash later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ConfigError(flag, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def positive(value: float, flag: str, *, allow_zero: bool = False) -> float:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(flag, f"must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")
    return value


def validate_regex(pattern: str, flag: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(flag, f"invalid regular expression {pattern!r}: {exc}") from None
    return pattern


def validate_http_url(url: str, flag: str) -> str:
    if not url:
        return url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(flag, f"expected an http:// or https:// URL, got {mask_url(url)!r}")
    return url
