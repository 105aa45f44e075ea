"""The direct renderer writes exactly what prometheus_client's encoders write for the same families."""
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from exporter.metrics import StateCollector
from exporter.state.model import ClusterState

T0 = 1_700_000_000.0


@pytest.fixture
def collector():
    state = ClusterState(runtime_buckets=(0.1, 1, 10), queue_wait_buckets=(1,), utcoffset=0, now=T0)
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


def reference(collector, encoder):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
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
            for f in text_string_to_metric_families(text)]


@pytest.mark.parametrize("openmetrics, encoder", [(False, generate_latest), (True, generate_openmetrics)])
def test_direct_rendering_matches_prometheus_client(collector, openmetrics, encoder):
    ours = collector.render(openmetrics=openmetrics) + ("# EOF\n" if openmetrics else "")
    families = parsed(ours, openmetrics)
    assert families == parsed(reference(collector, encoder), openmetrics)
    assert len(families) >= 15 and sum(len(samples) for *_, samples in families) > 100
    # quotes and backslashes escaped (the model already turned the newline into "?")
    assert r'hostname="we\"ird\\host?name@h"' in ours
