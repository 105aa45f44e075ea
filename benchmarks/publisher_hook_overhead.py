"""What ``celery_health_exporter.hooks.publisher.instrument(app)`` adds to each task publish.

    python -m benchmarks.publisher_hook_overhead
    python -m benchmarks.publisher_hook_overhead --calls 500000 --publishes 50000

Two measurements, each the median of ``--rounds`` interleaved rounds:

1. the hook alone: Celery's task sender replaced by a function that does
   nothing, called bare and through the hook's wrapper (the difference is all
   the hook does on the hot path: policy with the chained errback, per-publish
   retry bookkeeping, duration, counters under a lock);
2. end to end: ``app.send_task`` on kombu's in-memory transport (no network,
   so the hook's share is as large as it can get), without and with the hook.

Prints microseconds per publish and the difference.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from celery import Celery  # noqa: E402

from celery_health_exporter.hooks.publisher import PublisherHook  # noqa: E402


def make_app(name: str) -> Celery:
    app = Celery(name, broker="memory://", set_as_current=False)
    app.conf.update(result_backend=None, task_publish_retry=True)
    return app


def per_call_us(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000, help="wrapper calls per round")
    parser.add_argument("--publishes", type=int, default=20_000, help="send_task calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    # 1. the hook alone
    app = make_app("bench-hook")
    hook = PublisherHook(app, interval=3600, publisher="bench", flush_at_exit=False)

    def noop(producer, name, message, **kwargs):
        return None

    wrapped = hook.wrap(noop)
    hook._thread = object()  # no shipping thread during the measurement
    options = {"exchange": "", "routing_key": "celery", "retry": True, "retry_policy": None}
    bare = lambda: noop(None, "t", None, **options)  # noqa: E731
    hooked = lambda: wrapped(None, "t", None, **options)  # noqa: E731
    bare_us, hooked_us = [], []
    for _ in range(args.rounds):
        bare_us.append(per_call_us(bare, args.calls))
        hooked_us.append(per_call_us(hooked, args.calls))
    alone = statistics.median(hooked_us) - statistics.median(bare_us)
    assert hook.publishes == args.rounds * args.calls

    # 2. end to end on the memory transport
    plain, instrumented = make_app("bench-plain"), make_app("bench-instrumented")
    hook2 = PublisherHook(instrumented, interval=3600, publisher="bench", flush_at_exit=False).install()
    hook2._thread = object()
    for a in (plain, instrumented):  # warm up: connections, producer pool, sender
        for _ in range(200):
            a.send_task("bench.task", (1,), queue="bench")
    measured = {plain: [], instrumented: []}
    for i in range(2 * args.rounds):  # alternate which goes first; the in-memory queue (shared) emptied each time
        for a in ((plain, instrumented) if i % 2 == 0 else (instrumented, plain)):
            with a.connection_for_write() as conn:
                conn.default_channel.queue_purge("bench")
            measured[a].append(per_call_us(lambda: a.send_task("bench.task", (1,), queue="bench"),
                                           args.publishes))
    plain_us, instrumented_us = measured[plain], measured[instrumented]
    end_to_end = statistics.median(instrumented_us) - statistics.median(plain_us)
    assert hook2.publishes >= 2 * args.rounds * args.publishes

    print(f"hook alone ({args.calls:,} calls x {args.rounds} rounds): bare {statistics.median(bare_us):.3f} µs, "
          f"through the hook {statistics.median(hooked_us):.3f} µs -> +{alone:.2f} µs per publish")
    print(f"send_task on memory:// ({args.publishes:,} x {2 * args.rounds}): "
          f"without {statistics.median(plain_us):.1f} µs, with {statistics.median(instrumented_us):.1f} µs -> {end_to_end:+.2f} µs per publish "
          f"({end_to_end / statistics.median(plain_us):+.1%}; round-to-round stdev "
          f"{statistics.stdev(plain_us):.1f} / {statistics.stdev(instrumented_us):.1f} µs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
