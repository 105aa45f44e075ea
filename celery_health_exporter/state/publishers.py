"""The publisher part of the model: what ``celery_health_exporter.hooks.publisher`` ships.

Pure Python, no I/O. Every process instrumented with the hook sends its
cumulative totals in an ``exporter-publisher-stats`` event (see
``docs/hooks.md``) every few seconds. The exporter sums them per publisher
(the hook's ``publisher`` label, the host name by default): the process
instances are tracked internally and never become label values, so the many
short-lived processes of a gunicorn pool do not multiply series.

Counters never go backwards: an instance that stops reporting (its process
exited) is folded into the publisher's retired totals, and brought back out
if it reports again (a broker outage longer than the retirement delay); an
instance whose totals went down (a reused instance id) is folded and started
again. A publisher that sent nothing for ``purge_after`` seconds disappears.

Numbers are read with ``state.events``' readers; a bad one (not a number, not
finite, negative, beyond 2**53) is counted in
``celery_exporter_events_malformed_total{reason}`` and: a bad total
(publishes, retries, retry_policy_exceeded) keeps the instance's last good
value (read as 0 it would look like a new run, and what the instance counted
before would be counted twice); a bad entry of ``failures`` or ``hook_errors``
is skipped; a bad number in ``duration`` drops the event
(``publisher_duration``); a bad ``interval`` or ``pid`` is dropped alone.

Attached to ``ClusterState`` as ``state.publishers``; guarded by
``state.lock`` like the rest of the model.
"""
from __future__ import annotations

from collections import OrderedDict

from ..hooks.protocol import PUBLISHER_EVENT_FORMAT as FORMAT
from ..hooks.protocol import PUBLISHER_EVENT_TYPE as EVENT_TYPE
from .events import (BAD_COUNT, MAX_COUNT, MalformedEvent, Report, clean_label, count, duration, finite_number,
                     ignore, interval, text)
from .histogram import Histogram

MAX_EXCEPTION_CLASSES = 32  # per publisher; more become "other"
MAX_STAGES = 16
MAX_BUCKETS = 64
MAX_RETIRED_INSTANCES = 2000  # per publisher, remembered so that a returning instance is not counted twice
MIN_RETIRE_AFTER = 120.0


class Totals:
    """Cumulative counts of one hook instance, or a sum of several."""

    __slots__ = ("publishes", "retries", "exceeded", "failures", "hook_errors", "duration")

    def __init__(self):
        self.publishes = self.retries = self.exceeded = 0
        self.failures: dict[str, int] = {}
        self.hook_errors: dict[str, int] = {}
        self.duration: Histogram | None = None

    def add(self, other: "Totals", sign: int = 1) -> None:
        self.publishes += sign * other.publishes
        self.retries += sign * other.retries
        self.exceeded += sign * other.exceeded
        for mine, theirs in ((self.failures, other.failures), (self.hook_errors, other.hook_errors)):
            for key, n in theirs.items():
                mine[key] = mine.get(key, 0) + sign * n
        if other.duration is not None:
            if self.duration is None:
                self.duration = Histogram(other.duration.bounds)
            if self.duration.bounds == other.duration.bounds:
                self.duration.add(other.duration, sign)

    def went_down_from(self, before: "Totals") -> bool:
        """True when any counter is lower than in ``before`` (not the same process's totals)."""
        if (self.publishes < before.publishes or self.retries < before.retries
                or self.exceeded < before.exceeded):
            return True
        for mine, theirs in ((self.failures, before.failures), (self.hook_errors, before.hook_errors)):
            if any(mine.get(key, 0) < n for key, n in theirs.items()):
                return True
        if before.duration is not None and self.duration is not None:
            return self.duration.count < before.duration.count
        return False


class _Instance:
    __slots__ = ("totals", "last_seen", "interval", "pid")

    def __init__(self, totals: Totals, now: float, interval: float, pid: int | None):
        self.totals, self.last_seen, self.interval, self.pid = totals, now, interval, pid


class PublisherAggregate:
    """One publisher: the retired totals plus its live instances."""

    def __init__(self, now: float):
        self.base = Totals()
        self.instances: dict[str, _Instance] = {}
        self.retired: OrderedDict[str, Totals] = OrderedDict()
        self.bounds: tuple | None = None  # duration buckets of this publisher (the first instance's)
        self.last_seen = now
        self.exception_classes: set[str] = set()

    def total(self) -> Totals:
        out = Totals()
        out.add(self.base)
        for instance in self.instances.values():
            out.add(instance.totals)
        if out.duration is None and self.bounds is not None:
            out.duration = Histogram(self.bounds)
        return out

    def retire(self, instance_id: str) -> None:
        instance = self.instances.pop(instance_id)
        self.base.add(instance.totals)
        self.retired[instance_id] = instance.totals
        if len(self.retired) > MAX_RETIRED_INSTANCES:
            self.retired.popitem(last=False)  # its totals stay in base for good


SCALARS = (("publishes", "publishes"), ("retries", "retries"), ("exceeded", "retry_policy_exceeded"))


def _count_map(value, limit: int, report: Report) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    out: dict[str, int] = {}
    for key, n in value.items():
        if not isinstance(key, str) or not key:
            continue
        n = count(n, report)
        if not n:
            continue
        label = clean_label(key)
        if label not in out and len(out) >= limit:
            label = "other"
        out[label] = out.get(label, 0) + n
    return out


def _refuse_duration(reason: str) -> None:
    raise MalformedEvent("publisher_duration")


def _duration(value) -> Histogram | None:
    if not isinstance(value, dict):
        return None
    bounds, counts, total = value.get("bounds"), value.get("counts"), value.get("sum")
    if not isinstance(bounds, list) or not isinstance(counts, list) or not 0 < len(bounds) <= MAX_BUCKETS:
        raise MalformedEvent("publisher_duration")
    if len(counts) != len(bounds) + 1:
        raise MalformedEvent("publisher_duration")
    fbounds = tuple(duration(b, _refuse_duration) for b in bounds)  # seconds
    icounts = [count(c, _refuse_duration) for c in counts]
    # a sum of many durations: MAX_COUNT seconds (285 million years) is more than any
    fsum = finite_number(total, 0.0, float(MAX_COUNT), _refuse_duration, BAD_COUNT)
    if None in fbounds or None in icounts or fsum is None:
        raise MalformedEvent("publisher_duration")  # absent where a number is needed
    if any(b2 <= b1 for b1, b2 in zip(fbounds, fbounds[1:])):
        raise MalformedEvent("publisher_duration")
    return Histogram(fbounds, icounts, fsum)


def parse_totals(event: dict, report: Report = ignore, before: Totals | None = None) -> Totals:
    """The event's totals; ``before``: the instance's last ones, whose values stand in for bad totals."""
    totals = Totals()
    for attribute, key in SCALARS:
        value = count(event.get(key), report)
        if value is None and key in event and before is not None:
            value = getattr(before, attribute)  # present but bad: unknown, not reset
        setattr(totals, attribute, value or 0)
    totals.failures = _count_map(event.get("failures"), MAX_EXCEPTION_CLASSES, report)
    totals.hook_errors = _count_map(event.get("hook_errors"), MAX_STAGES, report)
    totals.duration = _duration(event.get("duration"))
    return totals


class PublisherState:
    def __init__(self, cluster=None, *, purge_after: float | None = None):
        self.purge_after = purge_after if purge_after is not None else (
            getattr(cluster, "purge_offline_after", 600.0))
        self.publishers: dict[str, PublisherAggregate] = {}
        self.events = 0
        self.cap = getattr(getattr(cluster, "cardinality", None), "publisher", None)  # --max-publishers
        self.report: Report = cluster.count_malformed if cluster is not None else ignore
        if cluster is not None:
            cluster.register_handler(EVENT_TYPE, self.on_event)

    # ---------------------------------------------------------------- input
    def on_event(self, event: dict, now: float, ts: float) -> None:
        publisher = text(event, "hostname")
        if publisher is None:
            raise MalformedEvent("missing_hostname")
        if self.cap is not None:
            publisher = self.cap.fold(publisher)
        instance_id = text(event, "instance")
        if instance_id is None:
            raise MalformedEvent("publisher_instance")
        agg = self.publishers.get(publisher)
        before = None
        if agg is not None:
            instance = agg.instances.get(instance_id)
            before = instance.totals if instance is not None else agg.retired.get(instance_id)
        totals = parse_totals(event, self.report, before)
        every = interval(event.get("interval"), self.report) or 15.0
        pid = count(event.get("pid"), self.report)
        self.events += 1

        agg = self.publishers.get(publisher)
        if agg is None:
            agg = self.publishers[publisher] = PublisherAggregate(now)
        agg.last_seen = now
        # Exception classes are bounded per publisher, whatever each instance sends.
        for name in list(totals.failures):
            if name != "other" and name not in agg.exception_classes:
                if len(agg.exception_classes) >= MAX_EXCEPTION_CLASSES:
                    totals.failures["other"] = totals.failures.get("other", 0) + totals.failures.pop(name)
                    continue
                agg.exception_classes.add(name)
        if totals.duration is not None:
            if agg.bounds is None:
                agg.bounds = totals.duration.bounds
            elif totals.duration.bounds != agg.bounds:
                totals.duration = None  # different buckets cannot be summed: counted, not served
                totals.hook_errors["exporter_bucket_mismatch"] = 1

        instance = agg.instances.get(instance_id)
        if instance is None:
            earlier = agg.retired.pop(instance_id, None)
            if earlier is not None:
                if totals.went_down_from(earlier):
                    agg.retired[instance_id] = earlier  # not the same run: the folded totals stay
                else:
                    agg.base.add(earlier, -1)  # back from retirement: its totals are live again
            instance = agg.instances[instance_id] = _Instance(totals, now, every, pid)
        else:
            if totals.went_down_from(instance.totals):
                agg.base.add(instance.totals)  # a new run under the same id: keep what the old one counted
            instance.totals = totals
            instance.last_seen = now
            instance.interval = every

    # ------------------------------------------------------------- lifetime
    def expire(self, now: float) -> None:
        """Fold instances that stopped reporting; drop publishers silent for purge_after (run by ClusterState.tick)."""
        for name, agg in list(self.publishers.items()):
            for instance_id, instance in list(agg.instances.items()):
                if now - instance.last_seen > max(MIN_RETIRE_AFTER, 4 * instance.interval):
                    agg.retire(instance_id)
            if now - agg.last_seen > self.purge_after:
                del self.publishers[name]
                if self.cap is not None:
                    self.cap.forget(name)

    # -------------------------------------------------------------- reading
    def totals(self) -> dict[str, Totals]:
        return {name: agg.total() for name, agg in self.publishers.items()}

    def instances(self, publisher: str) -> int:
        agg = self.publishers.get(publisher)
        return len(agg.instances) if agg else 0
