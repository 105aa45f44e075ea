"""The direct renderer writes exactly what prometheus_client's encoders write for the same families."""
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.state.model import ClusterState

T0 = 1_700_000_000.0


@pytest.fixture
def collector():
    state = ClusterState(runtime_buckets=(0.1, 1, 10), queue_wait_buckets=(1,), utcoffset=0)
    for i, host in enumerate(["w1@h", 'we"ird\\host\nname@h']):
        state.apply({"type": "worker-heartbeat", "hostname": host, "timestamp": T0, "utcoffset": 0, "freq": 2,
                     "active": 1, "processed": 3, "pid": 10 + i, "sw_ident": "py-celery", "sw_ver": "5.7.0",
                     "sw_sys": "Linux"}, T0)
        for n in range(3):
            uuid = f"{host}-{n}"
            state.apply({"type": "task-sent", "uuid": uuid, "name": f"app.t{n}", "queue": "q", "hostname": "g@h",
                         "timestamp": T0, "utcoffset": 0}, T0)
            state.apply({"type": "task-received", "uuid": uuid, "name": f"app.t{n}", "hostname": host,
                         "timestamp": T0, "utcoffset": 0}, T0)
            state.apply({"type": "task-started", "uuid": uuid, "hostname": host, "timestamp": T0 + 1,
                         "utcoffset": 0}, T0 + 1)
            state.apply({"type": "task-failed" if n == 2 else "task-succeeded", "uuid": uuid, "hostname": host,
                         "runtime": 0.5 * n, "exception": "ValueError('x')", "timestamp": T0 + 2,
                         "utcoffset": 0}, T0 + 2)
    return StateCollector(state, [], prefix="celery_", static_labels={"cluster": 'e"u'})


class _ReferenceCollector:
    """The test's oracle: the same snapshot as prometheus_client objects, for its encoders."""

    def __init__(self, collector):
        self.collector = collector

    def collect(self):
        families = {}
        static = self.collector.static_labels
        for definition, label_values, value in self.collector.samples():
            name = self.collector.prefix + definition.name
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, definition.help, definition.kind)
            labels = {**static, **dict(zip(definition.labels, label_values))}
            if definition.kind == "counter":
                family.add_sample(name + "_total", labels, value)
            elif definition.kind == "histogram":
                running = 0
                for bound, count in zip(value.bounds, value.counts):
                    running += count
                    family.add_sample(name + "_bucket", {**labels, "le": repr(float(bound))}, running)
                family.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, value.count)
                family.add_sample(name + "_count", labels, value.count)
                family.add_sample(name + "_sum", labels, value.sum)
            else:
                family.add_sample(name, labels, value)
        return iter(families.values())


def reference(collector, encoder):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_ReferenceCollector(collector))
    return encoder(registry).decode()


def parsed(text, openmetrics):
    """Families as (name, type, help, sorted samples): what a scraper understands, label order aside."""
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families
    else:
        from prometheus_client.parser import text_string_to_metric_families
    return [(f.name, f.type, f.documentation,
             sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in f.samples
                    if "heartbeat_age" not in s.name))  # ages move between the two renders
            for f in text_string_to_metric_families(text)
            if "_scrape_" not in f.name]  # and so do the scrapes' own timings


@pytest.mark.parametrize("openmetrics, encoder", [(False, generate_latest), (True, generate_openmetrics)])
def test_direct_rendering_matches_prometheus_client(collector, openmetrics, encoder):
    ours = collector.render(openmetrics=openmetrics) + ("# EOF\n" if openmetrics else "")
    families = parsed(ours, openmetrics)
    assert families == parsed(reference(collector, encoder), openmetrics)
    assert len(families) >= 15 and sum(len(samples) for *_, samples in families) > 100
    # quotes and backslashes escaped (the model already turned the newline into "?")
    assert r'hostname="we\"ird\\host?name@h"' in ours


def _run_tasks(state, hosts, names, now=T0):
    for host in hosts:
        state.apply({"type": "worker-heartbeat", "hostname": host, "timestamp": now, "utcoffset": 0, "freq": 2,
                     "active": 0, "processed": 0, "pid": 10}, now)
        for n, name in enumerate(names):
            uuid = f"{host}-{name}"
            base = {"uuid": uuid, "hostname": host, "timestamp": now, "utcoffset": 0}
            state.apply({**base, "type": "task-received", "name": name}, now)
            state.apply({**base, "type": "task-started", "timestamp": now + 1}, now + 1)
            state.apply({**base, "type": "task-succeeded", "runtime": 0.5 + n, "timestamp": now + 2}, now + 2)


def _families(text):
    from prometheus_client.parser import text_string_to_metric_families
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_histograms_without_hostname_are_one_series_per_name_and_queue_over_all_workers():
    per_worker = ClusterState(runtime_buckets=(1, 10), queue_wait_buckets=(1,), utcoffset=0)
    shared = ClusterState(runtime_buckets=(1, 10), queue_wait_buckets=(1,), utcoffset=0,
                          task_histograms_by_worker=False)
    for state in (per_worker, shared):
        _run_tasks(state, ["w1@h", "w2@h", "w3@h"], ["app.a", "app.b"])
    families = _families(StateCollector(shared, []).render())

    runtime = families["celery_task_runtime"].samples
    counts = {s.labels["name"]: s.value for s in runtime if s.name == "celery_task_runtime_count"}
    assert counts == {"app.a": 3, "app.b": 3}
    assert all("hostname" not in s.labels for s in runtime)
    assert {s.labels["queue_name"] for s in runtime} == {"unknown"}
    assert {s.labels["name"] for s in families["celery_task_queue_wait_time"].samples} == {"app.a", "app.b"}
    # the counters keep their hostname
    succeeded = families["celery_task_succeeded"].samples
    assert len(succeeded) == 6 and {s.labels["hostname"] for s in succeeded} == {"w1@h", "w2@h", "w3@h"}
    # findings read the same run times in both modes (shared histograms are not summed once per worker)
    assert shared.runtime_by_name() == per_worker.runtime_by_name() == {"app.a": (3, 1.5), "app.b": (3, 4.5)}

    by_worker = _families(StateCollector(per_worker, []).render())["celery_task_runtime"].samples
    assert len([s for s in by_worker if s.name.endswith("_count")]) == 6


def test_label_cache_forgets_series_that_are_gone():
    from celery_health_exporter.metrics.text import LabelCache

    cache = LabelCache({"cluster": "eu"})

    def text(names, values):
        table = cache.table(names)
        return table.get(values) or cache.add(table, names, values)

    for i in range(5000):
        assert text(("hostname",), (f"w{i}",)) == f'cluster="eu",hostname="w{i}"'
    cache.end_scrape(used=5000)
    assert cache._size == 5000  # everything was used in this scrape: kept
    text(("hostname",), ("w1",))
    cache.end_scrape(used=1)
    assert cache._size == 0  # the next scrape used one series of 5000: start over
    assert text(("hostname",), ('we"ird\n',)) == r'cluster="eu",hostname="we\"ird\n"'


def test_counter_columns_survive_percent_signs_and_new_flows_between_scrapes():
    state = ClusterState(runtime_buckets=(1,), queue_wait_buckets=(1,), utcoffset=0)
    _run_tasks(state, ["w1@h"], ["app.%d%s%%"])
    collector = StateCollector(state, [])
    first = _families(collector.render())["celery_task_succeeded"].samples
    assert [(s.labels["name"], s.value) for s in first] == [("app.%d%s%%", 1)]
    # same label sets, new values: the cached template is reused; a new flow rebuilds it
    _run_tasks(state, ["w1@h", "w2@h"], ["app.%d%s%%"], now=T0 + 10)
    again = _families(collector.render())["celery_task_succeeded"].samples
    assert sorted((s.labels["hostname"], s.value) for s in again) == [("w1@h", 2), ("w2@h", 1)]


@pytest.mark.parametrize("header, expected", [
    ("gzip", True), ("gzip, deflate", True), ("deflate, gzip;q=0.5", True), ("*", True),
    ("gzip;q=0", False), ("gzip; q=0.0", False), ("identity", False), ("", False), ("gzip;q=oops", False),
])
def test_gzip_only_when_the_scraper_accepts_it(header, expected):
    from celery_health_exporter.http import accepts_gzip

    assert accepts_gzip(header) is expected


def test_families_without_series_are_not_written():
    state = ClusterState(runtime_buckets=(1,), queue_wait_buckets=(1,), utcoffset=0)
    text = StateCollector(state, []).render()
    assert "celery_task_failed" not in text and "celery_task_runtime" not in text
    assert all(family.samples for family in _families(text).values())


def _values(text):
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_non_finite_value_that_reached_the_model_is_dropped_and_counted(collector, caplog):
    """The last line of defence: the readers keep NaN and infinities out of the model; if one got
    there anyway (set here behind their back), its sample is not served, the rest is."""
    import math

    from celery_health_exporter.state.queues import QueuesSnapshot, QueueStats

    state = collector.state
    clean = _values(collector.render())
    assert clean[("celery_exporter_nonfinite_samples_dropped_total", (("cluster", 'e"u'),))] == 0
    worker = state.workers["w1@h"]
    worker.start_time = float("nan")  # a gauge, one sample at a time
    worker.child_peak_rss = 10 ** 400  # an int Prometheus would read as +Inf
    state.event_lag.sum = float("inf")  # an unlabelled histogram
    flow = next(iter(worker.flows.values()))
    flow.runtime.sum = float("-inf")  # a histogram in a Column
    flow.succeeded = float("nan")  # a counter in a Column (not all ints: the slow path)
    other = next(iter(state.workers["we\"ird\\host?name@h"].flows.values()))
    other.received = 2 ** 1100  # an int counter in a Column: the fast path checks the range
    state.broker.configure(kind="amqp", broker="amqp://x")
    state.broker.replace(QueuesSnapshot({"q": QueueStats(ready=1, consumer_utilisation=float("nan"))}, T0))
    with caplog.at_level("WARNING", logger="celery_health_exporter.metrics"):
        first = collector.render()
        openmetrics = collector.render(openmetrics=True)
    values = _values(first)
    assert all(math.isfinite(v) for v in values.values())
    sample_lines = [line for line in first.splitlines() if not line.startswith("#")]
    assert not [line for line in sample_lines if line.rsplit(" ", 1)[1] in ("NaN", "+Inf", "-Inf")]
    host = (("cluster", 'e"u'), ("hostname", "w1@h"))
    assert ("celery_worker_start_time_seconds", host) not in values
    assert ("celery_worker_child_peak_rss_bytes", host) not in values
    assert ("celery_worker_up", host) in values  # the rest of the worker is served
    assert ("celery_exporter_event_lag_seconds_count", (("cluster", 'e"u'),)) not in values
    labels = tuple(sorted((("cluster", 'e"u'),) + tuple(zip(("name", "hostname", "queue_name"), flow.labels))))
    assert ("celery_task_runtime_count", labels) not in values and ("celery_task_succeeded_total", labels) not in values
    assert ("celery_task_received_total", labels) in values  # its other counters stay
    assert ("celery_queue_length", (("cluster", 'e"u'), ("queue_name", "q"))) in values
    assert ("celery_queue_consumer_utilisation", (("cluster", 'e"u'), ("queue_name", "q"))) not in values
    # counted: 7 per render, two renders; shown from the scrape after the one that dropped them
    assert collector.nonfinite_dropped == 14
    after = _values(collector.render())
    assert after[("celery_exporter_nonfinite_samples_dropped_total", (("cluster", 'e"u'),))] == 14
    assert collector.nonfinite_dropped == 21
    assert "celery_worker_start_time_seconds" in caplog.text  # logged once per family
    assert caplog.text.count("celery_worker_start_time_seconds") == 1
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    assert all(math.isfinite(s.value) for f in parse_openmetrics(openmetrics + "# EOF\n") for s in f.samples)


def test_no_garbage_collection_while_a_render_holds_its_samples(monkeypatch):
    import gc

    from celery_health_exporter import metrics

    seen = []
    real = metrics.render_families

    def watching(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics, "render_families", watching)
    collector = StateCollector(ClusterState(), [])
    assert gc.isenabled()
    collector.render()
    assert seen == [False] and gc.isenabled()  # paused for the render, back on after it
    with metrics._collection_paused:  # a render inside another one (two formats at once)
        collector.render()
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        collector.render()
        assert not gc.isenabled()  # a collector switched off by someone else stays off
    finally:
        gc.enable()
