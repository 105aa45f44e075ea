"""deploy/compose: the docker-compose playground and the Prometheus/Grafana files it mounts.

The file is checked for what `docker compose up` relies on: services and commands consistent
with the demo, mounts that exist, a Prometheus config that promtool accepts with the shipped
rules, Grafana provisioning that points at them. Then the services built from the project's
image (workers, traffic, exporter) run for real: there is no `docker compose` here and no
registry (RabbitMQ, Prometheus and Grafana images cannot be pulled), so each service definition
becomes the `docker run` that compose would make of it, with host networking and the machine's
RabbitMQ or Redis instead of the `rabbitmq` service (tests/image/ builds the image).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.harness import HOST, Metrics, free_port, http_get, make_broker, wait_for
from tests.image.docker import docker, image  # noqa: F401 - the engine (skips loudly without one) and the image

from .conftest import ALERTS_FILE, COMPOSE_DIR, GRAFANA_DIR, ROOT, source_dashboards

COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PORT = 9808

TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include", "version"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "ports", "expose", "volumes",
    "depends_on", "healthcheck", "restart", "hostname", "user", "working_dir", "networks", "labels",
    "container_name", "profiles", "pull_policy", "init", "stop_grace_period", "stop_signal", "logging",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def argv(service: dict) -> list[str]:
    entry = service.get("entrypoint", [])
    cmd = service.get("command", [])
    assert isinstance(entry, list) and isinstance(cmd, list), "use exec (list) form"
    return [*entry, *cmd]


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    mounts = []
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        if source.startswith((".", "/")):
            mounts.append(((COMPOSE_DIR / source).resolve(), target))
    return mounts


def test_structure(compose, services):
    unknown = {k for k in compose if not k.startswith("x-")} - TOP_LEVEL_KEYS  # x-*: extension fields
    assert not unknown, unknown
    assert {"rabbitmq", "worker1", "worker2", "traffic", "exporter", "prometheus", "grafana"} <= set(services)
    for name, svc in services.items():
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for port in svc.get("ports", []):
            assert re.fullmatch(r"\d+:\d+", str(port)), (name, port)


def test_broker_and_demo_commands(services):
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert "rabbitmq-diagnostics" in services["rabbitmq"]["healthcheck"]["test"]
    assert argv(services["worker1"]) == "celery -A celery_health_exporter.demo.app worker -E -c 2 -n demo1@%h".split()
    assert argv(services["worker2"]) == "celery -A celery_health_exporter.demo.app worker -E -c 2 -n demo2@%h".split()
    assert argv(services["traffic"]) == "python -m celery_health_exporter.demo traffic".split()
    for name in ("worker1", "worker2", "traffic", "exporter"):
        svc = services[name]
        # all built from the repository's Dockerfile (the image has the exporter and the demo)
        context = (COMPOSE_DIR / svc["build"]["context"]).resolve()
        assert context == ROOT and (context / svc["build"]["dockerfile"]).is_file(), name
        assert svc["image"] == services["exporter"]["image"]
        url = svc["environment"]["CELERY_BROKER_URL"]
        assert re.fullmatch(r"amqp://[^@]+@rabbitmq:5672//", url), (name, url)
        assert svc["depends_on"]["rabbitmq"]["condition"] == "service_healthy"


def test_exporter_service(services):
    exporter = services["exporter"]
    assert "entrypoint" not in exporter, "the image's entrypoint is the exporter; flags pass through"
    assert exporter["command"] == [f"--listen-address=0.0.0.0:{PORT}"]
    assert f"{PORT}:{PORT}" in exporter["ports"]


def test_bind_mounts_exist(services):
    checked = 0
    for name, svc in services.items():
        for source, target in bind_mounts(svc):
            if source == ALERTS_FILE.resolve() and not ALERTS_FILE.is_file():
                continue  # checked (or skipped with its reason) in test_prometheus_mounts_the_rules
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            checked += 1
    assert checked >= 4


def test_prometheus_mounts_the_rules(services):
    prom_cfg = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    mounts = dict((target, source) for source, target in bind_mounts(services["prometheus"]))
    assert mounts["/etc/prometheus/prometheus.yml"] == (COMPOSE_DIR / "prometheus" / "prometheus.yml").resolve()
    (rule_file,) = prom_cfg["rule_files"]
    assert mounts[rule_file] == ALERTS_FILE.resolve(), "the rules mounted must be deploy/prometheus/alerts.yaml"
    (job,) = prom_cfg["scrape_configs"]
    (static,) = job["static_configs"]
    host, port = static["targets"][0].rsplit(":", 1)
    assert host in services and int(port) == PORT
    if not ALERTS_FILE.is_file():
        pytest.skip("deploy/prometheus/alerts.yaml does not exist yet (written under issue 6)")


def test_promtool_accepts_config_and_rules(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus)")
    cfg = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    # the container path of the rules file, mapped back to the repository
    cfg["rule_files"] = [str(ALERTS_FILE)] if ALERTS_FILE.is_file() else []
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if ALERTS_FILE.is_file():
        assert re.search(r"SUCCESS: \d+ rules found", proc.stdout + proc.stderr), proc.stdout + proc.stderr
    # promtool is really checking: a broken copy is refused
    cfg["scrape_configs"][0]["scrape_interval"] = "fast"
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    bad = subprocess.run([promtool, "check", "config", str(tmp_path / "bad.yml")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_grafana_provisioning(services):
    grafana = services["grafana"]
    mounts = {target: source for source, target in bind_mounts(grafana)}
    ds_dir = mounts["/etc/grafana/provisioning/datasources"]
    dash_dir = mounts["/etc/grafana/provisioning/dashboards"]
    (ds_file,) = sorted(ds_dir.glob("*.yaml"))
    datasources = yaml.safe_load(ds_file.read_text())
    assert datasources["apiVersion"] == 1
    (prom,) = datasources["datasources"]
    assert prom["type"] == "prometheus" and prom["isDefault"] is True and prom["uid"]
    assert prom["url"] == "http://prometheus:9090"
    assert "prometheus" in services and "9090:9090" in services["prometheus"]["ports"]

    (provider_file,) = sorted(dash_dir.glob("*.yaml"))
    providers = yaml.safe_load(provider_file.read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert mounts[path] == GRAFANA_DIR.resolve(), "the provider must read the mounted grafana/ directory"


def _datasource_refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


@pytest.mark.skipif(not source_dashboards(), reason="grafana/*.json does not exist yet (written under issue 6)")
def test_dashboards_load_under_file_provisioning():
    """File provisioning does not resolve `__inputs` (${DS_...}) placeholders: every datasource
    reference must be a dashboard variable or the provisioned datasource."""
    ds = yaml.safe_load(next((COMPOSE_DIR / "grafana" / "provisioning" / "datasources").glob("*.yaml")).read_text())
    provisioned = {d["uid"] for d in ds["datasources"]} | {d["name"] for d in ds["datasources"]}
    uids = []
    for path in source_dashboards():
        dashboard = json.loads(path.read_text())
        assert dashboard.get("title"), path.name
        uids.append(dashboard.get("uid"))
        variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
        for ref in _datasource_refs(dashboard):
            uid = ref.get("uid") if isinstance(ref, dict) else ref
            if uid is None or uid in ("-- Grafana --", "grafana", "-- Mixed --", "-- Dashboard --"):
                continue
            match = re.fullmatch(r"\$\{?(\w+)\}?", str(uid))
            if match:
                assert match.group(1) in variables, f"{path.name}: datasource {uid} is not a dashboard variable"
            else:
                assert uid in provisioned, f"{path.name}: datasource {uid!r} is not provisioned"
    assert len(set(uids)) == len(uids), "dashboard uids must be unique"


# ------------------------------------------------------------- run for real ---
IMAGE_SERVICES = ("worker1", "worker2", "traffic", "exporter")


def docker_run_args(svc: dict, image: str, replace: dict[str, str], drop_env: tuple = ()) -> list[str]:
    """The `docker run` arguments compose would use for ``svc`` (image, entrypoint, command,
    environment), on the host's network: ``replace`` rewrites service addresses in values."""
    def rewrite(value: str) -> str:
        for old, new in replace.items():
            value = value.replace(old, new)
        return value

    known = {"image", "build", "entrypoint", "command", "environment", "depends_on", "restart", "ports"}
    assert set(svc) <= known, f"translate these keys too: {set(svc) - known}"
    args = ["--network", "host"]  # ports: published as they are, no mapping to translate
    for key, value in svc.get("environment", {}).items():
        if key not in drop_env:
            args += ["-e", f"{key}={rewrite(str(value))}"]
    entrypoint = svc.get("entrypoint", [])
    if entrypoint:
        args += ["--entrypoint", entrypoint[0]]
    return [*args, image, *(rewrite(a) for a in [*entrypoint[1:], *svc.get("command", [])])]


@pytest.mark.integration
@pytest.mark.timeout(1200)  # the first image test of a session builds the image
@pytest.mark.parametrize("kind", ["amqp", "redis"])
def test_image_services_run_against_the_local_broker(services, kind, docker, image):
    broker = make_broker(kind)
    port = free_port()
    replace = {"amqp://guest:guest@rabbitmq:5672//": broker.url, "http://rabbitmq:15672": "http://127.0.0.1:15672",
               f"0.0.0.0:{PORT}": f"0.0.0.0:{port}"}
    drop = () if kind == "amqp" else ("CELERY_EXPORTER_RABBITMQ_MANAGEMENT_URL",)
    names = {}
    try:
        for name in IMAGE_SERVICES:
            args = docker_run_args(services[name], image, replace, drop)
            assert services[name]["image"] == "celery-health-exporter:dev"  # what tests/image built as :test
            names[name] = docker.start(*args, name_prefix=f"che-compose-{name}")

        def workers_up_and_traffic_counted():
            for name, container in names.items():
                if not docker.inspect(container)["State"]["Running"]:
                    return f"service {name} stopped"  # ends the wait: reported below with the logs
            status, body = http_get(f"http://127.0.0.1:{port}/metrics")
            m = Metrics(body) if status == 200 else None
            return m and (m.value("celery_worker_up", hostname=f"demo1@{HOST}") == 1
                          and m.value("celery_worker_up", hostname=f"demo2@{HOST}") == 1
                          and m.sum("celery_task_succeeded_total") >= 5
                          and m.sum("celery_task_failed_total") >= 1) and m

        try:
            m = wait_for(workers_up_and_traffic_counted, 120, interval=1,
                         message="both demo workers up and the traffic counted by the exporter")
            if isinstance(m, str):
                raise AssertionError(m)
        except AssertionError as exc:
            logs = "\n".join(f"--- {n}:\n{docker.logs(c)[-1500:]}" for n, c in names.items())
            raise AssertionError(f"{exc}\n{logs}") from None
        assert m.value("celery_broker_up") == 1
    finally:
        docker.run("rm", "-f", *names.values(), check=False)
        broker.close()

