"""Decoding and reading Celery event bodies: pure functions, no I/O.

Everything that comes from the broker is untrusted: any field may be missing,
of the wrong type or absurdly large. These helpers return safe values or
raise ``MalformedEvent`` with a short reason that becomes a metric label.
"""
from __future__ import annotations

import json
import math
import re

MAX_LABEL_LENGTH = 200


class MalformedEvent(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode_body(body: bytes | str) -> list[dict]:
    """A message body into a list of events: a dict, or a ``task.multi`` list of dicts."""
    try:
        payload = json.loads(body)
    except (ValueError, TypeError):
        raise MalformedEvent("json") from None
    if isinstance(payload, dict):
        payload = [payload]
    elif not isinstance(payload, list):
        raise MalformedEvent("not_an_object")
    return payload


def event_type(event) -> str:
    if not isinstance(event, dict):
        raise MalformedEvent("not_an_object")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise MalformedEvent("missing_type")
    return clean_label(kind)  # it becomes a label value of celery_exporter_events_total


def number(event: dict, key: str, default: float | None = None) -> float | None:
    """A finite float from the event, or ``default`` (bools and strings are not numbers)."""
    value = event.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def text(event: dict, key: str, default: str | None = None) -> str | None:
    value = event.get(key)
    if not isinstance(value, str) or not value:
        return default
    return clean_label(value)


def clean_label(value: str) -> str:
    """Label values must stay printable and short whatever a sender put in them."""
    if len(value) > MAX_LABEL_LENGTH:
        value = value[:MAX_LABEL_LENGTH]
    if not value.isprintable():
        value = "".join(ch if ch.isprintable() else "?" for ch in value)
    return value


def adjusted_timestamp(event: dict, local_utcoffset: float) -> float | None:
    """The sender's timestamp corrected the way Celery does (``adjust_timestamp``)."""
    ts = number(event, "timestamp")
    if ts is None or ts <= 0:
        return None
    offset = number(event, "utcoffset", local_utcoffset)
    return ts - (offset - local_utcoffset) * 3600


_EXC_CLASS = re.compile(r"\s*([A-Za-z_][\w.]*)\s*(?:\(|:|$)")
_UNPICKLEABLE = re.compile(r"\s*UnpickleableExceptionWrapper\(\s*'[^']*'\s*,\s*'([^']+)'")


def exception_class(exception_repr) -> tuple[str, bool]:
    """Class name from the ``exception`` field of task-failed/task-retried, and
    whether it was an exception Celery could not pickle (wrapped).

    The field is a repr such as ``ValueError('x')``, ``mod.Error: msg`` or
    ``UnpickleableExceptionWrapper('mod', 'Cls', (...), "repr")``.
    """
    if not isinstance(exception_repr, str) or not exception_repr.strip():
        return "unknown", False
    wrapped = _UNPICKLEABLE.match(exception_repr)
    if wrapped:
        return clean_label(wrapped.group(1).rsplit(".", 1)[-1]), True
    match = _EXC_CLASS.match(exception_repr)
    if not match:
        return "unknown", False
    return clean_label(match.group(1).rsplit(".", 1)[-1]), False
