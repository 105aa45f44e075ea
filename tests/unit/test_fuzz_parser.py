"""A coverage-guided fuzz run (atheris, libFuzzer) of the event parser and the state
model, kept as a test with a fixed budget and seed.

Each input is a raw message body (decode_body, then apply), a batch of events built
field by field from the fuzzer's bytes (known keys, any JSON type), or the bytes of a
Redis subscription: the production path of the events source on Redis (the hiredis
PubSubParser, fed in two pieces, then EventsSource._apply_redis_payload: the kombu
envelope, the content type, the body, the model). After each input the state is
rendered and parsed back with prometheus_client's parser. Anything but MalformedEvent
escaping (or ConnectionError from the RESP parser: a reconnect), or an exposition that
does not parse, is a crash; libFuzzer then exits non-zero with the input that did it.

Run longer by hand: ``python tests/unit/test_fuzz_parser.py -runs=1000000 -max_len=4096``.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUNS = 4000
SEED = 20240611
SEEDS = [
    {"type": "task-sent", "uuid": "u1", "name": "tasks.add", "routing_key": "celery", "timestamp": 1.7e9,
     "utcoffset": 0, "hostname": "gen1@web"},
    [{"type": "task-received", "uuid": "u1", "name": "tasks.add", "hostname": "celery@w1", "timestamp": 1.7e9},
     {"type": "task-started", "uuid": "u1", "hostname": "celery@w1", "timestamp": 1.7e9},
     {"type": "task-failed", "uuid": "u1", "hostname": "celery@w1", "exception": "ValueError('x')",
      "runtime": 0.1}],
    {"type": "worker-heartbeat", "hostname": "celery@w1", "freq": 2.0, "active": 1, "processed": 10,
     "sw_ident": "py-celery", "sw_ver": "5.4.0", "sw_sys": "Linux", "pid": 42, "timestamp": 1.7e9,
     "utcoffset": -1},
    {"type": "task-retried", "uuid": "u1", "hostname": "celery@w1",
     "exception": "UnpickleableExceptionWrapper('m', 'Err', (), \"Err()\")"},
]


BODY, SUBSCRIPTION = 1, 2  # the kinds of input (0: events built field by field)


def resp_seed(event) -> bytes:
    """A Redis pmessage carrying ``event`` in a kombu envelope, as the events source reads it."""
    body = base64.b64encode(json.dumps(event).encode()).decode()
    payload = json.dumps({"body": body, "content-type": "application/json",
                          "properties": {"body_encoding": "base64"}}).encode()
    parts = [b"pmessage", b"/0.celeryev/*", b"/0.celeryev/task.multi", payload]
    return b"*4\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def fuzz_main() -> None:  # pragma: no cover - runs in a subprocess under atheris
    import atheris

    # Coverage guidance on our parser and model only: instrumenting prometheus_client or
    # Celery would slow every run down for branches that are not ours.
    with atheris.instrument_imports(include=["celery_health_exporter.state"]):
        from celery_health_exporter.state.events import MalformedEvent, decode_body
        from celery_health_exporter.state.model import ClusterState
    from prometheus_client.parser import text_string_to_metric_families

    from celery_health_exporter.broker import make_app
    from celery_health_exporter.cli import config_from_args
    from celery_health_exporter.metrics import StateCollector
    from celery_health_exporter.sources.events import EventsSource
    from celery_health_exporter.sources.redis_wire import PubSubParser

    types = sorted(ClusterState()._handlers) + ["task.multi", ""]
    keys = ["type", "uuid", "hostname", "name", "timestamp", "utcoffset", "runtime", "exception", "routing_key",
            "queue", "eta", "freq", "active", "processed", "pid", "sw_ident", "sw_ver", "sw_sys", "clock"]
    now = time.time()
    config = config_from_args(["--broker-url", "redis://127.0.0.1:6379/0", "--listen-address", "127.0.0.1:9"],
                              env={})
    source = EventsSource(config, ClusterState(), make_app(config))  # never started: no I/O

    def value(fdp, depth=0):
        kind = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 5)
        if kind == 0:
            return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 40))
        if kind == 1:
            return fdp.ConsumeInt(8)
        if kind == 2:
            return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()  # NaN, inf too
        if kind == 3:
            return fdp.ConsumeBool()
        if kind == 4:
            return None
        if kind == 5:
            return now + fdp.ConsumeFloatInRange(-1e5, 1e5)
        if kind == 6:
            return fdp.PickValueInList(types)
        if kind == 7:
            return [value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        return {fdp.ConsumeUnicode(5): value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))}

    def one_input(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        state = ClusterState(utcoffset=0.0, max_tracked_tasks=8)
        kind = fdp.ConsumeIntInRange(0, 2)
        if kind == SUBSCRIPTION:
            cut = fdp.ConsumeIntInRange(0, 255)
            stream = fdp.ConsumeBytes(fdp.remaining_bytes())
            parser, payloads = PubSubParser(), []
            try:
                for piece in (stream[:cut], stream[cut:], b""):
                    payloads += parser.feed(piece)
            except ConnectionError:  # bytes that are not RESP: the events source reconnects
                pass
            source.state = state
            for payload in payloads:
                source._apply_redis_payload(payload)
            events = []
        elif kind == BODY:
            body = fdp.ConsumeBytes(fdp.remaining_bytes())
            try:
                events = decode_body(body)
            except MalformedEvent:
                return
        else:
            events = []
            for _ in range(fdp.ConsumeIntInRange(1, 12)):
                event = {"type": fdp.PickValueInList(types)}
                for _ in range(fdp.ConsumeIntInRange(0, 8)):
                    event[fdp.PickValueInList(keys)] = value(fdp)
                events.append(event)
        for i, event in enumerate(events):
            state.apply(event, now + i)
        text = StateCollector(state, [], prefix="celery_").render()  # the production renderer
        hostnames = {s.labels["hostname"] for f in text_string_to_metric_families(text) for s in f.samples
                     if f.name == "celery_worker_up"}
        if hostnames != set(state.workers):
            raise AssertionError(f"worker_up hostnames {hostnames!r} != state {set(state.workers)!r}")

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _atheris_available(), reason="atheris is not installed for this Python")
def test_fuzz_the_parser_and_the_model_with_a_fixed_budget(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        # FuzzedDataProvider takes integers from the end: the kind is the last byte
        (corpus / f"seed-{i}").write_bytes(json.dumps(seed).encode() + bytes([BODY]))
        (corpus / f"seed-redis-{i}").write_bytes(resp_seed(seed) + bytes([10, SUBSCRIPTION]))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, __file__, f"-runs={RUNS}", f"-seed={SEED}", "-max_len=2048", "-len_control=0",
         "-timeout=10",
         "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"the fuzzer found a crash:\n{output[-6000:]}"
    assert f"Done {RUNS} runs" in output, output[-3000:]
    assert not list(tmp_path.glob("crash-*"))
    # coverage-guided means it grew a corpus beyond the seeds: the run explored, it did not idle
    assert len(list(corpus.iterdir())) > 2 * len(SEEDS), output[-3000:]
    assert time.monotonic() - started < 90


if __name__ == "__main__":
    fuzz_main()
