"""Crediting RabbitMQ's queue drops from management API snapshots (pure, no broker)."""
from exporter.state.ingest import IngestStats


def lost(stats: IngestStats) -> int:
    return stats.lost_messages.get("queue_dropped_own", 0)


def test_a_drop_is_credited_only_when_two_snapshots_agree():
    stats = IngestStats()
    for dropped in (0, 40, 90):  # still moving: the broker's statistics lag behind
        stats.observe_queue_drops("own", dropped)
    assert lost(stats) == 0
    stats.observe_queue_drops("own", 90)
    assert lost(stats) == 90
    stats.observe_queue_drops("own", 95)
    stats.observe_queue_drops("own", 95)
    assert lost(stats) == 95


def test_a_single_low_snapshot_does_not_move_the_counter_back():
    stats = IngestStats()
    for dropped in (50, 50, 20, 50, 50):
        stats.observe_queue_drops("own", dropped)
    assert lost(stats) == 50


def test_drops_of_a_queue_declared_again_add_to_those_of_its_earlier_life():
    stats = IngestStats()
    for dropped in (120, 120):
        stats.observe_queue_drops("own", dropped)
    assert lost(stats) == 120
    # the queue expired and was declared again: the broker counts from zero
    for dropped in (0, 0, 30, 30):
        stats.observe_queue_drops("own", dropped)
    assert lost(stats) == 150
    for dropped in (45, 45):
        stats.observe_queue_drops("own", dropped)
    assert lost(stats) == 165


def test_roles_are_counted_apart():
    stats = IngestStats()
    for role, dropped in (("own", 10), ("shared", 7), ("own", 10), ("shared", 7)):
        stats.observe_queue_drops(role, dropped)
    assert stats.lost_messages == {"queue_dropped_own": 10, "queue_dropped_shared": 7}
