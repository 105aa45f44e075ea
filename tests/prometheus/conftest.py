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
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
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

PROMETHEUS_BIN = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL_BIN = os.environ.get("PROMTOOL_BIN") or shutil.which("promtool") or "/usr/bin/promtool"


def _require(binary: str) -> str:
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        pytest.fail(f"{binary} not found: install Debian's `prometheus` package (apt-get install prometheus)")
    return binary


@pytest.fixture(scope="session")
def promtool() -> str:
    return _require(PROMTOOL_BIN)


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
    return doc


class PrometheusServer:
    """One Prometheus process; use `start()` / `stop()` or the fixtures."""

    def __init__(self, config: PrometheusConfig, workdir: Path):
        self.config = config
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "PrometheusServer":
        binary = _require(PROMETHEUS_BIN)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config_yaml(self.config), sort_keys=False))
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probing and binding
            self.port = free_port()
            data_dir = self.workdir / f"data-{self.port}"
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                    "--log.level=warn",
                    *self.config.extra_flags,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as resp:
                        if resp.status == 200:
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.05)
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"Prometheus did not become ready; log:\n{last_error}")

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
