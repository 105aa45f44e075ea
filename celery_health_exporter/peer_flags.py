"""prometheus-exporter-celery's (danihodovic/celery-exporter's) command line, read as ours.

A deployment manifest written for that exporter starts this one unchanged: its flags
and its ``CE_*`` environment variables (click's ``auto_envvar_prefix="CE"`` of its
image) are translated into ours before parsing. Where a flag has another name here,
one line names ours; where the meaning differs, the line says how it is read.

Pure: ``translate(argv, env)`` returns the argv and environment to parse and the
lines to print.
"""
from __future__ import annotations

PEER = "prometheus-exporter-celery"
PEER_ENV_PREFIX = "CE_"
NEVER = "inf"  # the peer's 0 for "never" (time a worker out, purge it)

# Flags both exporters have, with the same meaning: their CE_* variable is read when
# ours (CELERY_EXPORTER_*) is not set.
SHARED = ("--broker-url", "--broker-transport-option", "--broker-ssl-option", "--log-level", "--worker-timeout",
          "--queue-wait-buckets", "--generic-hostname-task-sent-metric", "--generic-hostname-worker-task-metric",
          "--queues", "--metric-prefix", "--default-queue-name", "--static-label")
# The peer's repeatable options: click splits their CE_* variable on whitespace, ours on commas.
_REPEATABLE = ("--broker-transport-option", "--broker-ssl-option", "--static-label")
_BOOLEAN = ("--generic-hostname-task-sent-metric", "--generic-hostname-worker-task-metric")
# Flags of the peer only; all take a value.
PEER_ONLY = ("--host", "--port", "--buckets", "--purge-offline-worker-metrics", "--retry-interval",
             "--accept-content")
_SHORT = {"-Q": "--queues"}
# loguru's levels that ours lack
_LOG_LEVELS = {"TRACE": "DEBUG", "SUCCESS": "INFO", "CRITICAL": "ERROR"}
_CLICK_TRUE = ("1", "true", "t", "yes", "y", "on")
_CLICK_FALSE = ("0", "false", "f", "no", "n", "off")


class PeerFlagError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


def peer_env_name(flag: str) -> str:
    return PEER_ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _split(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Our arguments untouched, and the peer-only flags' values (the last one wins, as in click)."""
    rest, peer = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in _SHORT:
            rest.append(_SHORT[flag] + eq + value)
        elif flag in PEER_ONLY:
            if not eq:
                if i + 1 >= len(argv):
                    raise PeerFlagError(flag, "expected one argument")
                i += 1
                value = argv[i]
            peer[flag] = value
        else:
            rest.append(arg)
        i += 1
    return rest, peer


def _never_if_zero(value: str) -> str:
    try:
        return NEVER if float(value) == 0 else value
    except ValueError:
        return value  # ours says what is wrong with it


def _finite_buckets(value: str) -> str:
    """The peer's buckets end in inf (prometheus_client's default, as its --help shows them); ours add +Inf."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if items and items[-1].lower().lstrip("+") in ("inf", "infinity"):
        items = items[:-1]
    return ",".join(items)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The last value given to ``flag`` on our command line (None when absent)."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == flag:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _replace_values(argv: list[str], flag: str, convert) -> list[str]:
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name == flag and eq:
            out[i] = f"{flag}={convert(value)}"
        elif name == flag and not eq and i + 1 < len(out):
            out[i + 1] = convert(out[i + 1])
    return out


def translate(argv: list[str], env, our_env_name) -> tuple[list[str], dict, list[str]]:
    """(argv, env, notices): the peer's flags and CE_* variables turned into ours."""
    argv, peer = _split(list(argv))
    env = dict(env)
    notices: list[str] = []

    def note(what: str, how: str) -> None:
        notices.append(f"celery-health-exporter: {what} ({PEER}'s) {how}")

    for flag in PEER_ONLY:  # flags win over environment variables, as in click
        if flag not in peer and env.get(peer_env_name(flag)) is not None:
            peer[flag] = env[peer_env_name(flag)]
            note(peer_env_name(flag), "read as the flag " + flag)

    # Shared flags: CE_* stands in for our variable; the peer's forms of values become ours.
    for flag in SHARED:
        ours, theirs = our_env_name(flag), peer_env_name(flag)
        if env.get(ours) is None and env.get(theirs) is not None:
            value = env[theirs]
            if flag in _REPEATABLE:
                value = ",".join(value.split())
            elif flag in _BOOLEAN:
                lowered = value.strip().lower()
                value = "true" if lowered in _CLICK_TRUE else "false" if lowered in _CLICK_FALSE else value
            env[ours] = value
    level = _flag_value(argv, "--log-level") or env.get(our_env_name("--log-level"))
    if level is not None and level.upper() in _LOG_LEVELS:
        note(f"log level {level}", f"read as {_LOG_LEVELS[level.upper()]}")
        argv = _replace_values(argv, "--log-level", lambda v: _LOG_LEVELS.get(v.upper(), v))
        if our_env_name("--log-level") in env:
            env[our_env_name("--log-level")] = _LOG_LEVELS.get(env[our_env_name("--log-level")].upper(),
                                                               env[our_env_name("--log-level")])
    for flag in ("--worker-timeout",):
        given = _flag_value(argv, flag)
        source_value = given if given is not None else env.get(our_env_name(flag))
        if source_value is not None and _never_if_zero(source_value) == NEVER:
            note(f"{flag} 0", "means never, as there")
            argv = _replace_values(argv, flag, _never_if_zero)
            if given is None:
                env[our_env_name(flag)] = NEVER
    if "--queue-wait-buckets" in argv or any(a.startswith("--queue-wait-buckets=") for a in argv):
        argv = _replace_values(argv, "--queue-wait-buckets", _finite_buckets)
    if our_env_name("--queue-wait-buckets") in env:
        env[our_env_name("--queue-wait-buckets")] = _finite_buckets(env[our_env_name("--queue-wait-buckets")])

    if "--host" in peer or "--port" in peer:
        if _flag_value(argv, "--listen-address") is not None:
            raise PeerFlagError("--listen-address", f"give either --listen-address or {PEER}'s --host/--port")
        host = peer.pop("--host", "0.0.0.0")
        port = peer.pop("--port", "9808")
        host = f"[{host}]" if ":" in host else host
        argv.append(f"--listen-address={host}:{port}")
        note("--host/--port", f"read as --listen-address {host}:{port}")
    if "--buckets" in peer:
        argv.append(f"--runtime-buckets={_finite_buckets(peer.pop('--buckets'))}")
        note("--buckets", "read as --runtime-buckets")
    if "--purge-offline-worker-metrics" in peer:
        value = _never_if_zero(peer.pop("--purge-offline-worker-metrics"))
        argv.append(f"--purge-offline-after={value}")
        note("--purge-offline-worker-metrics", "read as --purge-offline-after" + (" inf (0: never)"
                                                                                   if value == NEVER else ""))
    if "--retry-interval" in peer:
        peer.pop("--retry-interval")
        note("--retry-interval", "ignored: this exporter always reconnects to the broker, with backoff "
             "(celery_exporter_broker_reconnects_total), and never exits for a broker outage")
    if "--accept-content" in peer:
        accepted = [c.strip().lower() for c in peer.pop("--accept-content").split(",") if c.strip()]
        extra = [c for c in accepted if c not in ("json", "application/json")]
        if extra:
            note("--accept-content", f"ignored for {', '.join(extra)}: events are read as JSON only (Celery's "
                 "event_serializer default); events in another serializer are counted in "
                 "celery_exporter_events_malformed_total{reason=\"content_type\"}")
        else:
            note("--accept-content", "json: events are read as JSON, nothing to set")
    return argv, env, notices


def flags_markdown_rows(our_env_name) -> list[str]:
    """README rows of the peer's flags that have no flag of ours by that name."""
    meaning = {
        "--host": "prometheus-exporter-celery's: with --port, read as --listen-address HOST:PORT.",
        "--port": "prometheus-exporter-celery's: with --host, read as --listen-address HOST:PORT.",
        "--buckets": "prometheus-exporter-celery's: read as --runtime-buckets (a last `inf` is dropped).",
        "--purge-offline-worker-metrics": "prometheus-exporter-celery's: read as --purge-offline-after (0: never).",
        "--retry-interval": "prometheus-exporter-celery's: ignored with one line (this exporter always "
                            "reconnects with backoff).",
        "--accept-content": "prometheus-exporter-celery's: events are read as JSON; other serializers are named "
                            "in one line and their events counted as malformed.",
        "-Q": "prometheus-exporter-celery's short form of --queues.",
    }
    rows = [f"| `{flag}` | `{peer_env_name(flag)}` | — | {text} |" for flag, text in meaning.items()
            if flag != "-Q"]
    rows.append(f"| `-Q` | — | — | {meaning['-Q']} |")
    return rows
