"""RabbitMQ queues: the management HTTP API (aiohttp), or AMQP passive declares without it.

With ``--rabbitmq-management-url`` one listing request per 500 queues
(``columns=`` keeps each item to a few fields) gives ready, unacked,
consumers, consumer utilisation and the broker's cumulative message counts;
one more gives the vhost's client connections. Credentials default to the
broker URL's, the vhost is the broker URL's.

Without it, each queue named in ``--queues`` or seen in events is declared
passively over AMQP: ready messages and consumers only, and no discovery of
queues nobody mentioned (the black holes). The log and the status page say so.
"""
from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from ..state.events import Report, count, count_refused, finite_number, ignore
from ..state.queues import BrokerState, QueuesSnapshot, QueueStats
from .queues_common import PollError, QueuePoller

PAGE_SIZE = 500  # the API's largest page
COLUMNS = ",".join((
    "name", "messages_ready", "messages_unacknowledged", "consumers", "consumer_utilisation",
    "message_stats.publish", "message_stats.deliver_get", "message_stats.redeliver", "message_stats.ack",
))
MISSING_WITHOUT_API = (
    "no --rabbitmq-management-url: queue lengths and consumer counts come from AMQP passive declares of the "
    "queues named in --queues or seen in events only; unacked counts, consumer utilisation, message counters, "
    "connections and the discovery of queues nobody mentioned (black holes) need the management API")


def queue_stats(item: dict, report: Report = ignore) -> QueueStats | None:
    """One item of the queues listing. ``message_stats`` is absent until a queue
    has activity, and a new queue's counts until the next stats emission: 0.

    Numbers go through state.events' readers: a bad one (not a number, not finite,
    negative, beyond 2**53) is reported and its metric left out for this poll (a
    counter absent for one poll, not reset); a bad ready count leaves out the queue
    (None), since its length is the one number a queue must have."""
    stats = item.get("message_stats")
    stats = stats if isinstance(stats, dict) else {}

    def counted(value) -> int | None:
        return 0 if value is None else count(value, report)

    ready = counted(item.get("messages_ready"))
    if ready is None:
        return None
    return QueueStats(
        ready=ready,
        unacked=counted(item.get("messages_unacknowledged")),
        consumers=counted(item.get("consumers")),
        consumer_utilisation=finite_number(item.get("consumer_utilisation"), 0.0, 1.0, report),  # a fraction
        published=counted(stats.get("publish")),
        delivered=counted(stats.get("deliver_get")),
        redelivered=counted(stats.get("redeliver")),
        acked=counted(stats.get("ack")),
    )


class RabbitMQSource(QueuePoller):
    name = "rabbitmq"
    kind = "amqp"

    request_timeout = 10.0  # seconds, every request
    connect_timeout = 5.0
    max_response_bytes = 32 * 1024 * 1024  # one page of 500 queues is ~100 KB

    def __init__(self, config, state, app):
        self.api_url = config.rabbitmq_management_url.rstrip("/")
        self.missing = "" if self.api_url else MISSING_WITHOUT_API
        super().__init__(config, state, app)
        access = management_access(config, app)
        self.vhost, self.api_base, self.user = access.vhost, access.api_base, access.user
        self._authorization = access.authorization
        self._ssl = access.ssl_context() or True  # aiohttp: True = verify with the system CAs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None
        self._amqp = None
        self._channel = None

    def describe(self) -> str:
        if self.api_url:
            return f"management API {self.api_base} (vhost {self.vhost!r}, user {self.user!r})"
        return self.missing

    # ------------------------------------------------------------- lifecycle
    def run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            super().run()
        finally:
            self._loop.close()

    def wake(self) -> None:
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(session.close())
        self._channel = None  # released with its connection
        connection, self._amqp = self._amqp, None
        if connection is not None:
            connection.release()

    # ------------------------------------------------------------------ poll
    def poll(self) -> QueuesSnapshot:
        if not self.api_url:
            return self._poll_amqp()
        if self._loop is None:  # polled directly (tests, benchmark): a loop of our own
            self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._poll_api())
        try:
            return self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            raise PollError("stopped") from None
        finally:
            self._task = None

    async def _poll_api(self) -> QueuesSnapshot:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2, ssl=self._ssl),
                headers={"Accept": "application/json", "Authorization": self._authorization},
            )
        vhost = quote(self.vhost, safe="")
        queues: dict[str, QueueStats] = {}
        refused: list[str] = []
        page = 1
        while True:
            data = await self._get(f"/api/queues/{vhost}",
                                   {"page": page, "page_size": PAGE_SIZE, "columns": COLUMNS})
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise PollError("unexpected answer from the management API: no paginated queue listing "
                                "(a RabbitMQ older than 3.6?)")
            for item in data["items"]:
                name = item.get("name") if isinstance(item, dict) else None
                if isinstance(name, str) and self.accept(name):
                    stats = queue_stats(item, refused.append)
                    if stats is not None:
                        queues[name] = stats
            page_count = count(data.get("page_count"), refused.append) or 0
            if page >= page_count or not data["items"]:  # an empty page ends it whatever page_count says
                break
            page += 1
        connections = await self._get(f"/api/vhosts/{vhost}/connections", {"columns": "name"})
        count_refused(self.state, refused)
        return QueuesSnapshot(queues=queues, taken_at=time.time(),
                              connections=len(connections) if isinstance(connections, list) else None)

    async def _get(self, path: str, params: dict):
        url = self.api_base + path
        try:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout, connect=self.connect_timeout)
            async with self._session.get(url, params=params, timeout=timeout) as response:
                body = await self._read(response)
                if response.status != 200:
                    raise PollError(self._http_error(response.status))
                content_type = response.headers.get("Content-Type", "")
                try:
                    return json.loads(body)
                except ValueError:
                    raise PollError(
                        f"not JSON from the management API at {self.api_base} (HTTP {response.status}, "
                        f"{content_type.split(';')[0] or 'no content type'}): a proxy or error page?") from None
        except PollError:
            raise
        except asyncio.TimeoutError:
            raise PollError(f"no answer from the management API at {self.api_base} within "
                            f"{self.request_timeout:g}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise PollError(f"cannot connect to the management API at {self.api_base}: "
                            f"{exc.os_error.strerror or exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise PollError(f"management API at {self.api_base}: {type(exc).__name__}: {exc}"[:300]) from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        declared = response.content_length
        if declared is not None and declared > self.max_response_bytes:
            raise PollError(f"answer of {declared} bytes from the management API, over the "
                            f"{self.max_response_bytes} limit")
        chunks, size = [], 0
        async for chunk in response.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > self.max_response_bytes:
                raise PollError(f"answer from the management API over the {self.max_response_bytes} bytes limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def _http_error(self, status: int) -> str:
        where = f"the management API at {self.api_base}"
        if status == 401:
            return f"HTTP 401 from {where}: login failed for user {self.user!r} (wrong credentials?)"
        if status == 403:
            return (f"HTTP 403 from {where}: user {self.user!r} may not read vhost {self.vhost!r} "
                    "(it needs the monitoring tag and permissions on the vhost)")
        if status == 404:
            return f"HTTP 404 from {where}: vhost {self.vhost!r} not found (or not a management API URL)"
        return f"HTTP {status} from {where}"

    # ------------------------------------------------------- AMQP fallback
    def _poll_amqp(self) -> QueuesSnapshot:
        if self._amqp is None:
            self._amqp = self.app.connection_for_read(connect_timeout=5, heartbeat=0)
            self._amqp.ensure_connection(max_retries=1)
        with self.state.lock:
            names = BrokerState.known_queues(self.state)
        names.update(self.config.queues)
        queues: dict[str, QueueStats] = {}
        refused: list[str] = []
        for name in sorted(n for n in names if self.accept(n)):
            if self._channel is None:
                self._channel = self._amqp.channel()
            try:
                _, ready, consumers = self._channel.queue_declare(queue=name, passive=True)
            except self._amqp.channel_errors:  # 404: no such queue; the broker closed the channel
                self._channel = None
                continue
            ready, consumers = count(ready, refused.append), count(consumers, refused.append)
            if ready is not None:
                queues[name] = QueueStats(ready=ready, consumers=consumers)
        count_refused(self.state, refused)
        return QueuesSnapshot(queues=queues, taken_at=time.time())


@dataclass(frozen=True)
class ManagementAccess:
    """Where and as whom the management API is read: the one derivation of it."""

    api_base: str  # without credentials: printable
    vhost: str
    user: str
    authorization: str  # the Basic header value
    ca_file: str

    def ssl_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None


def management_access(config, app) -> ManagementAccess:
    """The API's own credentials when its URL has them, else the broker's; the vhost of the broker URL."""
    broker = app.connection_for_read()  # parses the URL, does not connect
    vhost = broker.virtual_host or "/"
    broker_user, broker_password = broker.userid, broker.password
    broker.release()
    api_base, api_user, api_password = _split_credentials(config.rabbitmq_management_url.rstrip("/"))
    user = api_user if api_user is not None else (broker_user or "guest")
    password = api_password if api_user is not None else (broker_password or "guest")
    return ManagementAccess(api_base, vhost, user,
                            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
                            config.rabbitmq_management_ca_file)


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host:15672/x`` -> (``http://host:15672/x``, user, pw): the
    credentials travel in a header only, never in a URL we might print."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None, None
    netloc = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    return (urlunsplit(parts._replace(netloc=netloc)), unquote(parts.username),
            unquote(parts.password or ""))
