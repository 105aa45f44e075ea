"""The demo's Celery app: a few tasks that succeed, fail, retry and take their time.

Broker from CELERY_BROKER_URL (default: the local Redis, database 14).
"""
import os
import random
import time

from celery import Celery

DEFAULT_BROKER = "redis://127.0.0.1:6379/14"

app = Celery("demo", broker=os.environ.get("CELERY_BROKER_URL", DEFAULT_BROKER))
app.conf.update(
    task_send_sent_event=True,        # celery_task_sent_total needs it
    worker_send_task_events=True,     # same as -E
    broker_connection_retry_on_startup=True,
    result_backend=None,
    task_routes={"demo.render_report": {"queue": "reports"}, "demo.legacy_sync": {"queue": "legacy"}},
)


class PaymentDeclined(Exception):
    pass


@app.task(name="demo.send_email")
def send_email(to):
    time.sleep(random.uniform(0.01, 0.2))
    return f"sent to {to}"


@app.task(name="demo.charge_card")
def charge_card(amount):
    time.sleep(random.uniform(0.05, 0.3))
    if random.random() < 0.2:
        raise PaymentDeclined(f"declined: {amount}")
    return amount


@app.task(name="demo.fetch_feed", bind=True, max_retries=2, default_retry_delay=1)
def fetch_feed(self, url):
    if random.random() < 0.3:
        raise self.retry(exc=ConnectionError(f"timeout fetching {url}"))
    return url


@app.task(name="demo.render_report")
def render_report(pages):
    time.sleep(pages * 0.1)
    return pages


@app.task(name="demo.legacy_sync")
def legacy_sync():
    """Routed to a queue no demo worker consumes: a black hole to find."""
