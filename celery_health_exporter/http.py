"""HTTP endpoints (aiohttp): /metrics, /healthz, /readyz and a small status page.

A scrape renders from memory only: it never waits on the broker.
"""
from __future__ import annotations

import asyncio
import gzip
import html
import time

from aiohttp import web
from prometheus_client.exposition import choose_encoder


def accepts_gzip(accept_encoding: str) -> bool:
    """``gzip`` (or ``*``) listed without ``q=0``."""
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip() in ("gzip", "*"):
            q = params.strip().removeprefix("q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return False
    return False


# A rendered body serves the scrapes that come soon after it too, for long enough that
# renders take at most RENDER_SHARE of the time however often the exporter is scraped (an HA
# pair, a scrape_interval of 1s, a curl loop): render_seconds / RENDER_SHARE, within
# REUSE_SECONDS. At 25,000 task flows a render takes ~0.1 s: a body serves 2 s; a small
# cluster's render of a few milliseconds serves a tenth of a second, so that what a scrape
# shows lags behind the model only where rendering is what costs. A Prometheus that scrapes
# every 15 s sees a body at most a few seconds old, as good as a new one.
RENDER_SHARE = 0.05
REUSE_SECONDS = (0.0, 5.0)


class SharedRenders:
    """One render serves every scrape of the same format that arrives while it is under way
    or within its reuse time after it finished: the CPU (and the GIL) a render would take
    again stays with event intake and the probes."""

    def __init__(self, share: float = RENDER_SHARE, reuse_seconds: tuple[float, float] = REUSE_SECONDS):
        self.share = share
        self.floor, self.ceiling = reuse_seconds
        self._pending: dict[tuple, asyncio.Future] = {}
        self._done: dict[tuple, tuple[float, float, bytes]] = {}  # key -> (finished, monotonic; seconds; body)

    async def get(self, key: tuple, render) -> bytes:
        done = self._done.get(key)
        if done is not None and time.monotonic() - done[0] < self.reuse_for(done[1]):
            return done[2]
        future = self._pending.get(key)
        if future is None:
            future = self._pending[key] = asyncio.ensure_future(asyncio.to_thread(self._timed, render))
            future.add_done_callback(lambda finished: self._finished(key, finished))
        # shielded: a scraper that hangs up does not cancel the render the others wait for
        return (await asyncio.shield(future))[1]

    @staticmethod
    def _timed(render) -> tuple[float, bytes]:
        started = time.monotonic()
        body = render()
        return time.monotonic() - started, body

    def _finished(self, key: tuple, future: asyncio.Future) -> None:
        self._pending.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self._done[key] = (time.monotonic(), *future.result())

    def reuse_for(self, render_seconds: float) -> float:
        return min(self.ceiling, max(self.floor, render_seconds / self.share))


async def metrics(request: web.Request) -> web.Response:
    exporter = request.app["exporter"]
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    openmetrics = content_type.startswith("application/openmetrics-text")
    # The state's families are written directly (fast); the process_* ones by
    # prometheus_client, whose OpenMetrics output ends with the one "# EOF".
    # Rendered in a thread, so that probes are answered while a large scrape is written.
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))

    def render() -> bytes:
        body = exporter.collector.render(openmetrics).encode() + encoder(exporter.registry)
        # Level 1: the exposition is so repetitive that it still shrinks ~20x, at a
        # fraction of the default level's time (aiohttp's own compression uses 6).
        return gzip.compress(body, compresslevel=1, mtime=0) if gzipped else body

    body = await request.app["renders"].get((openmetrics, gzipped), render)
    headers = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app["exporter"].ready
    return web.Response(text=reason + "\n", status=200 if ready else 503)


async def findings_json(request: web.Request) -> web.Response:
    """The diagnosis for chat-ops bots; schema in docs/findings.md."""
    exporter = request.app["exporter"]
    findings = await asyncio.to_thread(exporter.findings)  # takes the state lock: never on the loop
    return web.json_response({
        "version": exporter.version,
        "generated_at": time.time(),
        "problems": sum(1 for f in findings if f.severity != "info"),
        "findings": [f.as_dict() for f in findings],
    })


async def index(request: web.Request) -> web.Response:
    exporter = request.app["exporter"]
    now = time.time()
    findings, workers, tracked = await asyncio.to_thread(_page_state, exporter)  # the loop never takes the lock
    rows = []
    for source in exporter.sources:
        health = source.health
        seen = f"{now - health.last_success:.0f}s ago" if health.last_success else "never"
        rows.append(
            f"<tr><td>{html.escape(source.name)}</td>"
            f"<td class={'up' if health.up else 'down'}>{'up' if health.up else 'down'}</td>"
            f"<td>{html.escape(health.reason)}</td><td>{seen}</td>"
            f"<td>{html.escape(source.describe())}</td></tr>")
    cards = "\n".join(FINDING.format(
        severity=f.severity, summary=html.escape(f.summary), why=html.escape(f.why), fix=html.escape(f.fix),
        metric=html.escape(f.metric),
        alert=f" &middot; alert <code>{html.escape(f.alert)}</code>" if f.alert else "",
    ) for f in findings) or '<p class="ok">No problem found.</p>'
    page = PAGE.format(
        version=html.escape(exporter.version),
        broker=html.escape(exporter.config.masked_broker_url),
        rows="\n".join(rows), workers=workers, tracked=tracked, findings=cards,
        problems=sum(1 for f in findings if f.severity != "info"),
    )
    return web.Response(text=page, content_type="text/html")


def _page_state(exporter) -> tuple[list, int, int]:
    findings = exporter.findings()
    with exporter.state.lock:
        return findings, sum(1 for w in exporter.state.workers.values() if w.up), exporter.state.tracked_tasks


FINDING = """<section class="finding {severity}"><h3><span class="sev">{severity}</span> {summary}</h3>
<p><b>Why it matters:</b> {why}</p><p><b>Fix:</b> {fix}</p>
<p class="meta">metric <code>{metric}</code>{alert}</p></section>"""

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>celery-health-exporter</title>
<style>body{{font-family:system-ui,sans-serif;margin:1em auto;padding:0 1em;max-width:60em;line-height:1.4}}
table{{border-collapse:collapse;display:block;overflow-x:auto}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
.up{{color:#176b1f}}.down{{color:#b00020;font-weight:bold}}.ok{{color:#176b1f;font-weight:bold}}
.finding{{border-left:.4em solid #999;padding:.2em .8em;margin:.8em 0;background:#f7f7f7}}
.finding h3{{margin:.3em 0;font-size:1.05em}}.finding p{{margin:.3em 0}}.meta{{color:#555;font-size:.9em}}
.critical{{border-color:#b00020}}.warning{{border-color:#d98200}}.info{{border-color:#2a6ebb}}
.sev{{text-transform:uppercase;font-size:.75em;padding:.1em .4em;border-radius:.2em;background:#333;color:#fff}}
.critical .sev{{background:#b00020}}.warning .sev{{background:#d98200}}.info .sev{{background:#2a6ebb}}
code{{word-break:break-all}}</style>
</head><body>
<h1>celery-health-exporter</h1>
<p>Version {version} &middot; broker <code>{broker}</code> &middot; {workers} workers up &middot; {tracked} tasks in flight</p>
<h2>Findings ({problems} problems)</h2>
{findings}
<h2>Sources</h2>
<table><tr><th>source</th><th>state</th><th>reason</th><th>last success</th><th>reads</th></tr>
{rows}
</table>
<p><a href="/metrics">/metrics</a> &middot; <a href="/api/findings">/api/findings</a> &middot;
<a href="/healthz">/healthz</a> &middot; <a href="/readyz">/readyz</a></p>
</body></html>
"""


def make_web_app(exporter) -> web.Application:
    web_config = getattr(exporter.config, "web_config", None)
    if web_config is not None:  # --web-config-file: basic auth, client SANs, headers, rate limit
        from .web_config import middlewares

        app = web.Application(middlewares=middlewares(web_config))
    else:
        app = web.Application()
    app["exporter"] = exporter
    app["renders"] = SharedRenders()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/health", readyz)  # prometheus-exporter-celery's probe path: its chart's probes keep working
    app.router.add_get("/", index)
    app.router.add_get("/api/findings", findings_json)
    return app


async def serve(exporter, sock) -> web.AppRunner:
    runner = web.AppRunner(make_web_app(exporter), access_log=None, handle_signals=False)
    await runner.setup()
    web_config = getattr(exporter.config, "web_config", None)
    ssl_context = web_config.ssl_context if web_config is not None else None
    await web.SockSite(runner, sock, shutdown_timeout=1.0, ssl_context=ssl_context).start()
    return runner
