from celery_health_exporter.http import REUSE_SECONDS, SharedRenders


def test_a_body_serves_long_enough_that_renders_take_a_twentieth_of_the_time_within_bounds():
    shared = SharedRenders()
    assert shared.reuse_for(0.1) == 2.0  # 25,000 task flows: 0.1 s of render, reused 2 s
    assert shared.reuse_for(0.004) == 0.08  # a small cluster: a fresh render almost every time
    assert shared.reuse_for(0.9) == REUSE_SECONDS[1]  # never older than a few seconds
