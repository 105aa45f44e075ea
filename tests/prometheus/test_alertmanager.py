"""The example Alertmanager configuration (deploy/prometheus/alertmanager.yml), checked by amtool,
and end to end: real Celery workers on the real Redis fail, the running exporter sees it, a real
Prometheus (Debian's) evaluates the SHIPPED rules (deploy/prometheus/alerts.yaml, only every
`for:` shortened) and sends the alerts to a real Alertmanager (Debian's) running the SHIPPED
configuration (only the receiver URLs and the timings replaced), which notifies a webhook
receiver in this test: the alert arrives with its labels, its summary and its runbook URL.

Failures induced: a worker restart loop (CeleryWorkerRestartLoop, which inhibits the
CeleryWorkerUncleanShutdown of the same worker), and a queue with messages that no running worker
consumes (CeleryQueueWithoutConsumers, which inhibits CeleryQueueBacklogGrowing of the same queue:
a second Alertmanager without the inhibit rules, fed by the same Prometheus, shows that the
inhibited alert would otherwise have been sent).
"""
from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.apps.testapp import client
from tests.harness import HOST, make_redis_broker, wait_for

from .conftest import (
    ALERTMANAGER_FILE,
    ALERTS_FILE,
    AlertmanagerServer,
    PrometheusConfig,
    PrometheusServer,
    WebhookReceiver,
    override_rules,
    shipped_alertmanager_config,
)

RUN = uuid.uuid4().hex[:6]
FOR = "1s"
JOB = "celery-exporter"
FAST = ("--inspect-interval", "1", "--worker-timeout", "3", "--stall-after", "4", "--lost-task-grace", "2",
        "--broker-poll-interval", "1")
# Alertmanager timings in the end-to-end tests: the shipped 30s / 5m / 4h (1h) shortened. The
# repeat interval is short on purpose: every firing group is notified again every ~2 s, the
# heartbeat after which an alert that was not notified is known not to be coming.
TIMINGS = {"group_wait": "1s", "group_interval": "1s", "repeat_interval": "2s"}
ALERT_TIMEOUT = 90  # generous bound for an induced failure to reach the receiver


def shipped_rules() -> dict[str, dict]:
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def shipped_config() -> dict:
    return yaml.safe_load(ALERTMANAGER_FILE.read_text())


# ------------------------------------------------------------------- amtool, statically ---
def amtool_check(amtool: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, timeout=30)


def test_shipped_config_passes_amtool_check_config(amtool):
    result = amtool_check(amtool, ALERTMANAGER_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert f"{len(shipped_config()['inhibit_rules'])} inhibit rules" in result.stdout


def test_amtool_rejects_a_broken_config(amtool, tmp_path):
    """The check can fail: a route to a receiver that does not exist."""
    doc = shipped_config()
    doc["route"]["routes"][0]["receiver"] = "no-such-receiver"
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(yaml.safe_dump(doc))
    result = amtool_check(amtool, broken)
    assert result.returncode != 0
    assert "no-such-receiver" in result.stdout + result.stderr


def test_every_alert_routes_by_its_severity(amtool):
    """Critical alerts go to celery-critical, warnings to celery-warning (amtool config routes test)."""
    rules = shipped_rules()
    receivers = {r["name"] for r in shipped_config()["receivers"]}
    for name, rule in rules.items():
        severity = rule["labels"]["severity"]
        result = subprocess.run(
            [amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_FILE}",
             f"alertname={name}", f"severity={severity}", "hostname=w@h", "queue_name=q"],
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"celery-{severity}" in receivers
        assert result.stdout.strip() == f"celery-{severity}", (name, result.stdout)


def _alertname_matchers(config: dict) -> list[tuple[str, str, str]]:
    """(where, operator, value) of every alertname matcher of the routes and inhibit rules."""
    found = []

    def collect(where: str, matchers: list[str]):
        for matcher in matchers:
            m = re.fullmatch(r'\s*alertname\s*(=~|!~|=|!=)\s*"(.*)"\s*', matcher)
            if m:
                found.append((where, m.group(1), m.group(2)))

    def walk(route: dict, where: str):
        collect(where, route.get("matchers", []))
        for i, child in enumerate(route.get("routes", [])):
            walk(child, f"{where}.routes[{i}]")

    walk(config["route"], "route")
    for i, rule in enumerate(config.get("inhibit_rules", [])):
        collect(f"inhibit_rules[{i}].source_matchers", rule.get("source_matchers", []))
        collect(f"inhibit_rules[{i}].target_matchers", rule.get("target_matchers", []))
    return found


def test_matchers_name_alerts_that_exist():
    """Every alertname in the routes and inhibit rules (each alternative of a regex) matches an
    alert of alerts.yaml: a renamed alert cannot silently leave an inhibition without effect."""
    names = set(shipped_rules())
    matchers = _alertname_matchers(shipped_config())
    assert len(matchers) >= 10, matchers
    for where, op, value in matchers:
        alternatives = value.split("|") if op == "=~" else [value]
        for alternative in alternatives:
            matched = {n for n in names if re.fullmatch(alternative, n)} if op == "=~" else names & {alternative}
            assert matched, f"{where}: alertname {op} {alternative!r} matches no alert of {ALERTS_FILE.name}"


def test_the_test_config_differs_from_the_shipped_one_only_in_urls_and_timings():
    shipped = shipped_config()
    test = shipped_alertmanager_config("http://127.0.0.1:1/x", **TIMINGS)
    urls = [w["url"] for r in test["receivers"] for w in r["webhook_configs"]]
    assert urls == [f"http://127.0.0.1:1/x/{r['name']}" for r in test["receivers"]]

    def strip(doc):
        doc = yaml.safe_load(yaml.safe_dump(doc))
        for r in doc["receivers"]:
            for w in r["webhook_configs"]:
                w.pop("url")

        def untime(route):
            for key in TIMINGS:
                route.pop(key, None)
            for child in route.get("routes", []):
                untime(child)

        untime(doc["route"])
        return doc

    assert strip(test) == strip(shipped)
    assert test["route"]["group_wait"] == "1s" and test["route"]["routes"][0]["repeat_interval"] == "2s"


# ------------------------------------- every inhibit rule in a real Alertmanager ---
MATCHER = re.compile(r'\s*(\w+)\s*(=~|!~|!=|=)\s*"(.*)"\s*')


def _parse(matchers: list[str]) -> list[tuple[str, str, str]]:
    parsed = []
    for matcher in matchers:
        m = MATCHER.fullmatch(matcher)
        assert m, f"cannot read matcher {matcher!r}"
        parsed.append(m.groups())
    return parsed


def _matches(labels: dict, matchers: list[tuple[str, str, str]]) -> bool:
    ops = {"=": lambda v, x: v == x, "!=": lambda v, x: v != x,
           "=~": lambda v, x: re.fullmatch(x, v) is not None, "!~": lambda v, x: re.fullmatch(x, v) is None}
    return all(ops[op](labels.get(name, ""), value) for name, op, value in matchers)


def identity(alertname: str) -> set[str]:
    """The labels that say WHICH worker, queue, task, exporter... an alert is about: those its
    summary and description name ({{ $labels.x }}), but job."""
    annotations = shipped_rules()[alertname]["annotations"]
    return set(re.findall(r"\$labels\.(\w+)", annotations["summary"] + annotations["description"])) - {"job"}


def inhibition_cases() -> list[tuple[int, dict, dict, list[dict]]]:
    """(rule index, source, target, controls) label sets for every alert of alerts.yaml that an
    inhibit rule of the shipped config can mute. Source and target carry the same values of the
    rule's `equal` labels and of the identity labels both alerts have; each control is the
    target about another cluster, or another worker / queue / exporter (one identity label
    changed). Labels the source matchers test besides alertname / severity (source="events")
    are set on the source."""
    rules = shipped_rules()
    cases = []
    for index, rule in enumerate(shipped_config()["inhibit_rules"]):
        source_m, target_m = _parse(rule["source_matchers"]), _parse(rule["target_matchers"])
        named = [(n, op, v) for n, op, v in source_m if n in ("alertname", "severity")]
        extra = {n: v.split("|")[0] for n, op, v in source_m if n not in ("alertname", "severity") and op in ("=", "=~")}
        for target_name, target_rule in rules.items():
            target = {"alertname": target_name, "severity": target_rule["labels"]["severity"]}
            if not _matches(target, target_m):
                continue
            if any(n == "alertname" for n, _, _ in named):
                source_name = next(n for n, r in rules.items() if _matches(
                    {"alertname": n, "severity": r["labels"]["severity"]}, named))
                source = {"alertname": source_name, "severity": rules[source_name]["labels"]["severity"]}
            else:  # a tier rule: the same alert at the source's severity
                source_name = target_name
                source = {"alertname": target_name, **{n: v for n, op, v in named if op == "="}}
            both = identity(source_name) & identity(target_name)
            shared = {label: f"{label}-{index}-{target_name}".lower()
                      for label in (set(rule["equal"]) | both) - {"alertname"}}
            source, target = {**shared, **source, **extra}, {**shared, **target}
            controls = [{**target, label: target[label] + "-other"} for label in sorted(both | {"cluster"})]
            cases.append((index, source, target, controls))
    return cases


def test_every_inhibit_rule_mutes_its_targets_and_nothing_else(alertmanager_factory, webhook):
    """Each inhibit rule in a real Alertmanager (the shipped file), with the alerts it is meant for
    posted to its API as Prometheus would: the target is suppressed by the source, the same
    target for another cluster, worker, queue or exporter is not."""
    config = shipped_config()
    cases = inhibition_cases()
    covered = {index for index, *_ in cases}
    assert covered == set(range(len(config["inhibit_rules"]))), f"inhibit rules that mute no alert: {covered}"
    am = alertmanager_factory(shipped_alertmanager_config(webhook.url, **TIMINGS))
    now = time.time()
    stamp = lambda t: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))  # noqa: E731
    alerts = [{"labels": labels, "annotations": {}, "startsAt": stamp(now - 60), "endsAt": stamp(now + 600)}
              for _, source, target, controls in cases for labels in (source, target, *controls)]
    am.post_alerts(alerts)

    def key(labels: dict) -> tuple:
        return tuple(sorted(labels.items()))

    def states() -> dict[tuple, dict] | None:
        held = {key(a["labels"]): a for a in am.alerts()}
        return held if all(key(a["labels"]) in held for a in alerts) else None

    held = wait_for(states, 30, 0.2, "Alertmanager holding every posted alert")
    wrong = []
    for index, source, target, controls in cases:
        status = held[key(target)]["status"]
        if status["state"] != "suppressed" or held[key(source)]["fingerprint"] not in status["inhibitedBy"]:
            wrong.append(f"rule {index}: {target} not muted by {source}: {status}")
        for control in controls:
            if held[key(control)]["status"]["state"] != "active":
                wrong.append(f"rule {index}: {source} also mutes {control}")
    assert wrong == [], "\n".join(wrong)
    assert len(cases) >= 15, len(cases)


# ------------------------------------------------------------------------ end to end ---
@pytest.fixture
def redis_broker():
    broker = make_redis_broker()
    yield broker
    broker.close()


class Stack:
    """Exporter -> Prometheus (shipped rules) -> Alertmanager (shipped config) -> webhook."""

    def __init__(self, prom: PrometheusServer, am: AlertmanagerServer, webhook: WebhookReceiver,
                 control: AlertmanagerServer, instance: str):
        self.prom, self.am, self.webhook, self.control, self.instance = prom, am, webhook, control, instance

    def notified(self, alertname: str, **labels: str) -> list[tuple[str, dict, dict]]:
        """Notifications of the shipped Alertmanager (paths /shipped/<receiver>)."""
        return [n for n in self.webhook.alerts(alertname, **labels) if n[0].startswith("/shipped/")]

    def control_notified(self, alertname: str, **labels: str) -> list[tuple[str, dict, dict]]:
        return [n for n in self.webhook.alerts(alertname, **labels) if n[0].startswith("/control/")]

    def wait_notified(self, alertname: str, **labels: str) -> tuple[str, dict, dict]:
        started = time.monotonic()
        found = wait_for(lambda: self.notified(alertname, **labels), ALERT_TIMEOUT, 0.2,
                         f"{alertname}{labels} at the webhook; {self.diagnostics()}")
        print(f"{alertname} reached the webhook after {time.monotonic() - started:.1f}s")
        return found[0]

    def diagnostics(self) -> str:
        return (f"Prometheus firing: {[a['labels'] for a in self.prom.firing_alerts()]}; "
                f"Alertmanager holds: {[(a['labels']['alertname'], a['status']['state']) for a in self.am.alerts()]}")

    def wait_inhibited(self, target: str, source_fingerprint: str, **labels: str) -> dict:
        """The shipped Alertmanager holds `target` suppressed by the alert `source_fingerprint`."""
        def inhibited():
            return [a for a in self.am.matching(target, **labels)
                    if a["status"]["state"] == "suppressed" and source_fingerprint in a["status"]["inhibitedBy"]]
        return wait_for(inhibited, ALERT_TIMEOUT, 0.3, f"{target}{labels} inhibited; {self.diagnostics()}")[0]


@pytest.fixture
def stack(tmp_path, webhook, alertmanager_factory, prometheus_factory):
    """Start the chain for an exporter: `stack(exporter) -> Stack`; stopped at the end of the test."""
    started: list = []

    def start(exporter) -> Stack:
        am = alertmanager_factory(shipped_alertmanager_config(webhook.url + "/shipped", **TIMINGS))
        started.append(am)
        control_config = shipped_alertmanager_config(webhook.url + "/control", **TIMINGS)
        control_config["inhibit_rules"] = []
        control = alertmanager_factory(control_config)
        started.append(control)
        rules = override_rules(ALERTS_FILE, tmp_path, for_duration=FOR)
        instance = f"127.0.0.1:{exporter.port}"
        prom = prometheus_factory(PrometheusConfig(
            rule_files=[rules], scrape_targets=[instance], scrape_interval="1s", evaluation_interval="1s", job=JOB,
            alertmanagers=[am.address, control.address]))
        started.append(prom)
        # Prometheus hands new targets to its scrapers up to 5 s after it starts: before that,
        # counters would first be seen already raised (increase() misses what came before)
        wait_for(lambda: prom.query(f'up{{instance="{instance}"}} == 1'), 30, 0.2, "Prometheus scraping the exporter")
        return Stack(prom, am, webhook, control, instance)

    yield start
    for server in reversed(started):
        server.stop()


def check_notification(stack: Stack, notified: tuple[str, dict, dict], alertname: str, **labels: str) -> None:
    """The notification as a receiver sees it: route, grouping, labels, summary, runbook URL."""
    path, payload, alert = notified
    rule = shipped_rules()[alertname]
    severity = rule["labels"]["severity"]
    assert path == f"/shipped/celery-{severity}", path
    assert payload["receiver"] == f"celery-{severity}" and payload["status"] == "firing"
    # grouped by alertname and the worker / queue (cluster and namespace are not set here)
    assert payload["groupLabels"] == {"alertname": alertname, **labels}, payload["groupLabels"]
    assert alert["labels"]["severity"] == severity
    assert alert["labels"]["job"] == JOB and alert["labels"]["instance"] == stack.instance
    for key, value in labels.items():
        assert alert["labels"][key] == value
    summary = rule["annotations"]["summary"]
    for key, value in labels.items():
        summary = summary.replace("{{ $labels.%s }}" % key, value)
    assert alert["annotations"]["summary"] == summary
    assert alert["annotations"]["runbook_url"] == rule["annotations"]["runbook_url"]
    assert alert["annotations"]["runbook_url"].endswith("#" + alertname.lower())
    assert "{{" not in alert["annotations"]["description"]
    link = urlsplit(alert["generatorURL"])  # http://<this host's name>:<port>/graph?g0.expr=...
    assert link.port == stack.prom.port and link.path == "/graph", alert["generatorURL"]


def metric(exporter, name: str, /, **labels):
    return exporter.scrape().value(name, **labels)


@pytest.mark.integration
def test_worker_restart_loop_reaches_the_receiver(redis_broker, make_exporter, make_worker, stack):
    """Four starts of the same node name, stopped cleanly or SIGKILLed in between (as in
    test_worker_failures), the last one left running."""
    started = time.monotonic()
    exporter = make_exporter(redis_broker.url, *FAST)
    chain = stack(exporter)
    name = f"amloop{RUN}"
    host = f"{name}@{HOST}"
    for round_, stop in enumerate(("term", "kill", "term", None)):
        worker = make_worker(redis_broker.url, name, queues=f"q-{name}", concurrency=1)
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=host) == 1
                 and metric(exporter, "celery_worker_restarts_total", hostname=host) == round_, 60,
                 message=f"worker up, round {round_}")
        if stop is None:
            break
        if stop == "term":
            assert worker.terminate() == 0
        else:
            worker.kill()
        wait_for(lambda: metric(exporter, "celery_worker_up", hostname=host) == 0, 30,
                 message=f"worker down, round {round_}")
    induced = time.monotonic()
    notified = chain.wait_notified("CeleryWorkerRestartLoop", hostname=host)
    notified_after = time.monotonic() - induced
    check_notification(chain, notified, "CeleryWorkerRestartLoop", hostname=host)
    # the worker's unclean shutdown (the SIGKILL) is inhibited by the restart loop...
    (loop,) = chain.am.matching("CeleryWorkerRestartLoop", hostname=host)
    assert loop["status"]["state"] == "active"
    chain.wait_inhibited("CeleryWorkerUncleanShutdown", loop["fingerprint"], hostname=host)
    # ...while the control Alertmanager, without inhibit rules, notified it
    wait_for(lambda: chain.control_notified("CeleryWorkerUncleanShutdown", hostname=host), ALERT_TIMEOUT,
             message="CeleryWorkerUncleanShutdown at the control receiver")
    print(f"restart loop: induced in {induced - started:.1f}s, notified {notified_after:.1f}s later;"
          f" whole test {time.monotonic() - started:.1f}s")


@pytest.mark.integration
def test_queue_without_consumers_reaches_the_receiver_and_hides_its_backlog(
        redis_broker, make_exporter, make_worker, stack):
    """A worker runs (queue `busy`), messages go to a queue no worker consumes (`idle`)."""
    started = time.monotonic()
    exporter = make_exporter(redis_broker.url, *FAST)
    chain = stack(exporter)
    busy, idle = f"busy{RUN}", f"idle{RUN}"
    worker = make_worker(redis_broker.url, f"amq{RUN}", queues=busy, concurrency=1)
    wait_for(lambda: metric(exporter, "celery_worker_up", hostname=worker.hostname) == 1, 60, message="worker up")
    # the exporter knows whose queues are consumed once a remote-control poll had the worker's
    # active_queues: before that, every queue counts 0 consumers
    up = time.monotonic()
    wait_for(lambda: metric(exporter, "celery_active_consumer_count", queue_name=busy) == 1, 60,
             message="the worker counted as the consumer of its queue")
    print(f"worker counted as its queue's consumer {time.monotonic() - up:.1f}s after it was up")
    app = client(redis_broker.url)
    for i in range(5):
        app.send_task("tests.add", (i, i), queue=busy)  # the worker works: only the idle queue is wrong
        app.send_task("tests.add", (i, i), queue=idle)
    induced = time.monotonic()
    without = chain.wait_notified("CeleryQueueWithoutConsumers", queue_name=idle)
    notified_after = time.monotonic() - induced
    check_notification(chain, without, "CeleryQueueWithoutConsumers", queue_name=idle)

    # The backlog grows past 100: CeleryQueueBacklogGrowing fires in Prometheus, but the
    # Alertmanager holds it inhibited by CeleryQueueWithoutConsumers of the same queue.
    length = 5
    for _batch in range(5):
        for i in range(30):
            app.send_task("tests.add", (i, 0), queue=idle)
        length += 30
        wait_for(lambda: chain.prom.query(f'celery_queue_length{{queue_name="{idle}"}} == {length}'), 30,
                 message=f"Prometheus scraped the idle queue at {length}")
    wait_for(lambda: [a for a in chain.prom.firing_alerts() if a["labels"]["alertname"] == "CeleryQueueBacklogGrowing"
                      and a["labels"].get("queue_name") == idle], ALERT_TIMEOUT,
             message=f"CeleryQueueBacklogGrowing firing in Prometheus; {chain.diagnostics()}")
    (source,) = chain.am.matching("CeleryQueueWithoutConsumers", queue_name=idle)
    chain.wait_inhibited("CeleryQueueBacklogGrowing", source["fingerprint"], queue_name=idle)
    # Without the inhibit rules it is notified (the control Alertmanager, same Prometheus)...
    wait_for(lambda: chain.control_notified("CeleryQueueBacklogGrowing", queue_name=idle), ALERT_TIMEOUT,
             message="CeleryQueueBacklogGrowing at the control receiver")
    # ...with them it is not: two more repeats of the source's group (every 2 s) after that,
    # its own group (group_wait 1 s) would long have been sent.
    heartbeat = len(chain.notified("CeleryQueueWithoutConsumers", queue_name=idle))
    wait_for(lambda: len(chain.notified("CeleryQueueWithoutConsumers", queue_name=idle)) >= heartbeat + 2, 30,
             message="two more notifications of CeleryQueueWithoutConsumers")
    assert chain.notified("CeleryQueueBacklogGrowing", queue_name=idle) == []
    # and the queue that is consumed never alerted, at either Alertmanager
    assert chain.webhook.alerts("CeleryQueueWithoutConsumers", queue_name=busy) == []
    print(f"queue without consumers: notified {notified_after:.1f}s after the first message;"
          f" whole test {time.monotonic() - started:.1f}s")
