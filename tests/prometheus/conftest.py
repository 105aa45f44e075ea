"""A real Prometheus (Debian's /usr/bin/prometheus) for the tests of tests/prometheus.

`prometheus` is a session-scoped fixture: a Prometheus on a free 127.0.0.1 port with a temporary
storage dir, loading the rule files and scraping the targets of a `PrometheusConfig`. By default
it loads nothing and scrapes nothing (enough to parse queries). Other tests choose their own
configuration by indirect parametrisation:

    @pytest.mark.parametrize(
        "prometheus",
        [PrometheusConfig(rule_files=[ALERTS_FILE], scrape_targets=["127.0.0.1:9808"],
                          scrape_interval="1s", evaluation_interval="1s")],
        indirect=True,
    )
    def test_x(prometheus): ...

or start as many servers as they need with `prometheus_factory(config)`; every server started
is stopped at the end of the session. `override_rules()` writes a copy of a rule file with
shorter `for:` durations (and any expression overrides) for end-to-end tests.

Alertmanager (Debian's /usr/bin/prometheus-alertmanager): `alertmanager_factory(config)` starts
one on a free 127.0.0.1 port with its own storage dir and no cluster gossip; `shipped_alertmanager_config()`
is deploy/prometheus/alertmanager.yml with only the receiver URLs and the timings replaced;
`webhook` is a webhook receiver (an HTTP server on a free port, in a thread) that keeps every
notification; `PrometheusConfig(alertmanagers=[am.address])` makes Prometheus send its alerts there.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
ALERTS_FILE = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULE_TESTS_DIR = REPO_ROOT / "deploy" / "prometheus" / "tests"
GRAFANA_DIR = REPO_ROOT / "grafana"
RUNBOOKS_FILE = REPO_ROOT / "docs" / "runbooks.md"
ALERTMANAGER_FILE = REPO_ROOT / "deploy" / "prometheus" / "alertmanager.yml"

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL_BIN = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool") or "/usr/bin/promtool"
ALERTMANAGER_BIN = (os.environ.get("ALERTMANAGER_BIN") or shutil.which("prometheus-alertmanager")
                    or "/usr/bin/prometheus-alertmanager")
AMTOOL_BIN = os.environ.get("AMTOOL_BIN") or shutil.which("amtool") or "/usr/bin/amtool"


def _require(binary: str, package: str = "prometheus") -> str:
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} not found: install Debian's `{package}` package (apt-get install {package})")
    return binary


@pytest.fixture(scope="session")
def promtool() -> str:
    return _require(PROMTOOL_BIN)


@pytest.fixture(scope="session")
def amtool() -> str:
    return _require(AMTOOL_BIN, "prometheus-alertmanager")


@dataclass(frozen=True)
class PrometheusConfig:
    """What a test Prometheus loads and scrapes."""

    rule_files: Sequence[str | os.PathLike] = ()
    scrape_targets: Sequence[str] = ()  # "host:port" of the exporters to scrape
    scrape_interval: str = "15s"
    evaluation_interval: str = "15s"
    job: str = "celery-exporter"
    metrics_path: str = "/metrics"
    extra_flags: Sequence[str] = ()
    # static labels put on every scraped target (e.g. cluster / namespace, as a Kubernetes
    # service discovery would), and further raw scrape_configs entries
    target_labels: Mapping[str, str] = field(default_factory=dict)
    extra_scrape_configs: Sequence[Mapping[str, Any]] = ()
    alertmanagers: Sequence[str] = ()  # "host:port" of the Alertmanagers that get the alerts


class PrometheusError(Exception):
    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(f"HTTP {status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config_yaml(config: PrometheusConfig) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "global": {"scrape_interval": config.scrape_interval, "evaluation_interval": config.evaluation_interval},
        "rule_files": [str(Path(f).resolve()) for f in config.rule_files],
        "scrape_configs": [],
    }
    if config.scrape_targets:
        static: dict[str, Any] = {"targets": list(config.scrape_targets)}
        if config.target_labels:
            static["labels"] = dict(config.target_labels)
        doc["scrape_configs"].append(
            {
                "job_name": config.job,
                "metrics_path": config.metrics_path,
                "static_configs": [static],
            }
        )
    doc["scrape_configs"].extend(dict(c) for c in config.extra_scrape_configs)
    if config.alertmanagers:
        doc["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": list(config.alertmanagers)}]}]}
    return doc


class _Daemon:
    """A server process on a free 127.0.0.1 port, ready when GET `ready_path` answers 200."""

    name = "server"
    ready_path = "/-/ready"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _argv(self) -> list[str]:  # the command line for self.port
        raise NotImplementedError

    def start(self, timeout: float = 30.0):
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as resp:
                        if resp.status == 200:
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.05)
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"{self.name} did not become ready; log:\n{last_error}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class PrometheusServer(_Daemon):
    """One Prometheus process; use `start()` / `stop()` or the fixtures."""

    name = "prometheus"

    def __init__(self, config: PrometheusConfig, workdir: Path):
        super().__init__(workdir)
        self.config = config

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        _require(PROMETHEUS_BIN)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(config_yaml(self.config), sort_keys=False))
        return super().start(timeout)

    def _argv(self) -> list[str]:
        return [
            PROMETHEUS_BIN,
            f"--config.file={self.workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.workdir / f'data-{self.port}'}",
            f"--web.listen-address={self.address}",
            "--web.enable-lifecycle",
            "--log.level=warn",
            *self.config.extra_flags,
        ]

    # -- HTTP API ---------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; returns `data`, raises PrometheusError on an error answer."""
        query = urllib.parse.urlencode(params, doseq=True)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            try:
                body = json.load(exc)
            except ValueError:
                raise PrometheusError(status, "http", exc.reason) from None
        if body.get("status") != "success":
            raise PrometheusError(status, body.get("errorType", "?"), body.get("error", ""))
        return body["data"]

    def query(self, expr: str, time: float | None = None) -> list[dict]:
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, selector: str) -> list[str]:
        """What Grafana's label_values(selector, label) lists."""
        return self.api(f"label/{label}/values", **{"match[]": selector})

    def parse_error(self, expr: str) -> str | None:
        """The parse error Prometheus gives for `expr` (HTTP 400 bad_data), None if it parses."""
        try:
            self.api("query", query=expr)
        except PrometheusError as exc:
            if exc.status == 400 and exc.error_type == "bad_data":
                return exc.message
            raise
        return None

    def rules(self) -> list[dict]:
        return self.api("rules")["groups"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def firing_alerts(self) -> list[dict]:
        return [a for a in self.alerts() if a.get("state") == "firing"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.5) -> Any:
        """Poll `predicate` until it returns something truthy; return that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)


@pytest.fixture(scope="session")
def prometheus_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[PrometheusConfig], PrometheusServer]]:
    servers: list[PrometheusServer] = []

    def start(config: PrometheusConfig | None = None) -> PrometheusServer:
        server = PrometheusServer(config or PrometheusConfig(), tmp_path_factory.mktemp("prometheus"))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def prometheus(request: pytest.FixtureRequest, prometheus_factory) -> PrometheusServer:
    """A running Prometheus; configure with indirect parametrisation (a PrometheusConfig)."""
    config = getattr(request, "param", None) or PrometheusConfig()
    return prometheus_factory(config)


def override_rules(
    source: str | os.PathLike,
    dest_dir: str | os.PathLike,
    for_duration: str | None = None,
    exprs: dict[str, str] | None = None,
) -> Path:
    """Copy a rule file with every alert's `for:` set to `for_duration` (if given) and the
    expressions of the alerts named in `exprs` replaced. Returns the new file's path."""
    doc = yaml.safe_load(Path(source).read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            if for_duration is not None:
                rule["for"] = for_duration
            if exprs and rule["alert"] in exprs:
                rule["expr"] = exprs[rule["alert"]]
    dest = Path(dest_dir) / Path(source).name
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


# ------------------------------------------------------------------------------ Alertmanager ---
def shipped_alertmanager_config(
    webhook_url: str, group_wait: str = "1s", group_interval: str = "1s", repeat_interval: str = "1h"
) -> dict[str, Any]:
    """deploy/prometheus/alertmanager.yml with only these replaced: every webhook URL by
    `<webhook_url>/<receiver name>`, and group_wait / group_interval / repeat_interval wherever
    the shipped file sets them (the route tree's nodes)."""
    doc = yaml.safe_load(ALERTMANAGER_FILE.read_text())
    for receiver in doc["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = f"{webhook_url.rstrip('/')}/{receiver['name']}"
    timings = {"group_wait": group_wait, "group_interval": group_interval, "repeat_interval": repeat_interval}

    def retime(route: dict) -> None:
        for key, value in timings.items():
            if key in route:
                route[key] = value
        for child in route.get("routes", []):
            retime(child)

    retime(doc["route"])
    return doc


class AlertmanagerServer(_Daemon):
    """One Alertmanager: own config and storage in `workdir`, no gossip (empty cluster address)."""

    name = "alertmanager"

    def __init__(self, config: Mapping[str, Any], workdir: Path):
        super().__init__(workdir)
        self.config = copy.deepcopy(dict(config))

    def start(self, timeout: float = 30.0) -> "AlertmanagerServer":
        _require(ALERTMANAGER_BIN, "prometheus-alertmanager")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        return super().start(timeout)

    def _argv(self) -> list[str]:
        return [
            ALERTMANAGER_BIN,
            f"--config.file={self.workdir / 'alertmanager.yml'}",
            f"--storage.path={self.workdir / f'data-{self.port}'}",
            f"--web.listen-address={self.address}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    def alerts(self) -> list[dict]:
        """GET /api/v2/alerts: every alert it holds, active, inhibited or silenced, with its
        status ({"state": "active" | "suppressed", "inhibitedBy": [...], ...})."""
        with urllib.request.urlopen(self.url + "/api/v2/alerts", timeout=10) as resp:
            return json.load(resp)

    def post_alerts(self, alerts: list[dict]) -> None:
        """POST /api/v2/alerts, as Prometheus does (labels, annotations, startsAt, endsAt)."""
        request = urllib.request.Request(self.url + "/api/v2/alerts", data=json.dumps(alerts).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200, resp.status

    def matching(self, alertname: str, **labels: str) -> list[dict]:
        return [a for a in self.alerts()
                if a["labels"].get("alertname") == alertname and all(a["labels"].get(k) == v for k, v in labels.items())]


@pytest.fixture(scope="session")
def alertmanager_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Mapping], AlertmanagerServer]]:
    servers: list[AlertmanagerServer] = []

    def start(config: Mapping[str, Any]) -> AlertmanagerServer:
        server = AlertmanagerServer(config, tmp_path_factory.mktemp("alertmanager"))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


class WebhookReceiver:
    """An Alertmanager webhook receiver: an HTTP server on a free 127.0.0.1 port, in a thread,
    that answers 200 and keeps every notification (path, JSON payload, arrival time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.notifications: list[tuple[str, dict, float]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                with receiver.lock:
                    receiver.notifications.append((self.path, payload, time.time()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self) -> list[tuple[str, dict, float]]:
        with self.lock:
            return list(self.notifications)

    def alerts(self, alertname: str, status: str = "firing", **labels: str) -> list[tuple[str, dict, dict]]:
        """(path, notification, alert) of every notified alert with that name, status and labels."""
        return [(path, payload, alert) for path, payload, _ in self.received() for alert in payload.get("alerts", [])
                if alert["labels"].get("alertname") == alertname and alert.get("status") == status
                and all(alert["labels"].get(k) == v for k, v in labels.items())]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()
