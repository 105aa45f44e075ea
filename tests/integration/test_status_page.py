"""The live status page and /api/findings during a real failure, checked in a real (headless) browser."""
import os
import shutil
import subprocess
import uuid

import pytest

from tests.apps.testapp import client
from tests.harness import ROOT, make_redis_broker, wait_for

pytestmark = pytest.mark.integration
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def chromium(tmp_path, *args):
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is needed for the browser test (.ci/run installs it)"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, timeout=90)


def test_status_page_names_the_failure_live_in_a_browser(make_exporter, make_worker, tmp_path):
    broker = make_redis_broker()
    exporter = make_exporter(broker.url, "--broker-poll-interval", "1", "--inspect-interval", "1")
    worker = make_worker(broker.url, "page", queues="default")
    wait_for(lambda: exporter.scrape().value("celery_worker_up", hostname=worker.hostname) == 1, 30,
             message="worker up")
    status, page = exporter.get("/")
    assert status == 200 and "No problem found." in page

    black_hole = f"legacy-{uuid.uuid4().hex[:4]}"
    publisher = client(broker.url)
    for _ in range(4):
        publisher.send_task("tests.add", (1, 1), queue=black_hole)
    expected = f"Queue {black_hole} holds 4 ready message(s) and no worker consumes it."

    def listed():
        import json

        status, body = exporter.get("/api/findings")
        data = json.loads(body)
        return status == 200 and any(f["summary"] == expected for f in data["findings"]) and data
    data = wait_for(listed, 20, message="finding in /api/findings")
    finding = next(f for f in data["findings"] if f["summary"] == expected)
    assert finding["severity"] == "critical" and finding["alert"] == "CeleryQueueWithoutConsumers"
    assert set(finding) == {"id", "kind", "severity", "subject", "summary", "why", "fix", "metric", "alert"}
    assert data["problems"] >= 1 and data["version"]

    url = exporter.base + "/"
    dom = chromium(tmp_path, "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout.decode()
    assert expected in text and "Start a worker with -Q " + black_hole in text and "CRITICAL" in text.upper()
    shot = tmp_path / "status.png"
    result = chromium(tmp_path, f"--screenshot={shot}", "--window-size=412,1100", url)  # a phone's width
    assert result.returncode == 0 and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SAVE_STATUS_SCREENSHOT"):  # how docs/status-page.png is made
        shutil.copy(shot, ROOT / "docs" / "status-page.png")
    broker.close()
