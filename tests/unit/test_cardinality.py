"""Cardinality caps: past its cap a label's new values fold into `other`, counted per label."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_health_exporter.cli import config_from_args
from celery_health_exporter.metrics import StateCollector
from celery_health_exporter.state.cardinality import OTHER, CardinalityCaps, LabelCap
from celery_health_exporter.state.model import ClusterState


def test_values_keep_their_slot_and_newcomers_past_the_cap_fold():
    cap = LabelCap("hostname", 2)
    assert [cap.fold(v) for v in ("a", "b", "a", "c", "b", "d", "c")] == ["a", "b", "a", OTHER, "b", OTHER, OTHER]
    assert cap.folded == 3 and len(cap) == 2 and cap.values == {"a", "b"}


def test_other_and_unknown_never_take_a_slot():
    cap = LabelCap("name", 1)
    assert [cap.fold("unknown"), cap.fold(OTHER), cap.fold("x"), cap.fold("unknown")] == ["unknown", OTHER, "x",
                                                                                            "unknown"]
    assert cap.folded == 0 and len(cap) == 1


def test_forget_frees_a_slot_for_the_next_value():
    cap = LabelCap("hostname", 1)
    cap.fold("old@host")
    assert cap.fold("new@host") == OTHER
    cap.forget("old@host")
    cap.forget("never-seen")  # harmless
    assert cap.fold("new@host") == "new@host" and cap.fold("old@host") == OTHER
    assert cap.folded == 2


def test_admits_tells_without_taking_or_counting():
    cap = LabelCap("queue_name", 1)
    assert cap.admits("q1") and len(cap) == 0
    cap.fold("q1")
    assert cap.admits("q1") and not cap.admits("q2") and cap.admits(OTHER)
    assert cap.folded == 0


def test_a_flood_of_ten_thousand_names_keeps_the_set_bounded():
    cap = LabelCap("hostname", 1000)
    folded = [cap.fold(f"celery@worker-{i}") for i in range(10_000)]
    assert len(cap.values) == 1000 and cap.folded == 9000
    assert folded.count(OTHER) == 9000 and folded[:1000] == [f"celery@worker-{i}" for i in range(1000)]


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError):
        LabelCap("name", 0)


def test_caps_come_from_the_flags_with_sane_defaults():
    defaults = CardinalityCaps.from_config(config_from_args(["--broker-url", "redis://h"]))
    assert [(c.label, c.limit) for c in defaults] == [("name", 1000), ("hostname", 1000), ("queue_name", 1000),
                                                       ("exception", 200), ("publisher", 1000)]
    config = config_from_args(["--broker-url", "redis://h", "--max-task-names", "5", "--max-workers", "6",
                               "--max-queues", "7", "--max-exceptions", "8", "--max-publishers", "9"])
    assert [c.limit for c in CardinalityCaps.from_config(config)] == [5, 6, 7, 8, 9]


@pytest.mark.parametrize("flag", ["--max-task-names", "--max-workers", "--max-queues", "--max-exceptions",
                                  "--max-publishers"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_cap_flags_name_the_flag(flag, value, capsys):
    from celery_health_exporter.cli import main

    assert main(["--broker-url", "redis://h", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err


def test_folds_are_exposed_per_label_from_zero():
    state = ClusterState()
    state.cardinality = CardinalityCaps(workers=2)  # what ClusterState will hold once the model is wired
    collector = StateCollector(state, [], prefix="celery_")

    def samples():
        text = collector.render()
        return {(s.name, s.labels.get("label")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("celery_exporter_label_values")}

    assert samples()[("celery_exporter_label_values_folded_total", "hostname")] == 0
    for host in ("a", "b", "c", "d"):
        state.cardinality.hostname.fold(host)
    got = samples()
    assert got[("celery_exporter_label_values_folded_total", "hostname")] == 2
    assert got[("celery_exporter_label_values", "hostname")] == 2
    assert got[("celery_exporter_label_values_folded_total", "exception")] == 0
    assert len([k for k in got if k[0] == "celery_exporter_label_values_folded_total"]) == 5
