"""The one client of the RabbitMQ management HTTP API.

Who reads it: the queue poller (``rabbitmq.py``: the queue listing and the
vhost's connections) and the events source (its own queue's counters, for the
events RabbitMQ dropped). Both go through ``ManagementAPI``, so that the
credentials, TLS, timeouts, size limit and the wording of failures are decided
here once.

- Credentials are the management URL's when it has them, else the broker
  URL's; they travel in a header only, never in a URL we might print.
- ``https://`` is verified against the system CAs or
  ``--rabbitmq-management-ca-file``, host name included.
- Every request is bounded as a whole (``request_timeout``, also against a
  server that drips its answer) and in size (``max_response_bytes``).
- Every failure becomes a ``PollError`` with one line that names what to fix:
  RabbitMQ's own reason for a 401/403 (``Not management user``, a login
  refused, a vhost not accessible) reaches the user as RabbitMQ said it.

Each thread that reads the API has its own ``ManagementAPI`` (aiohttp's
session belongs to one event loop); ``cancel()`` may be called from any thread.
"""
from __future__ import annotations

import asyncio
import base64
import json
import ssl
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aiohttp

from .queues_common import PollError

PAGE_SIZE = 500  # the API's largest page
# What the monitoring tag gives that a plain management user lacks: every connection of
# the vhost (not only the user's own). administrator includes it.
MONITORING_TAGS = {"monitoring", "administrator"}


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
    """``http://user:pw@host:15672/x`` -> (``http://host:15672/x``, user, pw)."""
    parts = urlsplit(url)
    if parts.username is None:
        return url, None, None
    netloc = parts.hostname if ":" not in (parts.hostname or "") else f"[{parts.hostname}]"
    if parts.port:
        netloc += f":{parts.port}"
    return (urlunsplit(parts._replace(netloc=netloc)), unquote(parts.username),
            unquote(parts.password or ""))


class ManagementAPI:
    """Synchronous calls, each run on this client's own event loop."""

    request_timeout = 10.0  # seconds, a whole request
    connect_timeout = 5.0
    max_response_bytes = 32 * 1024 * 1024  # one page of 500 queues is ~100 KB

    def __init__(self, access: ManagementAccess, *, request_timeout: float | None = None):
        self.access = access
        self.base = access.api_base
        self.vhost = access.vhost
        self.user = access.user
        if request_timeout is not None:
            self.request_timeout = request_timeout
        self._ssl = access.ssl_context() or True  # aiohttp: True = verify with the system CAs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    # ----------------------------------------------------------- endpoints
    def queues(self, columns: str) -> list[dict]:
        """Every queue of the vhost, ``columns`` only, one request per PAGE_SIZE queues."""
        vhost = quote(self.vhost, safe="")
        items: list[dict] = []
        page = 1
        while True:
            data = self.get(f"/api/queues/{vhost}", {"page": page, "page_size": PAGE_SIZE, "columns": columns})
            if not isinstance(data, dict) or not isinstance(data.get("items"), list):
                raise PollError("unexpected answer from the management API: no paginated queue listing "
                                "(a RabbitMQ older than 3.6?)")
            items.extend(item for item in data["items"] if isinstance(item, dict))
            page_count = data.get("page_count")
            if (not isinstance(page_count, int) or page >= page_count
                    or not data["items"]):  # an empty page ends it whatever page_count says
                return items
            page += 1

    def queue(self, name: str) -> dict | None:
        # No `columns=` here: on the single-queue endpoint RabbitMQ 3.10 answers it with [].
        info = self.get(f"/api/queues/{quote(self.vhost, safe='')}/{quote(name, safe='')}")
        return info if isinstance(info, dict) else None

    def connections(self) -> list | None:
        """The vhost's client connections (all of them only with the monitoring tag)."""
        found = self.get(f"/api/vhosts/{quote(self.vhost, safe='')}/connections", {"columns": "name"})
        return found if isinstance(found, list) else None

    def tags(self) -> set[str] | None:
        """The tags of the user we read as (``/api/whoami``)."""
        who = self.get("/api/whoami")
        tags = who.get("tags") if isinstance(who, dict) else None
        if isinstance(tags, str):  # RabbitMQ < 3.9: "monitoring,management"
            tags = tags.split(",")
        if not isinstance(tags, list):
            return None
        return {t.strip() for t in tags if isinstance(t, str)}

    # ------------------------------------------------------------ plumbing
    def get(self, path: str, params: dict | None = None):
        """The JSON answer of one GET, or PollError."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._get(path, params or {}))
        try:
            return self._loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            raise PollError("stopped") from None
        finally:
            self._task = None

    def cancel(self) -> None:
        """Interrupt the request under way (any thread): it raises PollError('stopped')."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile: nothing left to interrupt
                pass

    def close(self) -> None:
        session, self._session = self._session, None
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        try:
            if session is not None:
                loop.run_until_complete(session.close())
        finally:
            loop.close()

    async def _get(self, path: str, params: dict):
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=2, ssl=self._ssl),
                headers={"Accept": "application/json", "Authorization": self.access.authorization},
            )
        url = self.base + path
        try:
            timeout = aiohttp.ClientTimeout(total=self.request_timeout, connect=self.connect_timeout)
            async with self._session.get(url, params=params, timeout=timeout) as response:
                body = await self._read(response)
                if response.status != 200:
                    raise PollError(self._http_error(response.status, body))
                content_type = response.headers.get("Content-Type", "")
                try:
                    return json.loads(body)
                except ValueError:
                    raise PollError(
                        f"not JSON from the management API at {self.base} (HTTP {response.status}, "
                        f"{content_type.split(';')[0] or 'no content type'}): a proxy or error page?") from None
        except PollError:
            raise
        except asyncio.TimeoutError:
            raise PollError(f"no answer from the management API at {self.base} within "
                            f"{self.request_timeout:g}s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise PollError(f"TLS certificate of the management API at {self.base} not accepted: "
                            f"{_certificate_problem(exc.certificate_error)}") from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise PollError(f"TLS with the management API at {self.base} failed: {exc.os_error}"[:300]) from None
        except aiohttp.ClientConnectorError as exc:
            raise PollError(f"cannot connect to the management API at {self.base}: "
                            f"{exc.os_error.strerror or exc.os_error}") from None
        except aiohttp.ClientError as exc:
            raise PollError(f"management API at {self.base}: {type(exc).__name__}: {exc}"[:300]) from None

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

    def _http_error(self, status: int, body: bytes = b"") -> str:
        where = f"the management API at {self.base}"
        said = _rabbitmq_reason(body)
        quoted = f" (RabbitMQ: {said})" if said else ""
        if status == 401 and said == "Not management user":
            return (f"HTTP 401 from {where}: user {self.user!r} has no management tag; give it the monitoring "
                    f"tag (rabbitmqctl set_user_tags {self.user} monitoring){quoted}")
        if status == 401:
            return f"HTTP 401 from {where}: login failed for user {self.user!r} (wrong credentials?){quoted}"
        if status == 403:
            return (f"HTTP 403 from {where}: user {self.user!r} may not read vhost {self.vhost!r} "
                    f"(it needs the monitoring tag and permissions on the vhost){quoted}")
        if status == 404:
            return f"HTTP 404 from {where}: vhost {self.vhost!r} not found (or not a management API URL)"
        return f"HTTP {status} from {where}{quoted}"


def _rabbitmq_reason(body: bytes) -> str:
    """The ``reason`` of RabbitMQ's JSON error body, on one short line ('' when there is none)."""
    try:
        reason = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return ""
    return " ".join(reason.split())[:200] if isinstance(reason, str) else ""


def _certificate_problem(error: BaseException) -> str:
    """OpenSSL's verdict in words (``certificate verify failed: unable to get local issuer
    certificate``, ``Hostname mismatch, certificate is not valid for 'x'``)."""
    message = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
    return f"certificate verify failed: {message}" if getattr(error, "verify_message", None) else str(message)
