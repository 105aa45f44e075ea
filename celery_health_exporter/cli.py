"""Command line: flags and environment variables into one validated Config.

Every flag ``--some-flag`` can also be set with ``CELERY_EXPORTER_SOME_FLAG``
(repeatable KEY=VALUE flags: comma-separated items). Bad input ends with one
line on stderr naming the flag, and exit code 2.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys

from . import __version__, peer_flags
from .config import (
    DEFAULT_QUEUE_WAIT_BUCKETS,
    DEFAULT_RUNTIME_BUCKETS,
    Config,
    ConfigError,
    bind_listen_socket,
    parse_buckets,
    parse_key_values,
    parse_listen_address,
    parse_static_labels,
    positive,
    split_env_list,
    validate_broker_url,
    validate_http_url,
    validate_readable_file,
    validate_regex,
    validate_ssl_options,
)

ENV_PREFIX = "CELERY_EXPORTER_"
EXIT_USAGE = 2


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we want one line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


# (flag, default, help, kind) where kind is "value", "list" (repeatable) or "bool"
OPTIONS = [
    ("--broker-url", "", "Celery broker URL: amqp://, amqps://, redis://, rediss://, sentinel:// "
     "(also CELERY_BROKER_URL).", "value"),
    ("--broker-transport-option", None, "KEY=VALUE broker transport option (repeatable; values parsed as JSON "
     "where they parse), e.g. global_keyprefix=app1: or visibility_timeout=7200.", "list"),
    ("--broker-ssl-option", None, "KEY=VALUE TLS option for the broker connection (repeatable), e.g. "
     "ca_certs=/ca.pem or cert_reqs=CERT_REQUIRED.", "list"),
    ("--listen-address", "0.0.0.0:9808", "HOST:PORT to serve /metrics on.", "value"),
    ("--web-config-file", "", "TLS and basic auth of the endpoints: a YAML file in the format of Prometheus "
     "exporters' --web.config.file (tls_server_config, basic_auth_users); /healthz and /readyz stay open unless "
     "it sets protect_health_endpoints: true.", "value"),
    ("--metric-prefix", "celery_", "Prefix of every metric name.", "value"),
    ("--static-label", None, "KEY=VALUE label added to every series (repeatable).", "list"),
    ("--worker-timeout", "15", "Seconds without a heartbeat before a worker counts as down "
     "(at least two of its heartbeat intervals).", "value"),
    ("--purge-offline-after", "600", "Seconds after which a worker that went away loses all its series.", "value"),
    ("--runtime-buckets", ",".join(f"{b:g}" for b in DEFAULT_RUNTIME_BUCKETS),
     "Buckets of celery_task_runtime, in seconds, comma-separated and increasing.", "value"),
    ("--queue-wait-buckets", ",".join(f"{b:g}" for b in DEFAULT_QUEUE_WAIT_BUCKETS),
     "Buckets of celery_task_queue_wait_time, in seconds.", "value"),
    ("--hostname-in-task-histograms", False, "Add the hostname label to celery_task_runtime and "
     "celery_task_queue_wait_time (by default they are per task name and queue; the counters always carry "
     "hostname). Costs (buckets + 2) series per histogram per worker and task name: 500 workers x 50 names make a "
     "million series.", "bool"),
    ("--no-hostname-in-task-histograms", False, "The default (accepted so that older command lines still start).",
     "bool"),
    ("--generic-hostname-task-sent-metric", False, "Label celery_task_sent_total with hostname=\"generic\" instead "
     "of each publisher's host (publishers with random names, e.g. pods); as prometheus-exporter-celery's flag.",
     "bool"),
    ("--generic-hostname-worker-task-metric", False, "Label the task counters and histograms with "
     "hostname=\"generic\" instead of each worker's, summed over the workers (workers with random names); "
     "celery_task_sent_total is not affected. As prometheus-exporter-celery's flag.", "bool"),
    ("--default-queue-name", "unknown", "queue_name of a task whose queue nothing tells (no task-sent, a worker "
     "consuming several queues); prometheus-exporter-celery's flag, whose default is `celery`.", "value"),
    ("--max-tracked-tasks", "100000", "Bound of the in-flight task table; the oldest are evicted and counted.",
     "value"),
    ("--max-task-names", "1000", "Most distinct task names; further ones are reported as `other` "
     "(celery_exporter_label_values_folded_total).", "value"),
    ("--max-workers", "1000", "Most distinct worker hostnames; further ones are reported as `other`.", "value"),
    ("--max-queues", "1000", "Most distinct queue names; further ones are reported as `other`.", "value"),
    ("--max-exceptions", "200", "Most distinct exception class names; further ones are reported as `other`.",
     "value"),
    ("--max-publishers", "1000", "Most distinct publishers; further ones are reported as `other`.", "value"),
    ("--enable-events", False, "Periodically broadcast enable_events to workers that run without -E.", "bool"),
    ("--enable-events-interval", "60", "Seconds between enable_events broadcasts.", "value"),
    ("--task-events-hint-after", "60", "Seconds of worker heartbeats without any task event before the log says "
     "that the workers probably run without -E.", "value"),
    ("--event-queue-ttl", "120", "Seconds RabbitMQ keeps an event for us before dropping it (Celery's default "
     "of 5 s loses events whenever a consumer lags).", "value"),
    ("--event-queue-expires", "300", "Seconds our event queue survives without us (a reconnect within it loses "
     "nothing).", "value"),
    ("--event-queue-max-length", "1000000", "Most events RabbitMQ buffers for us; older ones are dropped first.",
     "value"),
    ("--event-backlog-max-mb", "512", "Redis: MiB of event messages read ahead of their processing at most. A "
     "burst waits in the exporter's memory instead of Redis's output buffer (which drops a subscriber past "
     "client-output-buffer-limit pubsub); past this bound the reader pauses and Redis's limit applies again. "
     "Size it to the container's memory limit.", "value"),
    ("--shard-task-events", "", "RabbitMQ only: take task events from the shared queue NAME that several "
     "replicas consume (competing consumers; sum their counters); worker events still come to each replica's own "
     "queue. See docs/scaling.md for what a sharded replica can and cannot report.", "value"),
    ("--no-events", False, "Do not consume Celery events (host-only mode, e.g. a DaemonSet with "
     "--host-metrics and --no-broker-poll).", "bool"),
    ("--inspect-interval", "30", "Seconds between remote-control polls of the workers (stats, active, reserved, "
     "active_queues, conf); 0 disables the poller.", "value"),
    ("--inspect-timeout", "1", "Seconds to wait for the workers' replies to one remote-control command.", "value"),
    ("--stall-after", "300", "Seconds a worker may hold active tasks without finishing any before "
     "celery_worker_stalled is 1.", "value"),
    ("--revoked-interval", "0", "Seconds between `inspect revoked` polls for workers without the hook (the reply "
     "is the whole revoked list, up to ~2 MB per worker); 0 = off.", "value"),
    ("--lost-task-grace", "30", "Seconds after a worker went down before its unfinished tasks count as lost.",
     "value"),
    ("--task-sent-grace", "10", "Seconds a worker's events of a task wait for the task's task-sent (it travels "
     "over the publisher's connection and can come last) when they cannot be attributed without it: a "
     "task-revoked of an expired task names no task, a task-received names no queue. Then they are counted with "
     "`unknown` (celery_exporter_unattributed_task_events_total). Only while publishers send task-sent; 0 counts "
     "at once.", "value"),
    ("--beat-timeout", "30", "Seconds without a report from a beat process (beat hook) before it counts as down "
     "(at least two of its report intervals).", "value"),
    ("--beat-missed-grace", "60", "Seconds past an entry's due time without a send from any beat before the run "
     "counts as missed (celery_beat_entry_missed_runs_total).", "value"),
    ("--broker-poll-interval", "15", "Seconds between polls of the broker's queues.", "value"),
    ("--no-broker-poll", False, "Do not poll the broker for queue lengths.", "bool"),
    ("--rabbitmq-management-url", "", "RabbitMQ management API, e.g. http://host:15672 (credentials default to "
     "the broker URL's).", "value"),
    ("--rabbitmq-management-ca-file", "", "CA bundle to verify the management API's TLS certificate.", "value"),
    ("--queue-include", "", "Regex: only queues whose name matches are reported.", "value"),
    ("--queue-exclude", "", "Regex: queues whose name matches are not reported (Celery's internal queues are "
     "always left out).", "value"),
    ("--queues", "", "Comma-separated queue names to report even before any task was seen on them (Redis).",
     "value"),
    ("--host-metrics", False, "Scan this host's processes for Celery workers (orphans, memory, child spawns).",
     "bool"),
    ("--host-scan-interval", "5", "Seconds between host process scans.", "value"),
    ("--host-worker-pattern", "", "Regex on the command line that marks a Celery worker process (default: "
     "celery ... worker).", "value"),
    ("--flower-metrics", False, "Also serve Flower 2.x's metrics (flower_events_total, flower_task_runtime_seconds, "
     "flower_worker_online...) with Flower's names, labels and meaning, unprefixed, so that Flower's Grafana "
     "dashboard and alert rules work unchanged. Off by default: it adds series (see docs/dashboards-and-alerts.md, "
     "Migrating from Flower).", "bool"),
    ("--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR.", "value"),
    ("--log-format", "text", "text or json.", "value"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="celery-health-exporter",
        description="Prometheus exporter for Celery. Every flag can also be set with the environment "
                    "variable shown in brackets.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for flag, default, help_text, kind in OPTIONS:
        help_text = f"{help_text} [{env_name(flag)}]"
        if kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        elif kind == "list":
            parser.add_argument(flag, action="append", default=None, metavar="KEY=VALUE", help=help_text)
        else:
            parser.add_argument(flag, default=None, help=f"{help_text} Default: {default!r}.")
    return parser


def _raw(args, flag: str, default, kind: str, env) -> object:
    dest = flag.lstrip("-").replace("-", "_")
    value = getattr(args, dest)
    if value is not None:
        return value
    from_env = env.get(env_name(flag))
    if flag == "--broker-url" and not from_env:
        from_env = env.get("CELERY_BROKER_URL")
    if from_env is None:
        return [] if kind == "list" else default
    if kind == "list":
        return split_env_list(from_env)
    if kind == "bool":
        if from_env.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_env.strip().lower() in ("", "0", "false", "no", "off"):
            return False
        raise ConfigError(env_name(flag), f"expected true or false, got {from_env!r}")
    return from_env


def _number(raw: str, flag: str, kind=float):
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(flag, f"expected a {'whole ' if kind is int else ''}number, got {raw!r}") from None


def _backlog_bytes(raw: str) -> int:
    megabytes = _number(raw, "--event-backlog-max-mb")
    if not 1 <= megabytes <= 1 << 20:
        raise ConfigError("--event-backlog-max-mb", f"expected 1 to 1048576 (MiB), got {raw!r}")
    return int(megabytes * (1 << 20))


def _shard_queue(name: str, broker_url: str) -> str:
    name = (name or "").strip()
    if name and not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,200}", name):
        raise ConfigError("--shard-task-events", f"not a usable queue name: {name!r}")
    if name and not broker_url.split(";")[0].lower().startswith(("amqp", "pyamqp")):
        raise ConfigError("--shard-task-events", "needs RabbitMQ: on Redis every subscriber gets every event")
    return name


def config_from_args(argv: list[str] | None = None, env=None, notice=None) -> Config:
    """``notice``: where the lines about prometheus-exporter-celery's flags go (stderr by default)."""
    env = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv, env, notices = peer_flags.translate(argv, env, env_name)
    except peer_flags.PeerFlagError as exc:
        raise ConfigError(exc.flag, str(exc)) from None
    for line in notices:
        (notice or (lambda text: print(text, file=sys.stderr)))(line)
    args = build_parser().parse_args(argv)
    raw = {flag: _raw(args, flag, default, kind, env) for flag, default, _, kind in OPTIONS}

    host, port = parse_listen_address(raw["--listen-address"])
    log_level = str(raw["--log-level"]).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("--log-level", f"expected DEBUG, INFO, WARNING or ERROR, got {raw['--log-level']!r}")
    if raw["--log-format"] not in ("text", "json"):
        raise ConfigError("--log-format", f"expected text or json, got {raw['--log-format']!r}")
    prefix = raw["--metric-prefix"]
    if prefix and not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prefix):
        raise ConfigError("--metric-prefix", f"{prefix!r} cannot start a Prometheus metric name")
    max_tracked = _number(raw["--max-tracked-tasks"], "--max-tracked-tasks", int)
    if max_tracked < 1:
        raise ConfigError("--max-tracked-tasks", f"must be at least 1, got {max_tracked}")

    def seconds(flag):
        return positive(_number(raw[flag], flag), flag)

    def cap(flag):
        value = _number(raw[flag], flag, int)
        if value < 1:
            raise ConfigError(flag, f"must be at least 1, got {value}")
        return value

    web_config = None
    if raw["--web-config-file"]:
        from .web_config import load_web_config

        web_config = load_web_config(raw["--web-config-file"])

    return Config(
        broker_url=validate_broker_url(raw["--broker-url"]),
        broker_transport_options=parse_key_values(raw["--broker-transport-option"], "--broker-transport-option",
                                                  json_values=True),
        broker_ssl_options=validate_ssl_options(
            parse_key_values(raw["--broker-ssl-option"], "--broker-ssl-option", json_values=True)),
        listen_host=host,
        listen_port=port,
        metric_prefix=prefix,
        static_labels=parse_static_labels(raw["--static-label"]),
        worker_timeout=seconds("--worker-timeout"),
        purge_offline_after=seconds("--purge-offline-after"),
        runtime_buckets=parse_buckets(raw["--runtime-buckets"], "--runtime-buckets"),
        queue_wait_buckets=parse_buckets(raw["--queue-wait-buckets"], "--queue-wait-buckets"),
        task_histograms_by_worker=raw["--hostname-in-task-histograms"],
        max_tracked_tasks=max_tracked,
        enable_events=bool(raw["--enable-events"]),
        enable_events_interval=seconds("--enable-events-interval"),
        no_task_events_hint_after=seconds("--task-events-hint-after"),
        event_queue_ttl=seconds("--event-queue-ttl"),
        event_queue_expires=seconds("--event-queue-expires"),
        event_queue_max_length=_number(raw["--event-queue-max-length"], "--event-queue-max-length", int),
        event_backlog_max_bytes=_backlog_bytes(raw["--event-backlog-max-mb"]),
        shard_task_events=_shard_queue(raw["--shard-task-events"], raw["--broker-url"]),
        log_level=log_level,
        log_format=raw["--log-format"],
        events=not raw["--no-events"],
        inspect_interval=positive(_number(raw["--inspect-interval"], "--inspect-interval"), "--inspect-interval",
                                  allow_zero=True),
        inspect_timeout=seconds("--inspect-timeout"),
        stall_after=seconds("--stall-after"),
        revoked_interval=positive(_number(raw["--revoked-interval"], "--revoked-interval"), "--revoked-interval",
                                  allow_zero=True),
        lost_task_grace=positive(_number(raw["--lost-task-grace"], "--lost-task-grace"), "--lost-task-grace",
                                 allow_zero=True),
        task_sent_grace=positive(_number(raw["--task-sent-grace"], "--task-sent-grace"), "--task-sent-grace",
                                 allow_zero=True),
        beat_timeout=seconds("--beat-timeout"),
        beat_missed_grace=positive(_number(raw["--beat-missed-grace"], "--beat-missed-grace"), "--beat-missed-grace",
                                   allow_zero=True),
        broker_poll_interval=seconds("--broker-poll-interval"),
        broker_poll=not raw["--no-broker-poll"],
        rabbitmq_management_url=validate_http_url(raw["--rabbitmq-management-url"], "--rabbitmq-management-url"),
        rabbitmq_management_ca_file=validate_readable_file(raw["--rabbitmq-management-ca-file"],
                                                           "--rabbitmq-management-ca-file"),
        queue_include=validate_regex(raw["--queue-include"], "--queue-include"),
        queue_exclude=validate_regex(raw["--queue-exclude"], "--queue-exclude"),
        queues=tuple(q.strip() for q in raw["--queues"].split(",") if q.strip()),
        host_metrics=bool(raw["--host-metrics"]),
        host_scan_interval=seconds("--host-scan-interval"),
        host_worker_pattern=validate_regex(raw["--host-worker-pattern"], "--host-worker-pattern"),
        web_config_file=raw["--web-config-file"],
        web_config=web_config,
        max_task_names=cap("--max-task-names"),
        max_workers=cap("--max-workers"),
        max_queues=cap("--max-queues"),
        max_exceptions=cap("--max-exceptions"),
        max_publishers=cap("--max-publishers"),
        flower_metrics=bool(raw["--flower-metrics"]),
        task_sent_hostname=not raw["--generic-hostname-task-sent-metric"],
        generic_worker_task_hostname=bool(raw["--generic-hostname-worker-task-metric"]),
        default_queue_name=_label_value(raw["--default-queue-name"], "--default-queue-name"),
    )


def _label_value(value: str, flag: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(flag, "must not be empty")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main

        return demo_main(argv[1:])
    if argv[:1] == ["doctor"]:
        from .doctor import main as doctor_main

        return doctor_main(argv[1:])
    if argv[:1] == ["healthcheck"]:
        from .healthcheck import main as healthcheck_main

        return healthcheck_main(argv[1:])
    try:
        config = config_from_args(argv)
        sock = bind_listen_socket(config.listen_host, config.listen_port)
    except ConfigError as exc:
        print(f"celery-health-exporter: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as exc:  # e.g. --web-config-file without PyYAML
        print(f"celery-health-exporter: error: missing dependency: {exc}", file=sys.stderr)
        return EXIT_USAGE

    from . import logs

    try:
        from .broker import check_dependencies

        check_dependencies(config)
        from .app import Exporter
    except ImportError as exc:
        sock.close()
        print(f"celery-health-exporter: error: missing dependency: {exc}", file=sys.stderr)
        return EXIT_USAGE

    logs.configure(config.log_level, config.log_format, config.secrets())
    return asyncio.run(Exporter(config, sock).run())


def flags_markdown() -> str:
    """The flags table of the README (a test keeps it in sync with OPTIONS)."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for flag, default, help_text, kind in OPTIONS:
        shown = {"bool": "off", "list": "—"}.get(kind, f"`{default}`" if default != "" else "—")
        env = f"`{env_name(flag)}`" + (" or `CELERY_BROKER_URL`" if flag == "--broker-url" else "")
        if flag in peer_flags.SHARED:
            env += f" or `{peer_flags.peer_env_name(flag)}`"
        rows.append(f"| `{flag}` | {env} | {shown} | {help_text.replace('|', '/')} |")
    rows.extend(peer_flags.flags_markdown_rows(env_name))
    return "\n".join(rows)
