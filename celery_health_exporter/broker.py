"""The exporter's own Celery app and kombu connections, built from the config."""
from __future__ import annotations

import ssl
from urllib.parse import urlsplit

from celery import Celery

_CERT_REQS = {"CERT_NONE": ssl.CERT_NONE, "CERT_OPTIONAL": ssl.CERT_OPTIONAL, "CERT_REQUIRED": ssl.CERT_REQUIRED}

# An AMQP heartbeat lets a half-open TCP connection (a cut network) be noticed in seconds.
AMQP_HEARTBEAT = 10
CONNECT_TIMEOUT = 5


def ssl_options(options: dict) -> dict:
    """``--broker-ssl-option cert_reqs=CERT_REQUIRED`` -> the ssl constant kombu expects."""
    converted = dict(options)
    for key in ("cert_reqs", "ssl_cert_reqs"):
        if isinstance(converted.get(key), str) and converted[key] in _CERT_REQS:
            converted[key] = _CERT_REQS[converted[key]]
    return converted


def amqp_tls_options(config) -> dict:
    """py-amqp checks the broker's host name only when given ``server_hostname``
    (kombu never passes it): without it any certificate of the right CA would do.
    The URL's host, unless set, or unless failover URLs name several hosts."""
    options = ssl_options(config.broker_ssl_options)
    hosts = {urlsplit(part).hostname for part in config.broker_url.split(";")}
    if len(hosts) == 1 and None not in hosts and "server_hostname" not in options:
        options["server_hostname"] = hosts.pop()
    return options


def make_app(config) -> Celery:
    app = Celery("celery-health-exporter", broker=config.broker_url, set_as_current=False)
    app.conf.broker_transport_options = dict(config.broker_transport_options)
    if config.broker_kind == "amqp" and (config.broker_ssl_options or config.broker_url.startswith("amqps://")):
        app.conf.broker_use_ssl = amqp_tls_options(config)
    elif config.broker_ssl_options:
        app.conf.broker_use_ssl = ssl_options(config.broker_ssl_options)
    app.conf.broker_connection_timeout = CONNECT_TIMEOUT
    app.conf.broker_heartbeat = AMQP_HEARTBEAT
    return app


class MissingDependency(ImportError):
    """A module the configured broker or a source needs cannot be imported: nothing
    would ever work, so the exporter stops at once instead of retrying for ever."""


def check_dependencies(config, app: Celery | None = None) -> None:
    """Load the broker's kombu transport and import every enabled source, without
    connecting. kombu imports a transport's libraries only when a connection is
    made, inside the source's reconnect loop, where an ImportError would look
    like an outage."""
    from .sources import source_classes

    app = app or make_app(config)
    scheme = config.broker_url.split(";")[0].split("://")[0]
    try:
        with app.connection_for_read() as connection:
            connection.transport  # noqa: B018 - instantiates the transport class, which imports its client
        source_classes(config)
    except ImportError as exc:
        missing = f"the Python package {exc.name!r}" if getattr(exc, "name", None) else str(exc)
        raise MissingDependency(
            f"{scheme}:// needs {missing}, which cannot be imported ({type(exc).__name__}: {exc}); "
            "reinstall with `pip install celery-health-exporter` (it declares what each broker needs)"
        ) from None
