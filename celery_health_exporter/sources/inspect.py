"""Remote control: what the workers say about themselves when asked.

Every ``--inspect-interval`` seconds, one broadcast per command (not one per
worker, so hundreds of workers cost the same five round trips): ``stats``,
``active_queues``, ``conf``, ``active``, ``reserved``, and the worker hook's
``celery_health`` for the workers that advertise it in their conf. Workers
that do not answer within ``--inspect-timeout`` are simply missing from that
poll. Never on the scrape path.

``inspect revoked`` returns each worker's whole revoked list (up to ~2 MB per
worker), so it only runs every ``--revoked-interval`` seconds, when set, and
only for workers without the hook.
"""
from __future__ import annotations

import time

from ..hooks.protocol import WORKER_HOOK_COMMAND as HOOK_COMMAND
from ..hooks.protocol import WORKER_HOOK_CONF_KEY as HOOK_CONF_KEY
from ..logs import describe_error
from .base import Backoff, Source, is_outage

COMMANDS = ("stats", "active_queues", "conf", "active", "reserved")
# Redis: while kombu waits for the replies it also "restores" the workers' unacked messages
# older than the visibility timeout, pushing them back into their task queues. Not a
# monitor's business (and a write that a read-mostly ACL user must not need): none here.
MONITOR_ONLY = {"unacked_restore_limit": 0}
# A poll's view of who consumes what holds until this many polls were missed.
POLLS_VALID = 3


class InspectSource(Source):
    name = "inspect"
    # A broadcast waits out its reply timeout and cannot be interrupted: abandon it on stop.
    stop_timeout = 0.5

    def __init__(self, config, state, app):
        super().__init__()
        self.config = config
        self.state = state
        self.app = app
        self._next_revoked = 0.0
        # Workers seen with the hook; a conf reply that missed one poll's timeout
        # must not send it the heavy `inspect revoked`.
        self._hooked: set[str] = set()

    def describe(self) -> str:
        return f"{', '.join(COMMANDS)} every {self.config.inspect_interval:g}s"

    def run(self) -> None:
        backoff = Backoff(first=self.config.inspect_interval, ceiling=max(60.0, self.config.inspect_interval))
        while not self.stopping:
            try:
                with self.app.connection_for_read(heartbeat=0, connect_timeout=5,
                                                  transport_options=MONITOR_ONLY) as connection:
                    while not self.stopping:
                        started = time.monotonic()
                        with self.bugs_contained("polling remote control"):
                            self.poll(connection)
                        self.health.last_poll_seconds = time.monotonic() - started
                        self.mark_up()
                        backoff.reset()
                        if self.sleep(self.config.inspect_interval):
                            return
            except Exception as exc:  # an outage (bugs_contained let only those through) or a bug in connecting
                if self.stopping:
                    return
                if not is_outage(exc):
                    raise
                self.mark_down(describe_error(exc))
                self.sleep(backoff.next())

    def _ask(self, connection, command: str, destination=None, **arguments) -> dict:
        replies = self.app.control.broadcast(
            command, arguments=arguments, reply=True, timeout=self.config.inspect_timeout,
            destination=destination, connection=connection) or []
        merged = {}
        for reply in replies:
            if isinstance(reply, dict):
                merged.update(reply)
        return merged

    def poll(self, connection) -> None:
        now = time.time()
        replies = {}
        for command in COMMANDS:
            if command == "active":
                active_asked_at = time.time()  # what the answer can be compared with (see apply_active_ids)
            replies[command] = self._ask(connection, command)
        for host, conf in replies["conf"].items():
            if isinstance(conf, dict):
                (self._hooked.add if conf.get(HOOK_CONF_KEY) else self._hooked.discard)(host)
        hooked = sorted(self._hooked)
        hook_replies = self._ask(connection, HOOK_COMMAND, destination=hooked) if hooked else {}
        revoked = {}
        if self.config.revoked_interval and now >= self._next_revoked:
            self._next_revoked = now + self.config.revoked_interval
            with self.state.lock:
                unhooked = sorted(set(self.state.workers) - set(hooked))
            if unhooked:
                revoked = self._ask(connection, "revoked", destination=unhooked)
        now = time.time()
        state = self.state
        with state.lock:
            for hostname, stats in replies["stats"].items():
                state.apply_stats(hostname, stats, now)
            for hostname, queues in replies["active_queues"].items():
                state.apply_active_queues(hostname, queues)
            for hostname, conf in replies["conf"].items():
                state.apply_conf(hostname, conf)
            for hostname, active in replies["active"].items():
                state.apply_active_reserved(hostname, active, replies["reserved"].get(hostname))
            state.apply_active_ids(
                {hostname: {r.get("id") for r in active if isinstance(r, dict)}
                 for hostname, active in replies["active"].items() if isinstance(active, list)},
                active_asked_at, settle=self.config.inspect_timeout + 2.0)
            for hostname, reply in hook_replies.items():
                state.apply_hook(hostname, reply, now)
            for hostname, ids in revoked.items():
                if isinstance(ids, list):
                    state.apply_revoked_count(hostname, len(ids), None, now)
            poll_takes = (len(COMMANDS) + 2) * self.config.inspect_timeout
            state.remote_control_polled(now, POLLS_VALID * (self.config.inspect_interval + poll_takes))
