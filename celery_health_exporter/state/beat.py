"""The periodic-task part of the model: what ``celery_health_exporter.hooks.beat`` ships.

Pure Python, no I/O. A beat process with the hook sends ``exporter-beat`` every
few seconds (its schedule: entry, task, schedule in words, next due time,
period), ``exporter-beat-sent`` for its sends and ``exporter-beat-offline`` when
it exits cleanly (see ``docs/beat.md``). From them:

- a beat *instance* (one process, the hook's ``instance`` id) is up while it
  reports, down after ``timeout`` seconds of silence (at least twice its
  interval) or at once after ``exporter-beat-offline``; ``beat`` is the hook's
  label, up while any of its instances is;
- an *entry* is (beat_schedule key, task name), summed over beats. Each entry
  awaits its next due time (the latest next due time a beat reported). A due
  time more than ``missed_grace`` seconds in the past with no send is a missed
  run, and the next one is awaited a period later: while its beat is dead, an
  entry's misses keep being counted, one per period. An entry that no beat
  lists any more (removed from the schedule) is awaited no longer;
- a send whose due time lies within half a period of a due time another beat
  instance sent is a duplicate run;
- the outcome of the task ids beat sent comes from the task events
  (``ClusterState._finish`` calls ``task_finished``), in either order.

While the exporter receives no events (``ClusterState.events_interrupted_at``)
nothing is timed out or counted missed; due times that passed while it was blind
are skipped, not counted. Counters never go backwards; a beat down for
``purge_after`` seconds disappears, an entry too once no beat lists it and it
saw nothing for as long. Bounded: ``MAX_BEATS`` instances, ``MAX_ENTRIES``
entries (the excess is counted in ``celery_exporter_events_malformed_total``
as ``beat_over_limit``). Guarded by ``ClusterState.lock``.
"""
from __future__ import annotations

import math
from collections import OrderedDict, deque

from ..hooks.protocol import BEAT_EVENT_TYPE, BEAT_OFFLINE_EVENT_TYPE, BEAT_SENT_EVENT_TYPE
from .events import MAX_INTERVAL, MalformedEvent, clean_label, count, duration, finite_number, interval, text

MAX_BEATS = 100  # instances (processes) tracked at once
MAX_ENTRIES = 2000
MAX_SENDS = 1000  # sends taken from one event
MAX_IDS = 20_000  # task ids of recent sends, to attribute their outcome
MAX_EARLY = 5_000  # outcomes of tasks whose send is not known yet (the task events travel apart)
MAX_PERIOD = 366 * 86400.0
MAX_STAGES = 16  # hook_errors stages per instance
RECENT_DUES = 8
CLOCK_TOLERANCE = 2.0  # seconds of difference between the beat's clock and ours taken as none  # due times per entry remembered for duplicate detection
OUTCOMES = ("succeeded", "failed", "retried", "revoked", "rejected")


class BeatInstance:
    __slots__ = ("beat", "instance", "last_seen", "interval", "up", "down_since", "started", "scheduler", "pid",
                 "entries", "last_seq", "hook_errors")

    def __init__(self, beat: str, instance: str, now: float):
        self.beat, self.instance = beat, instance
        self.last_seen = now
        self.interval = 10.0
        self.up = True
        self.down_since: float | None = None
        self.started: float | None = None
        self.scheduler: str | None = None
        self.pid: int | None = None
        self.entries: frozenset = frozenset()  # entry keys it listed last
        self.last_seq = 0  # sends are numbered by the hook: a re-shipped one is not counted twice
        self.hook_errors: dict[str, int] = {}


class Entry:
    __slots__ = ("entry", "name", "schedule", "runs", "missed", "duplicates", "failures", "send_errors",
                 "last_run", "awaited", "period", "listed_by", "recent", "outcome", "runtime", "last_seen")

    def __init__(self, entry: str, name: str, now: float):
        self.entry, self.name = entry, name
        self.schedule: str | None = None
        self.runs = self.missed = self.duplicates = self.failures = self.send_errors = 0
        self.last_run: float | None = None
        self.awaited: float | None = None  # the due time a send is awaited for
        self.period: float | None = None
        self.listed_by: set[str] = set()  # instances whose schedule holds it
        self.recent: deque = deque(maxlen=RECENT_DUES)  # (due, instance) of the last sends
        self.outcome: str | None = None  # of the last run whose outcome is known
        self.runtime: float | None = None
        self.last_seen = now


class BeatState:
    def __init__(self, cluster=None, *, timeout: float = 30.0, missed_grace: float = 60.0,
                 purge_after: float | None = None):
        self.cluster = cluster
        self.timeout = timeout
        self.missed_grace = missed_grace
        self.purge_after = purge_after if purge_after is not None else getattr(cluster, "purge_offline_after",
                                                                                600.0)
        self.instances: dict[str, BeatInstance] = {}
        self.entries: dict[tuple[str, str], Entry] = {}
        self.ids: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.early: OrderedDict[str, tuple[str, float | None]] = OrderedDict()
        self.hook_errors_base: dict[tuple[str, str], int] = {}  # of purged instances: counters never go back
        self.seen = False  # a beat hook ever reported: the metrics exist from then on
        self._blind = False
        self._blind_until = 0.0
        self.report = cluster.count_malformed if cluster is not None else (lambda reason: None)
        if cluster is not None:
            cluster.register_handler(BEAT_EVENT_TYPE, self.on_heartbeat)
            cluster.register_handler(BEAT_SENT_EVENT_TYPE, self.on_sent)
            cluster.register_handler(BEAT_OFFLINE_EVENT_TYPE, self.on_offline)

    # ------------------------------------------------------------------ input
    def _instance(self, event: dict, now: float) -> BeatInstance | None:
        beat = text(event, "hostname")
        if beat is None:
            raise MalformedEvent("missing_hostname")
        instance_id = text(event, "instance")
        if instance_id is None:
            raise MalformedEvent("beat_instance")
        instance = self.instances.get(instance_id)
        if instance is None:
            if len(self.instances) >= MAX_BEATS:
                self.report("beat_over_limit")
                return None
            instance = self.instances[instance_id] = BeatInstance(beat, instance_id, now)
        self.seen = True
        every = interval(event.get("interval"), self.report)
        if every is not None:
            instance.interval = every
        pid = count(event.get("pid"), self.report)
        if pid is not None:
            instance.pid = pid
        instance.started = self._time(event.get("started"), now) or instance.started
        errors = event.get("hook_errors")
        if isinstance(errors, dict):
            for stage, n in list(errors.items())[:MAX_STAGES]:
                n = count(n, self.report)
                if isinstance(stage, str) and stage and n is not None:
                    stage = clean_label(stage)
                    if stage in instance.hook_errors or len(instance.hook_errors) < MAX_STAGES:
                        instance.hook_errors[stage] = max(n, instance.hook_errors.get(stage, 0))
        return instance

    def _alive(self, instance: BeatInstance, now: float) -> None:
        instance.last_seen = now
        instance.up = True
        instance.down_since = None

    def _time(self, value, now: float, shift: float = 0.0) -> float | None:
        """A Unix time from the hook (due, sent, next), within a year of now, on the exporter's
        clock: ``shift`` is what the beat host's clock is behind (``_shift``)."""
        value = finite_number(value, now - MAX_PERIOD, now + MAX_PERIOD, self.report, "bad_timestamp")
        return None if value is None else value + shift

    @staticmethod
    def _shift(now: float, ts: float) -> float:
        """How far the beat's clock (the event's timestamp) is behind ours, when it is more than
        CLOCK_TOLERANCE: a beat host whose clock runs late, or events that reach us late (a
        backlog), would otherwise make due times look missed."""
        shift = now - ts
        return shift if abs(shift) > CLOCK_TOLERANCE else 0.0

    def _entry(self, name, task, now: float) -> Entry | None:
        if not isinstance(name, str) or not name or not isinstance(task, str) or not task:
            self.report("beat_entry")
            return None
        task = clean_label(task)
        if self.cluster is not None:
            task = self.cluster.cardinality.name.fold(task)
        key = (clean_label(name), task)
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= MAX_ENTRIES:
                self.report("beat_over_limit")
                return None
            entry = self.entries[key] = Entry(key[0], task, now)
        entry.last_seen = now
        return entry

    def _period(self, value) -> float | None:
        return finite_number(value, 0.001, MAX_PERIOD, self.report, "bad_duration") if value is not None else None

    def on_heartbeat(self, event: dict, now: float, ts: float) -> None:
        instance = self._instance(event, now)
        if instance is None:
            return
        self._alive(instance, now)
        scheduler = text(event, "scheduler")
        if scheduler is not None:
            instance.scheduler = scheduler
        reported = event.get("entries")
        if not isinstance(reported, list):
            return
        listed = set()
        shift = self._shift(now, ts)
        for item in reported[:MAX_ENTRIES]:
            if not isinstance(item, dict):
                self.report("beat_entry")
                continue
            entry = self._entry(item.get("entry"), item.get("task"), now)
            if entry is None:
                continue
            key = (entry.entry, entry.name)
            listed.add(key)
            entry.listed_by.add(instance.instance)
            words = text(item, "schedule")
            if words is not None:
                entry.schedule = words
            period = self._period(item.get("period"))
            if period is not None:
                entry.period = period
            if "next" in item and item["next"] is None:
                entry.awaited = None  # beat holds it back for good (e.g. an expired django-celery-beat task)
                continue
            due = self._time(item.get("next"), now, shift)
            if due is not None and (entry.awaited is None or due > entry.awaited):
                entry.awaited = due
        for key in instance.entries - listed:  # removed from this beat's schedule
            entry = self.entries.get(key)
            if entry is not None:
                entry.listed_by.discard(instance.instance)
                if not entry.listed_by:
                    entry.awaited = None
        instance.entries = frozenset(listed)

    def on_sent(self, event: dict, now: float, ts: float) -> None:
        instance = self._instance(event, now)
        if instance is None:
            return
        self._alive(instance, now)
        sends = event.get("sends")
        if not isinstance(sends, list):
            raise MalformedEvent("beat_sends")
        shift = self._shift(now, ts)
        for send in sends[:MAX_SENDS]:
            if not isinstance(send, dict):
                self.report("beat_entry")
                continue
            seq = count(send.get("seq"), self.report)
            if seq is not None:
                if seq <= instance.last_seq:
                    continue  # shipped again after a failed publish whose message did arrive
                instance.last_seq = seq
            entry = self._entry(send.get("entry"), send.get("task"), now)
            if entry is not None:
                self._sent(entry, instance, send, now, shift)

    def _sent(self, entry: Entry, instance: BeatInstance, send: dict, now: float, shift: float) -> None:
        if isinstance(send.get("error"), str):
            entry.send_errors += 1
            return
        entry.runs += 1
        sent = self._time(send.get("sent"), now, shift)
        entry.last_run = max(entry.last_run or 0.0, sent if sent is not None else now)
        period = self._period(send.get("period"))
        if period is not None:
            entry.period = period
        due = self._time(send.get("due"), now, shift)
        if due is not None:
            tolerance = (entry.period or 2.0) / 2
            if any(other != instance.instance and abs(due - d) < tolerance for d, other in entry.recent):
                entry.duplicates += 1
            entry.recent.append((due, instance.instance))
        next_due = self._time(send.get("next"), now, shift)
        if next_due is not None and (entry.awaited is None or next_due > entry.awaited):
            entry.awaited = next_due
        task_id = text(send, "id")
        if task_id is not None:
            self.ids[task_id] = (entry.entry, entry.name)
            if len(self.ids) > MAX_IDS:
                self.ids.popitem(last=False)
            early = self.early.pop(task_id, None)
            if early is not None:
                self._outcome(entry, *early)

    def on_offline(self, event: dict, now: float, ts: float) -> None:
        instance = self._instance(event, now)
        if instance is not None and instance.up:
            instance.up = False
            instance.down_since = now

    def task_finished(self, uuid: str, event: dict, record, now: float) -> None:
        """A task ended (task-succeeded, -failed, -retried, -revoked, -rejected): the
        outcome of an entry's run when beat sent that id, else kept a while in case
        beat's send arrives later."""
        if not self.seen:
            return  # no beat hook: nothing to attribute
        kind = event.get("type", "")
        outcome = kind[5:] if isinstance(kind, str) and kind.startswith("task-") else None
        if outcome not in OUTCOMES:
            return
        runtime = duration(event.get("runtime"), self.report)
        if runtime is None and record is not None and getattr(record, "started_local", None) is not None:
            runtime = max(0.0, now - record.started_local)
        key = self.ids.get(uuid)
        entry = self.entries.get(key) if key is not None else None
        if entry is not None:
            self._outcome(entry, outcome, runtime)
        else:
            self.early[uuid] = (outcome, runtime)
            if len(self.early) > MAX_EARLY:
                self.early.popitem(last=False)

    @staticmethod
    def _outcome(entry: Entry, outcome: str, runtime: float | None) -> None:
        entry.outcome = outcome
        if runtime is not None:
            entry.runtime = runtime
        if outcome == "failed":
            entry.failures += 1

    # --------------------------------------------------------------- lifetime
    def timeout_for(self, instance: BeatInstance) -> float:
        return max(self.timeout, 2 * instance.interval)

    def expire(self, now: float) -> None:
        """Silent beats go down, due times past their grace are missed runs, the long gone are purged."""
        if self.cluster is not None and self.cluster.events_interrupted_at is not None:
            self._blind = True  # no events: silence and missing sends say nothing
            return
        if self._blind:  # events are back: what fell due while blind was not seen either way
            self._blind = False
            longest = max((i.interval for i in self.instances.values()), default=10.0)
            self._blind_until = now + 2 * longest
        for instance_id, instance in list(self.instances.items()):
            if instance.up and now - instance.last_seen > self.timeout_for(instance):
                instance.up = False
                instance.down_since = now
            if not instance.up and instance.down_since is not None and now - instance.down_since > self.purge_after:
                del self.instances[instance_id]
                for stage, n in instance.hook_errors.items():
                    key = (instance.beat, stage)
                    self.hook_errors_base[key] = self.hook_errors_base.get(key, 0) + n
                for key in instance.entries:
                    entry = self.entries.get(key)
                    if entry is not None:
                        entry.listed_by.discard(instance_id)
                        if not entry.listed_by:
                            entry.awaited = None
        for key, entry in list(self.entries.items()):
            awaited = entry.awaited
            if awaited is not None and now > awaited + self.missed_grace:
                period = entry.period
                if period is None or period <= 0:
                    missed, entry.awaited = 1, None
                else:
                    missed = math.floor((now - self.missed_grace - awaited) / period) + 1
                    entry.awaited = awaited + missed * period
                if awaited + self.missed_grace >= self._blind_until:
                    entry.missed += missed
                else:  # fell due while the exporter was blind
                    entry.last_seen = now
            if not entry.listed_by and now - entry.last_seen > self.purge_after:
                del self.entries[key]

    # ---------------------------------------------------------------- reading
    def beats_up(self) -> dict[str, int]:
        """beat label -> 1 while any of its instances is up, else 0."""
        out: dict[str, int] = {}
        for instance in self.instances.values():
            out[instance.beat] = max(out.get(instance.beat, 0), 1 if instance.up else 0)
        return out

    def instances_up(self) -> int:
        return sum(1 for instance in self.instances.values() if instance.up)

    def hook_errors(self) -> dict[tuple[str, str], int]:
        out = dict(self.hook_errors_base)
        for instance in self.instances.values():
            for stage, n in instance.hook_errors.items():
                key = (instance.beat, stage)
                out[key] = out.get(key, 0) + n
        return out
