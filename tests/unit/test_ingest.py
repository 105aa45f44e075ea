"""Crediting RabbitMQ's queue drops from management API snapshots (pure, no broker)."""
from celery_health_exporter.state.ingest import IngestStats


def lost(stats: IngestStats, role: str = "own") -> int:
    return stats.lost_messages.get(f"queue_dropped_{role}", 0)


def feed(stats: IngestStats, snapshots, role: str = "own") -> None:
    for published, dropped in snapshots:
        stats.observe_queue_drops(role, published, dropped)


def test_a_drop_is_credited_only_when_two_snapshots_agree():
    stats = IngestStats()
    feed(stats, [(100, 0), (200, 40), (300, 90)])  # still moving: the statistics lag behind
    assert lost(stats) == 0
    feed(stats, [(300, 90)])
    assert lost(stats) == 90
    feed(stats, [(320, 95), (320, 95)])
    assert lost(stats) == 95


def test_a_lower_figure_while_the_queue_lives_does_not_move_the_counter_back():
    stats = IngestStats()
    feed(stats, [(500, 100), (500, 100), (900, 60), (900, 60), (1200, 100), (1200, 100)])
    assert lost(stats) == 100


def test_drops_of_a_queue_declared_again_add_to_those_of_its_earlier_life():
    stats = IngestStats()
    feed(stats, [(1000, 120), (1000, 120)])
    assert lost(stats) == 120
    # the queue expired and was declared again: its publish counter starts from zero
    feed(stats, [(10, 0), (10, 0), (300, 30), (300, 30)])
    assert lost(stats) == 150
    feed(stats, [(400, 45), (400, 45)])
    assert lost(stats) == 165


def test_roles_are_counted_apart():
    stats = IngestStats()
    feed(stats, [(50, 10), (50, 10)], role="own")
    feed(stats, [(70, 7), (70, 7)], role="shared")
    assert stats.lost_messages == {"queue_dropped_own": 10, "queue_dropped_shared": 7}
