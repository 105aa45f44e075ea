"""The read path over real HTTP (loopback, no broker: the sources are built, not started):
the asyncio loop never takes the state lock, so probes answer while the lock is held
for as long as anything likes (a long event batch, a scrape's copy, a diagnosis)."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from tests.harness import http_get, wait_for

pytestmark = pytest.mark.integration


class WatchedLock:
    """The state lock, recording which threads acquire it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.threads: list[int] = []

    def acquire(self, *args, **kwargs):
        self.threads.append(threading.get_ident())
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


@pytest.fixture
def served():
    """An Exporter as the daemon builds it, its HTTP server on a loop in a thread of its own."""
    from celery_health_exporter.app import Exporter
    from celery_health_exporter.cli import config_from_args
    from celery_health_exporter.http import serve

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    config = config_from_args(["--broker-url", "redis://127.0.0.1:6379/15",
                               "--listen-address", "127.0.0.1:9"], env={})
    exporter = Exporter(config, sock)
    exporter.state.lock = WatchedLock()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner = {}

    def run():
        asyncio.set_event_loop(loop)
        runner["runner"] = loop.run_until_complete(serve(exporter, sock))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    exporter.web_app = runner["runner"].app
    yield exporter, base, thread.ident
    asyncio.run_coroutine_threadsafe(runner["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_no_endpoint_takes_the_state_lock_on_the_event_loop(served):
    exporter, base, loop_thread = served
    for path in ("/metrics", "/", "/api/findings", "/healthz", "/readyz"):
        status, _ = http_get(base + path, timeout=10)
        assert status in (200, 503), path
    lock = exporter.state.lock
    assert lock.threads, "the endpoints read the state"  # else this check could not fail
    assert loop_thread not in lock.threads


def test_probes_answer_while_the_state_lock_is_held(served):
    exporter, base, _ = served
    answers = {}

    def fetch(path):
        answers[path] = http_get(base + path, timeout=30)[0]

    with exporter.state.lock:  # as a huge event batch or a stuck reader would
        readers = [threading.Thread(target=fetch, args=(path,)) for path in ("/metrics", "/", "/api/findings")]
        for reader in readers:
            reader.start()
        wait_for(lambda: len(exporter.state.lock.threads) >= 4, 10, message="the readers wait for the lock")
        assert http_get(base + "/healthz", timeout=5)[0] == 200
        assert http_get(base + "/readyz", timeout=5)[0] in (200, 503)
        assert not answers  # the readers are still waiting: the probes did not need the lock
    for reader in readers:
        reader.join(30)
    assert answers == {"/metrics": 200, "/": 200, "/api/findings": 200}


def test_scrapes_that_arrive_during_a_render_or_just_after_share_it(served):
    exporter, base, _ = served
    renders, asked = [], []
    release = threading.Event()
    render = exporter.collector.render

    def slow_render(*args, **kwargs):
        renders.append(1)
        release.wait(30)  # a big cluster's render, still under way when the other scrapes come
        return render(*args, **kwargs)

    exporter.collector.render = slow_render
    shared = exporter.web_app["renders"]
    get = shared.get

    async def counted_get(key, fn):
        asked.append(key)
        return await get(key, fn)

    shared.get = counted_get
    bodies = []
    scrapers = [threading.Thread(target=lambda: bodies.append(http_get(base + "/metrics", timeout=30)))
                for _ in range(3)]
    for scraper in scrapers:
        scraper.start()
    wait_for(lambda: len(asked) == 3 and renders, 10, message="three scrapes asked, one render under way")
    release.set()
    for scraper in scrapers:
        scraper.join(30)
    assert len(renders) == 1
    assert [status for status, _ in bodies] == [200, 200, 200]
    assert bodies[0][1] == bodies[1][1] == bodies[2][1] and "celery_exporter_scrape_collector_success" in bodies[0][1]
    assert http_get(base + "/metrics", timeout=30)[1] == bodies[0][1]  # just after it: the same body
    assert len(renders) == 1
    shared.floor = shared.ceiling = 0
    http_get(base + "/metrics", timeout=30)
    assert len(renders) == 2  # later: a render of its own
