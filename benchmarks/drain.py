"""The ceiling: a plain kombu consumer of the ``celeryev`` exchange that only counts and acks.

It binds a queue of its own with routing key ``#`` (RabbitMQ: the same queue
arguments as the exporter's, so nothing expires under it; Redis: pub/sub, as
every event consumer), lets kombu decode each body, counts messages, events
(a ``task.multi`` body is a list) and terminal task events, and acks.
It prints ``ready`` when consuming and one JSON line of counts on SIGTERM.

    python -m benchmarks.drain --broker-url redis://127.0.0.1:6379/15
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
import uuid

from celery.events.event import get_exchange
from kombu import Connection, Consumer, Queue

TERMINAL = {"task-succeeded", "task-failed"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker-url", required=True)
    p.add_argument("--prefetch", type=int, default=1000)
    p.add_argument("--no-ack", action="store_true", help="consume without acks (as the exporter does)")
    args = p.parse_args(argv)

    counts = {"messages": 0, "events": 0, "terminal": 0}
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))

    def on_body(body, message):
        counts["messages"] += 1
        if isinstance(body, list):
            counts["events"] += len(body)
            for event in body:
                if event.get("type") in TERMINAL:
                    counts["terminal"] += 1
        else:
            counts["events"] += 1
            if body.get("type") in TERMINAL:
                counts["terminal"] += 1
        if not args.no_ack:
            message.ack()

    with Connection(args.broker_url) as conn:
        conn.ensure_connection(max_retries=3)
        channel = conn.channel()
        exchange = get_exchange(conn)
        name = f"celeryev.drain.{uuid.uuid4().hex[:8]}"
        if conn.transport.driver_type == "amqp":
            queue = Queue(name, exchange=exchange, routing_key="#", durable=False, auto_delete=True,
                          message_ttl=120, expires=300, max_length=1_000_000)
        else:
            queue = Queue(name, exchange=exchange, routing_key="#", durable=False, auto_delete=True)
        consumer = Consumer(channel, queues=[queue(channel)], callbacks=[on_body], no_ack=args.no_ack,
                            accept=["json"])
        if not args.no_ack and conn.transport.driver_type == "amqp":
            consumer.qos(prefetch_count=args.prefetch)
        consumer.consume()
        print("ready", flush=True)
        try:
            while not stopping:
                try:
                    conn.drain_events(timeout=0.5)
                except socket.timeout:
                    pass
        except conn.connection_errors as exc:  # e.g. Redis's pubsub output buffer limit
            counts["dropped_by_broker"] = f"{type(exc).__name__}: {exc}"
            while not stopping:
                time.sleep(0.1)
            print(json.dumps(counts), flush=True)
            return 0
        try:
            consumer.cancel()
        except Exception:
            pass
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
