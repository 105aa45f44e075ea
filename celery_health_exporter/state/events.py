"""Decoding and reading Celery event bodies: pure functions, no I/O.

Everything that comes from the broker is untrusted: any field may be missing,
of the wrong type or absurdly large. These helpers return safe values or
raise ``MalformedEvent`` with a short reason that becomes a metric label.

Numbers from outside
--------------------
Every number taken from outside (event fields, remote-control and worker-hook
replies, the publisher hook's events, the RabbitMQ management API, Redis,
the host's process table) enters the model through one of the typed readers
below: ``finite_number``, ``count``, ``duration``, ``timestamp`` and
``utcoffset`` (``event_timestamp`` for an event's corrected timestamp). A
reader returns the value, or ``None`` for an absent one (``None`` or a missing
key: not an error), or ``None`` after calling ``report(reason)`` for a value
that is of the wrong type (a string, a bool, a list), not finite (NaN, ±inf,
an integer too large for a float) or outside its bounds (the constants below).
``report`` counts ``celery_exporter_events_malformed_total{reason}``; the
reason is one of ``NUMBER_REASONS``, never the value itself.

So the model never holds a NaN or an infinity, and no sum it keeps can
overflow. What happens to the rest of the input when a number is bad:

- event timestamp (``bad_timestamp``) or utcoffset (``bad_utcoffset``): the
  event is applied; a bad utcoffset is taken as the exporter's own (as when
  it is absent), a bad timestamp is replaced by the time of receipt and the
  event lag is not observed;
- any other field of a Celery event (runtime, freq, active, processed, pid):
  that field is dropped, the event is applied (a success with a bad runtime
  counts as a success, without a run-time observation);
- publisher hook event (cumulative totals): a bad count drops the whole event
  (a total read as 0 would look like a restarted instance and count twice);
- worker hook reply (cumulative counters): a bad number in a counter or the
  child-task histogram drops the whole reply; a bad gauge (peak RSS, limits,
  revoked) drops that gauge only;
- ``inspect stats`` / ``conf`` / ``active`` replies, the management API, Redis
  scores, host process samples: that number is dropped (a gauge absent, a
  queue counter absent, a process's RSS or CPU not counted this scan).
"""
from __future__ import annotations

import json
import math
import re
from typing import Callable

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


# ------------------------------------------------------------ numbers
# The bounds of every number taken from outside, defined once (see the module doc).

# Integers (counts, byte sizes, pids) up to 2**53: above it a float64 sample, what
# Prometheus stores, no longer holds every integer, and no real count gets there.
MAX_COUNT = 2 ** 53
# Durations (task run time, worker uptime, how long a task has run): ten years is longer
# than any task or process runs; a longer one is a broken clock or a forged value, and
# one such observation would swamp a histogram's sum for ever.
MAX_DURATION = 10 * 365.25 * 86400
# Heartbeat and report intervals: the worker timeout follows twice a worker's heartbeat
# interval (freq), so a forged freq of 1e308 would keep a dead worker up for ever.
# Celery's default is 2 s; nobody sends heartbeats less than once an hour.
MAX_INTERVAL = 3600.0
# An event's timestamp, once corrected with its utcoffset, must lie in
# [now - MAX_EVENT_AGE, now + MAX_CLOCK_AHEAD]. Events wait in the broker while the
# exporter is down (the RabbitMQ event queue outlives it by --event-queue-expires), so
# days of lag are real; a week more is not an event worth timing. Clocks run ahead by
# seconds or minutes; a day ahead is a broken clock.
MAX_EVENT_AGE = 7 * 86400.0
MAX_CLOCK_AHEAD = 86400.0
# utcoffset is in hours (west of UTC, Celery's sign): real zones are within 14 hours of
# UTC, POSIX TZ strings allow up to 24. Each hour too many moves the timestamp by 3600 s.
MAX_UTCOFFSET_HOURS = 24.0

# The reasons a number is refused: label values of celery_exporter_events_malformed_total.
BAD_TIMESTAMP = "bad_timestamp"
BAD_UTCOFFSET = "bad_utcoffset"
BAD_DURATION = "bad_duration"
BAD_COUNT = "bad_count"
BAD_NUMBER = "bad_number"
NUMBER_REASONS = (BAD_TIMESTAMP, BAD_UTCOFFSET, BAD_DURATION, BAD_COUNT, BAD_NUMBER)

Report = Callable[[str], None]


def ignore(reason: str) -> None:
    """A ``report`` for callers that only want the value."""


def finite_number(value, low: float, high: float, report: Report, reason: str = BAD_NUMBER) -> float | None:
    """``value`` as a float in [low, high]; None when absent, or (reported) when it is
    not an int or float (bools and strings are not numbers), not finite or out of bounds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        report(reason)
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond the float range
        report(reason)
        return None
    if not (math.isfinite(value) and low <= value <= high):
        report(reason)
        return None
    return value


def count(value, report: Report, high: int = MAX_COUNT) -> int | None:
    """A non-negative integer (a count, a byte size, a pid) up to ``high``; a float is truncated."""
    value = finite_number(value, 0, high, report, BAD_COUNT)
    return None if value is None else int(value)


def duration(value, report: Report, high: float = MAX_DURATION) -> float | None:
    """Seconds, non-negative, at most ``high``."""
    return finite_number(value, 0.0, high, report, BAD_DURATION)


def interval(value, report: Report) -> float | None:
    """A heartbeat or report interval: seconds, more than 0, at most MAX_INTERVAL."""
    value = duration(value, report, MAX_INTERVAL)
    if value == 0.0:
        report(BAD_DURATION)
        return None
    return value


def timestamp(value, now: float, report: Report, max_age: float = MAX_EVENT_AGE) -> float | None:
    """Unix time in [now - max_age, now + MAX_CLOCK_AHEAD]."""
    return finite_number(value, now - max_age, now + MAX_CLOCK_AHEAD, report, BAD_TIMESTAMP)


def utcoffset(value, report: Report) -> float | None:
    """Hours west of UTC, within MAX_UTCOFFSET_HOURS."""
    return finite_number(value, -MAX_UTCOFFSET_HOURS, MAX_UTCOFFSET_HOURS, report, BAD_UTCOFFSET)


def count_refused(state, reasons: list) -> None:
    """Count the reasons a source collected outside the state lock (a broker poll):
    ``ClusterState.count_malformed`` each, under the lock."""
    if reasons:
        with state.lock:
            for reason in reasons:
                state.count_malformed(reason)


def adjusted_timestamp(event: dict, local_utcoffset: float, report: Report = ignore) -> float | None:
    """The sender's timestamp corrected the way Celery does (``adjust_timestamp``),
    unbounded in time (``event_timestamp`` bounds it). A bad utcoffset counts as ours."""
    ts = finite_number(event.get("timestamp"), 0.0, math.inf, report, BAD_TIMESTAMP)
    if ts is None:
        return None
    offset = utcoffset(event.get("utcoffset"), report)
    if offset is None:
        offset = local_utcoffset
    return ts - (offset - local_utcoffset) * 3600


def event_timestamp(event: dict, now: float, local_utcoffset: float, report: Report) -> float | None:
    """The event's corrected timestamp when it is near ``now`` (see MAX_EVENT_AGE), else None."""
    ts = adjusted_timestamp(event, local_utcoffset, report)
    return None if ts is None else timestamp(ts, now, report)


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


# billiard (4.x, Celery 5.3+) wraps an exception raised in the worker's main process, e.g. the
# WorkerLostError of a task whose child died, in ExceptionWithTraceback, whose repr names nothing
# ("ExceptionWithTraceback()"); the event's traceback ends with the real "module.Class: message".
_BILLIARD_WRAPPER = re.compile(r"\s*(?:[\w.]+\.)?ExceptionWithTraceback\(\)?")


def task_exception(event: dict):
    """The ``exception`` of a task-failed/task-retried event, unwrapped where billiard
    hid it: then the last line of the ``traceback`` field."""
    exception = event.get("exception")
    if isinstance(exception, str) and _BILLIARD_WRAPPER.match(exception):
        traceback = event.get("traceback")
        if isinstance(traceback, str):
            lines = [line for line in traceback.strip().strip('"').strip().splitlines() if line.strip()]
            if lines:
                return lines[-1].strip()
    return exception
