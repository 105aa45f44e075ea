"""Redis queues: kombu's keys, read directly.

The connection comes from kombu itself (its Redis channel's connection pool),
so every URL kombu accepts works the same here: the db number, rediss:// with
``--broker-ssl-option``, ``sentinel://`` with ``master_name``. The key layout
comes from the same channel, so ``global_keyprefix``, ``sep``,
``priority_steps``, ``unacked_key`` and ``visibility_timeout`` given as
``--broker-transport-option`` are honoured exactly as kombu honours them.

- Queues: kombu's binding sets ``_kombu.binding.<exchange>`` (SCAN, a bounded
  number of calls per poll, resumed at the next poll), queues seen in events or
  in the workers' active_queues, and ``--queues``.
- Length: LLEN of the queue plus each priority sub-queue ``<queue><sep><step>``.
- Unacked: the hash ``unacked`` (value ``[message, exchange, routing_key]``) read
  with HSCAN up to a budget, attributed to queues through the bindings as kombu
  does when it restores a message; delivery times from the sorted set
  ``unacked_index``. Over the budget, counts are scaled from the sample and
  ``celery_broker_unacked_sampled`` says so.
- Consumers: Redis cannot tell; counted at scrape time from the workers'
  active_queues (remote-control poller), absent when those are unknown.

Any client can write these keys: a delivery time in ``unacked_index`` that is
not a plausible Unix time (±inf, years away) is refused by state.events'
``timestamp`` reader, counted in ``celery_exporter_events_malformed_total``
(``bad_timestamp``) and left out of the oldest-unacked age.

Synchronous redis-py in the source's own thread: kombu's pool is synchronous,
and one poll is a handful of pipelined round trips.
"""
from __future__ import annotations

import json
import re
import time

import redis

from ..state.events import MAX_DURATION, count, count_refused, timestamp
from ..state.queues import BrokerState, QueuesSnapshot, QueueStats
from .queues_common import QueuePoller

BINDING_PREFIX = "_kombu.binding."
# kombu leaves the socket timeouts unset (wait forever); a poller must not hang on a dead connection.
DEFAULT_TRANSPORT_OPTIONS = {"socket_timeout": 10, "socket_connect_timeout": 5}
PIPELINE_CHUNK = 1000


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def priority_key(queue: str, step: int, sep: str) -> str:
    """kombu ``Channel._q_for_pri``: step 0 is the queue's own list."""
    return f"{queue}{sep}{step}" if step else queue


class RedisQueuesSource(QueuePoller):
    name = "redis"
    kind = "redis"

    scan_count = 1000  # COUNT hint of each SCAN call
    scan_calls_per_poll = 100  # at most ~100k keys looked at per poll; a bigger keyspace takes several polls
    unacked_budget = 10_000  # entries of the unacked hash read per poll; above, counts are sampled
    oldest_unacked_probe = 100  # the oldest deliveries always read, so the oldest age stays exact

    def __init__(self, config, state, app):
        super().__init__(config, state, app)
        self._connection = None
        self._channel = None
        self._client: redis.Redis | None = None
        self._cursor = 0
        self._partial_keys: set[str] = set()
        self._binding_keys: set[str] | None = None

    def describe(self) -> str:
        channel = self._channel
        if channel is None:
            return "kombu's keys (not connected yet)"
        prefix = f", global_keyprefix {channel.global_keyprefix!r}" if channel.global_keyprefix else ""
        return (f"kombu's keys{prefix}; consumers from the workers' active_queues; "
                f"visibility_timeout {float(channel.visibility_timeout):g}s")

    # ------------------------------------------------------------ connection
    def _connect(self):
        if self._client is None:
            options = {**DEFAULT_TRANSPORT_OPTIONS, **self.app.conf.broker_transport_options}
            connection = self.app.connection_for_read(transport_options=options)
            try:
                channel = connection.channel()  # kombu's Redis channel: pings the server
            except Exception:
                connection.release()
                raise
            self._connection, self._channel = connection, channel
            self._client = redis.Redis(connection_pool=channel.pool)  # keys prefixed by hand below
        return self._client, self._channel

    def close(self) -> None:
        connection = self._connection
        self._client = self._channel = self._connection = None
        if connection is not None:
            connection.release()

    # ------------------------------------------------------------------ poll
    def poll(self) -> QueuesSnapshot:
        client, channel = self._connect()
        prefix = channel.global_keyprefix or ""
        sep = channel.sep
        steps = list(channel.priority_steps)

        routes, bound = self._bindings(client, prefix, sep)
        refused: list[str] = []
        counts, oldest, sampled = self._unacked(client, prefix, channel, routes, refused.append)
        with self.state.lock:
            names = BrokerState.known_queues(self.state)
        names.update(self.config.queues)
        names.update(bound)
        names.update(counts)
        names = sorted(name for name in names if self.accept(name))

        keys = [prefix + priority_key(name, step, sep) for name in names for step in steps]
        lengths = self._pipelined(client, "llen", keys)
        queues: dict[str, QueueStats] = {}
        for i, name in enumerate(names):
            row = lengths[i * len(steps):(i + 1) * len(steps)]
            by_priority = {str(step): count(n, refused.append) or 0 for step, n in zip(steps, row)}
            queues[name] = QueueStats(
                ready=sum(by_priority.values()), by_priority=by_priority,
                unacked=counts.get(name, 0), oldest_unacked_at=oldest.get(name))
        count_refused(self.state, refused)
        return QueuesSnapshot(queues=queues, taken_at=time.time(),
                              visibility_timeout=float(channel.visibility_timeout),
                              unacked_sampled=sampled, consumers_from_workers=True)

    @staticmethod
    def _pipelined(client, command: str, keys: list, *leading) -> list:
        """``command(*leading, key)`` for every key, PIPELINE_CHUNK per round trip."""
        results = []
        for start in range(0, len(keys), PIPELINE_CHUNK):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + PIPELINE_CHUNK]:
                getattr(pipe, command)(*leading, key)
            results.extend(pipe.execute())
        return results

    # -------------------------------------------------------------- bindings
    def _binding_key_names(self, client, prefix: str) -> set[str]:
        """kombu's binding sets, found with SCAN in bounded steps: a big keyspace
        (results in the same db) is walked over several polls, never in one."""
        pattern = _glob_escape(prefix + BINDING_PREFIX) + "*"
        for _ in range(self.scan_calls_per_poll):
            self._cursor, keys = client.scan(self._cursor, match=pattern, count=self.scan_count)
            self._partial_keys.update(_text(k) for k in keys)
            if self._cursor == 0:
                self._binding_keys, self._partial_keys = self._partial_keys, set()
                return self._binding_keys
        return (self._binding_keys or set()) | self._partial_keys

    def _bindings(self, client, prefix: str, sep: str):
        """(routes, queues): routes maps (exchange, routing key) to the queues bound
        with it, as kombu's ``_lookup`` resolves a message it restores."""
        key_names = sorted(self._binding_key_names(client, prefix))
        members = self._pipelined(client, "smembers", key_names)
        routes: dict[tuple[str, str], set[str]] = {}
        queues: set[str] = set()
        for key, values in zip(key_names, members):
            exchange = key[len(prefix) + len(BINDING_PREFIX):]
            for value in values or ():
                parts = _text(value).split(sep)
                if len(parts) != 3 or not parts[2]:
                    continue
                routing_key, _pattern, queue = parts
                queues.add(queue)
                routes.setdefault((exchange, routing_key), set()).add(queue)
        return routes, queues

    # --------------------------------------------------------------- unacked
    def _unacked(self, client, prefix: str, channel, routes, report):
        """Per queue: unacked count and oldest delivery time; and whether sampled."""
        now = time.time()
        hash_key = prefix + channel.unacked_key
        index_key = prefix + channel.unacked_index_key
        total = client.hlen(hash_key)
        if not total:
            return {}, {}, False
        entries: dict[str, list[str]] = {}  # delivery tag -> queues
        cursor, budget = 0, max(1, self.unacked_budget)
        count_hint = max(10, min(1000, budget))
        while True:
            cursor, chunk = client.hscan(hash_key, cursor, count=count_hint)
            for tag, value in chunk.items():
                entries[_text(tag)] = self._queues_of(value, routes)
            if cursor == 0 or len(entries) >= budget:
                break
        sampled = cursor != 0 and len(entries) < total

        counts: dict[str, int] = {}
        for queues in entries.values():
            for queue in queues:
                counts[queue] = counts.get(queue, 0) + 1
        if sampled:
            scale = total / len(entries)
            counts = {queue: int(round(n * scale)) for queue, n in counts.items()}

        tags = list(entries)
        scores = self._pipelined(client, "zscore", tags, index_key)
        oldest: dict[str, float] = {}

        def note(queues, score):
            score = timestamp(score, now, report, MAX_DURATION)  # a delivery time: may be long ago
            if score is None:
                return
            for queue in queues:
                if score < oldest.get(queue, float("inf")):
                    oldest[queue] = score

        for tag, score in zip(tags, scores):
            note(entries[tag], score)
        if sampled:  # the oldest deliveries may be outside the sample: read them too
            head = client.zrange(index_key, 0, self.oldest_unacked_probe - 1, withscores=True)
            if head:
                values = client.hmget(hash_key, [tag for tag, _ in head])
                for (tag, score), value in zip(head, values):
                    if value is not None:
                        note(self._queues_of(value, routes), score)
        return counts, oldest, sampled

    @staticmethod
    def _queues_of(value, routes) -> list[str]:
        """The queues an unacked entry goes back to: ``[message, exchange, routing_key]``."""
        try:
            _message, exchange, routing_key = json.loads(value)
        except (ValueError, TypeError):
            return []
        if not isinstance(routing_key, str):
            return []
        if exchange:
            bound = routes.get((exchange, routing_key))
            if bound:
                return sorted(bound)
        return [routing_key] if routing_key else []
