"""Logging setup: text or JSON lines, with every known secret masked on the way out."""
from __future__ import annotations

import json
import logging
import sys
import time

_SECRETS: list[str] = []


def redact(message: str) -> str:
    for secret in _SECRETS:
        if secret and secret in message:
            message = message.replace(secret, "***")
    return message


class _RedactingFormatter(logging.Formatter):
    """Masks secrets in the final line, so that third-party messages (kombu,
    redis and aiohttp errors echo URLs) are covered too."""

    def __init__(self, json_lines: bool):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        if self.json_lines:
            entry = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "msg": record.getMessage(),
            }
            if record.exc_info:
                entry["exc"] = self.formatException(record.exc_info)
            line = json.dumps(entry, ensure_ascii=False)
        else:
            line = super().format(record)
        return redact(line)


def configure(level: str = "INFO", fmt: str = "text", secrets: list[str] | None = None) -> None:
    _SECRETS[:] = sorted({s for s in (secrets or []) if s}, key=len, reverse=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(fmt == "json"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party libraries are chatty at INFO about every reconnect attempt.
    for noisy in ("kombu", "amqp", "celery", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


# OpenSSL's words name the check that failed, not the setting that fixes it.
_HINTS = (
    (("IP address mismatch", "Hostname mismatch"),
     "the URL's host is not a name in the broker's certificate: connect by a name it holds"),
    (("CERTIFICATE_VERIFY_FAILED",),
     "the broker's certificate is not signed by the CA given (ssl_ca_certs / ca_certs)"),
    (("CERTIFICATE_REQUIRED", "certificate required", "EOF occurred in violation of protocol"),
     "the broker asks for a client certificate: set ssl_certfile and ssl_keyfile (certfile, keyfile on amqps)"),
    (("no permissions to", "NOPERM"),
     "the Redis ACL user lacks it: docs/brokers.md lists what the exporter needs"),
    (("wrong version number", "WRONG_VERSION_NUMBER"),
     "TLS spoken to a plain-text port, or plain text to a TLS port: check the scheme and port"),
)


def describe_error(exc: BaseException) -> str:
    """An exception as one safe line, with what to change where the error alone does not say."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    line = redact(f"{name}: {text}" if text else name)
    hint = next((hint for needles, hint in _HINTS if any(n in line for n in needles)), "")
    return f"{line[:300 - len(hint) - 3]} ({hint})" if hint else line[:300]
