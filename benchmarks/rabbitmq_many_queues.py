"""One RabbitMQ poll with 2,000 queues: how long it takes, and whether memory stays flat over polls.

Runs against the RabbitMQ of this machine (AMQP 127.0.0.1:5672, management API
http://127.0.0.1:15672, guest/guest), in a vhost of its own that is deleted at
the end. Prints figures; asserts nothing (timing is not a unit test).

    python benchmarks/rabbitmq_many_queues.py [--queues 2000] [--polls 50]
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import psutil
from kombu import Connection

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery_health_exporter.broker import make_app  # noqa: E402
from celery_health_exporter.config import Config  # noqa: E402
from celery_health_exporter.metrics import StateCollector  # noqa: E402
from celery_health_exporter.sources.rabbitmq import RabbitMQSource  # noqa: E402
from celery_health_exporter.state.model import ClusterState  # noqa: E402
from tests.harness import RABBITMQ_API, make_amqp_broker, rabbitmq_api, wait_for  # noqa: E402


def mib(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queues", type=int, default=2000)
    parser.add_argument("--polls", type=int, default=50)
    args = parser.parse_args()

    broker = make_amqp_broker()
    try:
        started = time.monotonic()
        with Connection(broker.url) as conn:
            channel = conn.channel()
            for i in range(args.queues):
                name = f"bench-{i:05d}"
                channel.queue_declare(queue=name, durable=False, auto_delete=False)
                if i % 10 == 0:  # some with messages, so that message_stats are present too
                    channel.basic_publish(channel.prepare_message(b"x"), exchange="", routing_key=name)
        print(f"declared {args.queues} queues in {time.monotonic() - started:.1f}s")
        wait_for(lambda: rabbitmq_api("GET", f"/api/queues/{broker.vhost}?page=1&page_size=1&columns=name")
                 ["total_count"] >= args.queues, 60, 1, message="queues listed by the API")

        config = Config(broker_url=broker.url, rabbitmq_management_url=RABBITMQ_API, broker_poll_interval=15)
        state = ClusterState()
        source = RabbitMQSource(config, state, make_app(config))
        process = psutil.Process()
        durations, rss = [], []
        for _ in range(args.polls):
            t0 = time.perf_counter()
            assert source.poll_once(), state.broker.reason
            durations.append(time.perf_counter() - t0)
            gc.collect()
            rss.append(process.memory_info().rss)
        source.close()
        assert len(state.broker.snapshot.queues) == args.queues, len(state.broker.snapshot.queues)

        collector = StateCollector(state, [source])
        t0 = time.perf_counter()
        body = collector.render().encode()  # the production renderer
        render = time.perf_counter() - t0

        pages = -(-args.queues // 500)
        print(f"queues reported:   {len(state.broker.snapshot.queues)} ({pages} pages of 500 + 1 connections + 1 whoami request)")
        print(f"poll time:         first {durations[0] * 1000:.0f} ms, median {statistics.median(durations) * 1000:.0f} ms,"
              f" max {max(durations) * 1000:.0f} ms over {args.polls} polls")
        print(f"RSS:               after poll 1 {mib(rss[0])}, after poll {min(10, len(rss))} "
              f"{mib(rss[min(10, len(rss)) - 1])}, after poll {len(rss)} {mib(rss[-1])} "
              f"(growth from poll 10 to the end: {mib(rss[-1] - rss[min(10, len(rss)) - 1])})")
        print(f"scrape render:     {render * 1000:.0f} ms, {len(body) / 1024:.0f} KiB of exposition")
    finally:
        broker.close()


if __name__ == "__main__":
    main()
