"""`celery-health-exporter doctor`: watch a cluster for a while, then say what is wrong and how to fix it.

Exit codes: 0 nothing wrong, 1 problems found (critical or warning findings),
2 bad input or an unreachable broker. The same sources and findings engine as
the daemon; every daemon flag (except --listen-address) works here too.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

from .config import ConfigError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*$")


def parse_duration(text: str) -> float:
    match = _DURATION.match(text or "")
    if not match:
        raise ConfigError("--duration", f"expected a duration like 30s, 2m or 90, got {text!r}")
    value = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    if value <= 0:
        raise ConfigError("--duration", "must be more than 0")
    return value


def render(findings, fmt: str, *, duration: float, workers: int, events: int, broker: str) -> str:
    problems = [f for f in findings if f.severity != "info"]
    if fmt == "json":
        return json.dumps({"broker": broker, "watched_seconds": duration, "workers": workers, "events": events,
                           "problems": len(problems), "findings": [f.as_dict() for f in findings]}, indent=2)
    lines = []
    if fmt == "markdown":
        lines.append(f"# Celery health report\n\nBroker `{broker}`, watched {duration:g}s: {workers} worker(s), "
                     f"{events} event(s), {len(problems)} problem(s).\n")
        for f in findings:
            lines += [f"## {f.severity.upper()}: {f.summary}", "", f"- **Why it matters:** {f.why}",
                      f"- **Fix:** {f.fix}",
                      f"- **Tracked by:** `{f.metric}`" + (f", alert `{f.alert}`" if f.alert else ""), ""]
        if not findings:
            lines.append("No problem found.")
        return "\n".join(lines)
    lines.append(f"Watched {broker} for {duration:g}s: {workers} worker(s), {events} event(s), "
                 f"{len(problems)} problem(s).")
    for f in findings:
        lines += ["", f"[{f.severity.upper()}] {f.summary}", f"  why: {f.why}", f"  fix: {f.fix}",
                  f"  metric: {f.metric}" + (f"   alert: {f.alert}" if f.alert else "")]
    if not findings:
        lines.append("No problem found.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from .cli import config_from_args

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--duration", default="30s")
    parser.add_argument("--format", default="text")
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        print("usage: celery-health-exporter doctor --broker-url URL [--duration 30s] "
              "[--format text|json|markdown] [any daemon flag]\n\n" + (__doc__ or ""))
        return EXIT_OK
    try:
        duration = parse_duration(own.duration)
        if own.format not in ("text", "json", "markdown"):
            raise ConfigError("--format", f"expected text, json or markdown, got {own.format!r}")
        config = config_from_args(rest)
    except ConfigError as exc:
        print(f"celery-health-exporter doctor: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # argparse already printed its one line
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    from . import logs
    from .app import Ticker, build_state, diagnose_now, internal_errors
    from .broker import check_dependencies, make_app
    from .sources import build_sources

    logs.configure("ERROR", config.log_format, config.secrets())  # the report is the output
    app = make_app(config)
    try:
        check_dependencies(config, app)
    except ImportError as exc:
        print(f"celery-health-exporter doctor: error: missing dependency: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with app.connection_for_read(connect_timeout=5) as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        print(f"celery-health-exporter doctor: error: cannot reach the broker {config.masked_broker_url}: "
              f"{logs.describe_error(exc)}", file=sys.stderr)
        return EXIT_USAGE

    state = build_state(config)
    sources = build_sources(config, state, app)
    for source in sources:
        source.start()
    ticker = Ticker(state).start()  # silent workers and lost tasks are time-driven, as in the daemon
    interactive = sys.stderr.isatty()
    deadline = time.monotonic() + duration
    try:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            with state.lock:
                workers = sum(1 for w in state.workers.values() if w.up)
                events = sum(state.events_by_type.values())
            if interactive:
                sys.stderr.write(f"\rwatching: {max(0, deadline - time.monotonic()):3.0f}s left, "
                                 f"{events} events, {workers} workers ")
                sys.stderr.flush()
    except KeyboardInterrupt:
        pass
    finally:
        if interactive:
            sys.stderr.write("\r" + " " * 60 + "\r")
        for source in sources:
            source.stop(1.0)
        ticker.stop()
    findings = diagnose_now(state, config, errors=internal_errors(sources, ticker.bugs))
    with state.lock:
        workers = sum(1 for w in state.workers.values() if w.up)
        events = sum(state.events_by_type.values())
    print(render(findings, own.format, duration=duration, workers=workers, events=events,
                 broker=config.masked_broker_url))
    return EXIT_PROBLEMS if any(f.severity != "info" for f in findings) else EXIT_OK
