"""Event storm: real-format Celery events for N tasks over W workers and K task names.

Every event goes through Celery's own ``EventDispatcher`` (the class workers
use), so bodies, headers, routing keys and exchange are exactly what a worker
sends. ``--mode multi`` gives each worker a dispatcher with
``buffer_group={'task'}`` as prefork workers have: task events leave in
``task.multi`` JSON lists of ``--batch`` events; ``--mode single`` sends one
message per event. ``task-sent`` comes from a publisher dispatcher
(``gen<pid>@host``), unbuffered, as a web process would send it.

Each task: task-sent, task-received, task-started, then task-succeeded or
task-failed (``--fail`` share, with a traceback). A ``--retry`` share first
gets task-retried and a second round (task-sent, task-received,
task-started) before its outcome. Workers send worker-online at the start and
heartbeats every ``--heartbeat`` seconds.

    python -m benchmarks.storm --broker-url amqp://guest:guest@127.0.0.1:5672// --tasks 50000

Prints a JSON line ``{"start": <unix time>}`` when publishing starts, then one JSON line: what was sent (tasks, events, messages, outcomes) and how fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sys
import time
import uuid

from celery import Celery

TRACEBACK = (
    'Traceback (most recent call last):\n'
    '  File "/usr/lib/python3/dist-packages/celery/app/trace.py", line 453, in trace_task\n'
    '    R = retval = fun(*args, **kwargs)\n'
    '  File "/usr/lib/python3/dist-packages/celery/app/trace.py", line 736, in __protected_call__\n'
    '    return self.run(*args, **kwargs)\n'
    '  File "/srv/app/tasks.py", line 42, in {name}\n'
    '    raise {exc}("could not process item {i}")\n'
    '{exc}: could not process item {i}\n'
)
EXCEPTIONS = ("ValueError", "app.errors.UpstreamTimeout", "KeyError", "app.errors.ValidationFailed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker-url", required=True)
    p.add_argument("--tasks", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=20)
    p.add_argument("--names", type=int, default=50)
    p.add_argument("--queues", type=int, default=4)
    p.add_argument("--mode", choices=("single", "multi"), default="multi")
    p.add_argument("--batch", type=int, default=24, help="buffer_limit of the workers' dispatchers (Celery's default)")
    p.add_argument("--fail", type=float, default=0.05, help="share of tasks that fail")
    p.add_argument("--retry", type=float, default=0.05, help="share of tasks retried once before their outcome")
    p.add_argument("--rate", type=float, default=0.0, help="events per second; 0 = as fast as possible")
    p.add_argument("--heartbeat", type=float, default=2.0, help="seconds between worker heartbeats; 0 = none")
    p.add_argument("--in-flight", type=int, default=0,
                   help="tasks kept open (received+started, no outcome) until the end of the storm")
    p.add_argument("--no-finish", action="store_true", help="leave the --in-flight tasks open at the end")
    p.add_argument("--publish-batch", type=int, default=200,
                   help="messages per kombu publish batch (Producer.batch: one Redis pipeline); 1 = one by one")
    p.add_argument("--live", action="store_true",
                   help="publish each message as it is made, through kombu (slower: the publisher is the limit)")
    p.add_argument("--worker-prefix", default="storm-w")
    p.add_argument("--name-prefix", default="app.tasks.job")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args(argv)


class Storm:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.app = Celery("storm", broker=args.broker_url, set_as_current=False)
        self.app.conf.event_serializer = "json"
        if args.broker_url.startswith(("amqp", "pyamqp")):
            # py-amqp sets TCP_USER_TIMEOUT to 1 s: a blast that RabbitMQ holds back with
            # flow control for longer would be cut by the kernel (ETIMEDOUT).
            self.app.conf.broker_transport_options = {"socket_settings": {socket.TCP_USER_TIMEOUT: 300_000}}
        self.conn = self.app.connection_for_write()
        self.conn.ensure_connection(max_retries=3)
        host = socket.gethostname()
        multi = args.mode == "multi"
        self.publisher = self.app.events.Dispatcher(self.conn, hostname=f"gen{os.getpid()}@{host}")
        self.workers = [
            self.app.events.Dispatcher(self.conn, hostname=f"{args.worker_prefix}{i}@{host}",
                                       buffer_group={"task"} if multi else None, buffer_limit=args.batch)
            for i in range(args.workers)
        ]
        # One producer for all dispatchers keeps the storm's messages in the order
        # they were sent, also when kombu batches them (Redis: one pipeline).
        self.producer = self.publisher.producer
        for d in self.workers:
            d.producer = self.producer
        self.names = [f"{args.name_prefix}{i}" for i in range(args.names)]
        self.queues = [f"storm.q{i}" for i in range(max(1, args.queues))]
        self.processed = [0] * args.workers
        self.events = 0
        self.messages = 0
        self.outcomes = {"succeeded": 0, "failed": 0, "retried": 0}
        self._next_heartbeat = 0.0
        self._started = 0.0

    # -------------------------------------------------------------- sending
    def _send(self, dispatcher, type_, **fields):
        dispatcher.send(type_, **fields)
        self.events += 1
        rate = self.args.rate
        if rate and self.args.live and self.events % 50 == 0:
            ahead = self.events / rate - (time.perf_counter() - self._started)
            if ahead > 0:
                time.sleep(ahead)
        if self.args.live and self.args.heartbeat and self.events % 200 == 0:
            self._heartbeats()

    def _heartbeats(self, force=False):
        now = time.monotonic()
        if not force and now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.args.heartbeat
        for i, d in enumerate(self.workers):
            d.send("worker-heartbeat", freq=self.args.heartbeat or 2.0, active=1, processed=self.processed[i],
                   loadavg=[0.5, 0.4, 0.3], sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
            self.events += 1

    def _sent(self, task_id, name, queue, retries=0):
        self._send(self.publisher, "task-sent", uuid=task_id, root_id=task_id, parent_id=None, name=name,
                   args="(1, 2)", kwargs="{}", retries=retries, eta=None, expires=None, queue=queue,
                   exchange="", routing_key=queue)

    def _received_started(self, w, task_id, name, retries=0):
        d = self.workers[w]
        self._send(d, "task-received", uuid=task_id, name=name, args="(1, 2)", kwargs="{}", root_id=task_id,
                   parent_id=None, retries=retries, eta=None, expires=None)
        self._send(d, "task-started", uuid=task_id)

    def _finish(self, w, task_id, name, i, fail):
        d = self.workers[w]
        if fail:
            exc = self.rng.choice(EXCEPTIONS)
            self._send(d, "task-failed", uuid=task_id, exception=f"{exc}('could not process item {i}')",
                       traceback=TRACEBACK.format(name=name.rsplit('.', 1)[-1], exc=exc, i=i))
            self.outcomes["failed"] += 1
        else:
            self._send(d, "task-succeeded", uuid=task_id, result="'ok'", runtime=self.rng.random() * 0.5)
            self.outcomes["succeeded"] += 1
        self.processed[w] += 1

    def task(self, i, finish=True):
        a, rng = self.args, self.rng
        name = self.names[rng.randrange(len(self.names))]
        queue = self.queues[hash(name) % len(self.queues)]
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        w = rng.randrange(len(self.workers))
        self._sent(task_id, name, queue)
        self._received_started(w, task_id, name)
        if rng.random() < a.retry:
            self._send(self.workers[w], "task-retried", uuid=task_id,
                       exception="app.errors.UpstreamTimeout('try again')",
                       traceback=TRACEBACK.format(name=name, exc="UpstreamTimeout", i=i))
            self.outcomes["retried"] += 1
            w = rng.randrange(len(self.workers))
            self._sent(task_id, name, queue, retries=1)
            self._received_started(w, task_id, name, retries=1)
        fail = rng.random() < a.fail
        if finish:
            self._finish(w, task_id, name, i, fail)
            return None
        return (w, task_id, name, i, fail)

    def _batch(self):
        """kombu's own publish batching (a Redis pipeline; AMQP publishes at once)."""
        if self.args.publish_batch > 1 and not self.args.rate:  # a paced storm sends at once
            return self.producer.batch(max_size=self.args.publish_batch)
        return contextlib.nullcontext()

    def _all_tasks(self):
        a = self.args
        for d in self.workers:
            d.send("worker-online", freq=a.heartbeat or 2.0, sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
            self.events += 1
        open_tasks = [self.task(i, finish=False) for i in range(a.in_flight)]
        for i in range(a.in_flight, a.tasks):
            self.task(i)
        if not a.no_finish:
            for pending in open_tasks:
                self._finish(*pending)
        for d in self.workers:
            d.flush()
        return open_tasks

    # -------------------------------------------------------------- running
    def run(self):
        a = self.args
        if a.live:
            print(json.dumps({"start": time.time()}), flush=True)  # the runner's clock starts here
            self._started = time.perf_counter()
            capture = Capture(self.producer.channel, count_only=True)
            with capture, self._batch():
                open_tasks = self._all_tasks()
            publish_seconds = time.perf_counter() - self._started
            self._heartbeats(force=True)
            self.messages = capture.count
        else:
            # Render every message with Celery's dispatcher first (exact bytes), then
            # send them as fast as the broker takes them: the storm outpaces any consumer.
            rendering = time.perf_counter()
            self.producer.maybe_declare(self.publisher.exchange)  # a declare waits for its answer: not recorded
            capture = Capture(self.producer.channel)
            with capture:
                open_tasks = self._all_tasks()
            render_seconds = time.perf_counter() - rendering
            messages = capture.take()
            self.messages = len(messages)
            print(json.dumps({"start": time.time()}), flush=True)
            self._started = time.perf_counter()
            self._blast(capture, messages)
            publish_seconds = time.perf_counter() - self._started
        for d in self.workers + [self.publisher]:
            d.close()
        self.conn.release()
        result = {
            "tasks": a.tasks, "workers": a.workers, "names": a.names, "mode": a.mode,
            "events": self.events, "messages": self.messages, "outcomes": self.outcomes,
            "terminal": self.outcomes["succeeded"] + self.outcomes["failed"],
            "open_at_end": len(open_tasks) if a.no_finish else 0,
            "publish_seconds": round(publish_seconds, 3),
            "events_per_second": round(self.events / publish_seconds, 1) if publish_seconds else None,
        }
        if not a.live:
            result["render_seconds"] = round(render_seconds, 3)
        return result

    def _blast(self, capture, messages):
        a = self.args
        per_message = self.events / max(1, len(messages))
        chunk = 500
        self._next_heartbeat = time.monotonic() + (a.heartbeat or 1e9)
        for begin in range(0, len(messages), chunk):
            capture.send(messages[begin:begin + chunk])
            if a.heartbeat and time.monotonic() >= self._next_heartbeat:
                with capture:
                    self._heartbeats(force=True)
                capture.send(capture.take())
            if a.rate:
                ahead = (begin + chunk) * per_message / a.rate - (time.perf_counter() - self._started)
                if ahead > 0:
                    time.sleep(ahead)
        with capture:
            self._heartbeats(force=True)
        capture.send(capture.take())


class Capture:
    """Records what kombu is about to put on the wire, to send it later unchanged.

    Redis: the exact PUBLISH topic and payload kombu builds (``_put_fanout``);
    AMQP: the exact frames py-amqp writes for each ``basic.publish`` (method,
    header with properties and headers, body) on the storm's channel, written
    later to the same connection.
    """

    def __init__(self, channel, count_only=False):
        self.channel = channel
        self.redis = hasattr(channel, "_put_fanout")
        self.count_only = count_only
        self.count = 0
        self.messages = []
        self._client = None

    def __enter__(self):
        if self.count_only:
            if self.redis:
                self._orig = self.channel._put_fanout
                self.channel._put_fanout = self._counting(self._orig)
            else:
                self._orig = self.channel.basic_publish
                self.channel.basic_publish = self._counting(self._orig)
        elif self.redis:
            self._orig = self.channel._put_fanout
            self.channel._put_fanout = self._record_redis
        else:
            from amqp.method_framing import frame_writer

            connection = self.channel.connection
            self._orig = connection.frame_writer
            connection.frame_writer = frame_writer(connection, _Recorder(self.messages))
        return self

    def __exit__(self, *exc):
        if self.count_only:
            delattr(self.channel, "_put_fanout" if self.redis else "basic_publish")
        elif self.redis:
            del self.channel._put_fanout
        else:
            self.channel.connection.frame_writer = self._orig

    def _counting(self, fun):
        def counted(*args, **kwargs):
            self.count += 1
            return fun(*args, **kwargs)
        return counted

    def _record_redis(self, exchange, message, routing_key, **kwargs):
        from kombu.utils.json import dumps

        payload = dumps(message)
        for topic in self.channel._get_publish_topics(exchange, routing_key):
            self.messages.append((topic, payload))

    def take(self):
        taken = list(self.messages)
        self.messages.clear()  # the recorder keeps appending to this same list
        return taken

    def send(self, messages):
        if not messages:
            return
        if self.redis:
            if self._client is None:
                self._client = self.channel.client
            pipe = self._client.pipeline(transaction=False)
            for topic, payload in messages:
                pipe.publish(topic, payload)
            pipe.execute()
        else:
            self.channel.connection.transport.write(b"".join(messages))


class _Recorder:
    """Stands in for py-amqp's transport while rendering: keeps each publish's frames."""

    def __init__(self, out: list):
        self.out = out

    def write(self, data):
        self.out.append(bytes(data))


def main(argv=None):
    args = parse_args(argv)
    result = Storm(args).run()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
