"""Hostile and broken event input, property-based: whatever a broker delivers, decoding
and the state model never raise, /metrics always parses (text format and OpenMetrics),
label values come back exactly as the state holds them, and counters never go back."""
from __future__ import annotations

import json
import math
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from celery_health_exporter.metrics import ScrapeContext, StateCollector
from celery_health_exporter.metrics.text import expand_columns
from celery_health_exporter.metrics.definitions import AREAS
from celery_health_exporter.state.events import MAX_LABEL_LENGTH, MalformedEvent, clean_label, decode_body
from celery_health_exporter.state.model import ClusterState

NOW = float(int(time.time()))  # the collector expires workers against the real clock
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies

HOSTILE = ["celery@host", 'w"quote', "back\\slash", "new\nline", "cr\rlf", "tab\there", "nul\x00", "ünïcödé@hôst",
           "日本語", "🐍@snake", "\u2028sep", "\ud800lone", "a" * 300, " ", "{}", "other", "unknown", "le", "+Inf"]
hostile_text = st.sampled_from(HOSTILE) | st.text(max_size=24)
json_scalar = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
               | st.floats(allow_nan=True, allow_infinity=True) | hostile_text)
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def either(good):
    """A field's value: well-formed, hostile text or any JSON value."""
    return good | hostile_text | json_value


numbers = st.integers(min_value=-(2 ** 64), max_value=2 ** 64) | st.floats(allow_nan=True, allow_infinity=True)
FIELDS = {
    "uuid": either(st.sampled_from(["u-1", "u-2", "u-3", "u-4"])),
    "hostname": either(st.sampled_from(["celery@a", "celery@b", 'celery@"evil\\host', "celery@hôst\nx"])),
    "name": either(st.sampled_from(["tasks.add", "tasks.fail", "tâches.ünï", 'tasks."q"', "tasks.\nnl"])),
    "timestamp": either(st.floats(NOW - 100, NOW + 100) | numbers),
    "utcoffset": either(st.integers(-14, 14) | st.floats(-14, 14) | numbers),
    "runtime": either(st.floats(0, 1000) | numbers),
    "exception": either(st.sampled_from(["ValueError('x')", "mod.sub.CustomError: boom", "KeyError",
                                         "UnpickleableExceptionWrapper('app', 'Weird', (), \"Weird()\")",
                                         "", "(((", "x" * 5000])),
    "routing_key": either(st.sampled_from(["celery", "q1", "q\n2"])),
    "queue": either(st.sampled_from(["celery", "q1"])),
    "eta": either(st.sampled_from(["2030-11-14T22:13:20+00:00", "2020-11-14T22:13:20", "0001-01-01T00:00:00+14:00",
                                   "9999-12-31T23:59:59-14:00", "not a date"])),
    "freq": either(st.floats(0, 10) | numbers),
    "active": either(st.integers(0, 10) | numbers),
    "processed": either(st.integers(0, 1000) | numbers),
    "pid": either(st.integers(1, 99999) | numbers),
    "sw_ident": either(st.just("py-celery")),
    "sw_ver": either(st.just("5.4.0")),
    "sw_sys": either(st.just("Linux")),
    "clock": either(st.integers(0, 10 ** 6)),
    "retries": either(st.integers(0, 5)),
    "result": json_value,
    "traceback": either(st.just("Traceback (most recent call last):\n ...")),
}
KNOWN_TYPES = sorted(ClusterState()._handlers)
event_type = st.sampled_from(KNOWN_TYPES) | hostile_text | json_value
event = st.fixed_dictionaries({"type": event_type}, optional=FIELDS) | st.dictionaries(st.text(max_size=8), json_value,
                                                                                       max_size=4)
events = st.lists(event | json_value, max_size=20)


# ------------------------------------------------------------------ helpers

def fresh_state() -> ClusterState:
    return ClusterState(utcoffset=0.0, max_tracked_tasks=8, runtime_buckets=(0.1, 1, 10),
                        queue_wait_buckets=(0.1, 1, 10))


def apply_all(state: ClusterState, items, now: float | None = None) -> None:
    """Apply at the real clock's now: rendering expires workers against it."""
    now = time.time() if now is None else now
    for i, item in enumerate(items):
        state.apply(item, now + i * 0.01)


def render(state: ClusterState) -> tuple[str, str]:
    collector = StateCollector(state, [], prefix="celery_")  # the production renderer, both formats
    return collector.render(), collector.render(openmetrics=True) + "# EOF\n"


def parse(text: str) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


MONOTONIC_AREAS = ("celery_health_exporter.metrics.tasks", "celery_health_exporter.metrics.exporter_self")


def counters(state: ClusterState) -> dict:
    """Every counter and histogram count of the task and self areas, straight from collect()."""
    ctx = ScrapeContext(state, [], NOW)
    out = {}
    for area in AREAS:
        if area.__name__ not in MONOTONIC_AREAS:
            continue
        for definition, labels, value in expand_columns(area.collect(ctx)):
            if definition.kind == "counter":
                out[(definition.name, tuple(labels))] = value
            elif definition.kind == "histogram":
                out[(definition.name, tuple(labels))] = value.count
    return out


def assert_round_trip(state: ClusterState, text: str) -> None:
    """Every worker and every flow of the state comes back from the parser with exactly its label values."""
    samples = parse(text)
    for hostname, worker in state.workers.items():
        assert ("celery_worker_up", (("hostname", hostname),)) in samples, hostname
        for (name, queue), flow in worker.flows.items():
            key = ("celery_task_received_total", (("hostname", hostname), ("name", name), ("queue_name", queue)))
            assert samples[key] == flow.received, key
    for (name, publisher, queue), count in state.sent.items():
        key = ("celery_task_sent_total", (("hostname", publisher), ("name", name), ("queue_name", queue)))
        assert samples[key] == count


# ------------------------------------------------------------------ properties


@SETTINGS
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode)
       | json_value.map(lambda v: json.dumps(v).encode()) | events.map(lambda v: json.dumps(v).encode()))
def test_decode_body_returns_a_list_or_says_why_not(body):
    try:
        decoded = decode_body(body)
    except MalformedEvent as exc:
        assert exc.reason in ("json", "not_an_object")
    else:
        assert isinstance(decoded, list)


@SETTINGS
@given(events)
def test_any_events_apply_without_raising_and_render_valid_exposition(items):
    state = fresh_state()
    body = json.dumps(items).encode()  # what the broker delivers, NaN and lone surrogates included
    decoded = decode_body(body)
    apply_all(state, decoded)
    text, openmetrics = render(state)
    assert_round_trip(state, text)
    assert list(parse_openmetrics(openmetrics))  # the stricter parser accepts it too
    malformed = sum(v for k, v in parse(text).items() if k[0] == "celery_exporter_events_malformed_total")
    assert malformed == sum(state.malformed.values())
    for worker in state.workers.values():  # label values stay printable and short
        assert worker.hostname.isprintable() and len(worker.hostname) <= MAX_LABEL_LENGTH
    assert state.tracked_tasks <= 8


@SETTINGS
@given(events)
def test_counters_never_go_backwards_whatever_the_order(items):
    state = fresh_state()
    before = counters(state)
    for i, item in enumerate(items):
        state.apply(item, NOW + i)
        after = counters(state)
        for key, value in before.items():
            assert key in after, f"series {key} disappeared after {item!r}"
            assert after[key] >= value, f"{key} went from {value} to {after[key]} after {item!r}"
        before = after


@SETTINGS
@given(st.permutations(["task-sent", "task-received", "task-started", "task-succeeded"]), st.integers(1, 3))
def test_a_task_lifecycle_in_any_order_and_repeated_is_counted_per_event(order, repeat):
    """Events of one task can arrive out of order (workers batch them) and a task can run
    twice (redelivered after a worker died with acks_late): each event counts once, and
    a duplicate is indistinguishable from a re-execution, so it counts too."""
    state = fresh_state()
    base = {"uuid": "u-1", "hostname": "celery@a", "name": "tasks.add", "routing_key": "q1", "runtime": 0.5,
            "timestamp": NOW, "utcoffset": 0}
    apply_all(state, [dict(base, type=kind) for kind in order] * repeat)
    m = parse(render(state)[0])
    assert m[("celery_task_sent_total", (("hostname", "a"), ("name", "tasks.add"), ("queue_name", "q1")))] == repeat
    flows = {k: v for k, v in m.items() if k[0].startswith("celery_task_") and k[0].endswith("_total")
             and ("hostname", "celery@a") in k[1]}
    by_kind = {}
    for (metric, labels), value in flows.items():
        by_kind[metric] = by_kind.get(metric, 0) + value
    for kind in ("received", "started", "succeeded"):
        assert by_kind[f"celery_task_{kind}_total"] == repeat, (kind, flows)
    assert state.tracked_tasks <= 1


# ------------------------------------------------------------------ named hostile cases


def test_malformed_bodies_are_counted_by_reason():
    for body, reason in ((b"{not json", "json"), (b"\xff\xfe", "json"), (b"42", "not_an_object"),
                         (b'"a string"', "not_an_object"), (b"", "json")):
        with pytest.raises(MalformedEvent) as err:
            decode_body(body)
        assert err.value.reason == reason
    state = fresh_state()
    apply_all(state, [[], 7, None, {"no": "type"}, {"type": ""}, {"type": 5},
                      {"type": "task-succeeded", "hostname": "celery@a"},  # missing uuid
                      {"type": "worker-heartbeat"}])  # missing hostname
    assert state.malformed == {"not_an_object": 3, "missing_type": 3, "missing_uuid": 1, "missing_hostname": 1}


def test_an_event_type_that_is_not_valid_unicode_does_not_break_metrics():
    state = fresh_state()
    apply_all(state, decode_body(b'{"type": "\\ud800lone"}'))
    m = parse(render(state)[0])
    assert m[("celery_exporter_events_total", (("type", "?lone"),))] == 1


def test_a_one_megabyte_exception_repr_gives_a_short_label():
    state = fresh_state()
    megabyte = 2 ** 20
    apply_all(state, [
        {"type": "task-failed", "uuid": "u-1", "hostname": "celery@a", "exception": "ValueError('" + "x" * megabyte + "')"},
        {"type": "task-failed", "uuid": "u-2", "hostname": "celery@a", "exception": "A" * megabyte},
        {"type": "task-failed", "uuid": "u-3", "hostname": "celery@a", "exception": "(" * megabyte},
    ])
    text = render(state)[0]
    assert len(text) < 50_000
    failed = {dict(labels)["exception"]: v for (name, labels), v in parse(text).items()
              if name == "celery_task_failed_total"}
    assert failed == {"ValueError": 1, "A" * MAX_LABEL_LENGTH: 1, "unknown": 1}


def test_unicode_quotes_backslashes_and_newlines_in_names_and_hostnames():
    hostile_host = 'celery@hôst "quoted" \\ back\nslash\t\u2028日本'
    hostile_name = 'tâsk.\\"name"\n2🐍'
    state = fresh_state()
    apply_all(state, [
        {"type": "worker-heartbeat", "hostname": hostile_host, "active": 1, "freq": 2},
        {"type": "task-received", "uuid": "u-1", "hostname": hostile_host, "name": hostile_name,
         "routing_key": "q\n1"},
    ])
    text, openmetrics = render(state)
    expected_host, expected_name = clean_label(hostile_host), clean_label(hostile_name)
    assert expected_host == 'celery@hôst "quoted" \\ back?slash??日本'
    assert expected_name == 'tâsk.\\"name"?2🐍'
    m = parse(text)
    assert m[("celery_worker_up", (("hostname", expected_host),))] == 1
    assert m[("celery_task_received_total", (("hostname", expected_host), ("name", expected_name),
                                             ("queue_name", "unknown")))] == 1
    om = {(s.name, tuple(sorted(s.labels.items()))) for f in parse_openmetrics(openmetrics) for s in f.samples}
    assert ("celery_worker_up", (("hostname", expected_host),)) in om
    assert "\n" not in "".join(k for key in m for k in dict(key[1]).values())


def test_negative_zero_and_absurd_timestamps_do_not_skew_the_lag():
    state = fresh_state()
    apply_all(state, [{"type": "worker-heartbeat", "hostname": "celery@a", "timestamp": ts, "utcoffset": offset}
                      for ts, offset in ((-5.0, 0), (0, 0), (float("nan"), 0), ("yesterday", 0), (NOW, "x"),
                                         (NOW, 1e300), (1e300, 0))])
    assert state.workers["celery@a"].up
    lag = state.event_lag
    assert math.isfinite(lag.sum) and lag.sum < 3600  # seconds since this module was imported
    # only (NOW, "x") and (NOW, 1e300) carry a usable timestamp, with the exporter's own utcoffset
    assert lag.count == 2
    assert state.malformed == {"bad_timestamp": 5, "bad_utcoffset": 2}
    m = parse(render(state)[0])
    assert m[("celery_exporter_event_lag_seconds_count", ())] == 2
    assert m[("celery_exporter_events_malformed_total", (("reason", "bad_timestamp"),))] == 5


def test_wrong_types_in_every_field_of_a_success_still_count_the_success():
    state = fresh_state()
    apply_all(state, [{"type": "task-succeeded", "uuid": "u-1", "hostname": "celery@a", "runtime": "12.5",
                       "timestamp": "now", "utcoffset": [], "name": {"x": 1}, "routing_key": 3, "eta": 5,
                       "freq": "fast", "pid": "one", "result": {"deep": [1, 2, {"x": None}]}}])
    m = parse(render(state)[0])
    labels = (("hostname", "celery@a"), ("name", "unknown"), ("queue_name", "unknown"))
    assert m[("celery_task_succeeded_total", labels)] == 1
    assert m[("celery_task_runtime_count", labels)] == 0  # a string runtime is not observed


def test_events_for_unknown_tasks_count_under_unknown():
    state = fresh_state()
    apply_all(state, [{"type": kind, "uuid": f"never-seen-{kind}", "hostname": "celery@a"}
                      for kind in ("task-succeeded", "task-failed", "task-revoked", "task-retried")])
    m = parse(render(state)[0])
    labels = (("hostname", "celery@a"), ("name", "unknown"), ("queue_name", "unknown"))
    assert [m[(f"celery_task_{k}_total", labels)] for k in ("succeeded", "revoked", "retried")] == [1, 1, 1]
    assert m[("celery_task_failed_total", (("exception", "unknown"),) + labels)] == 1
    assert state.tracked_tasks == 0
