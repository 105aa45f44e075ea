"""A RabbitMQ node of the test's own: own node name, ports, data, config, certificates.

The machine's RabbitMQ is shared and must not be reconfigured (no TLS listener, no
users or policies). This starts Debian's ``rabbitmq-server`` beside it, as root with
every path under a temporary directory: plain AMQP, AMQPS (client certificate
required, verified against a CA the test made), the management API over HTTP and
HTTPS, and statistics every second (the default 5 s makes every wait long).

One node per test module (a module-scoped fixture): it starts in about 5 s here.
It registers with the machine's epmd like any Erlang node; nothing else is shared.
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from tests.certs import make_certificates
from tests.harness import free_port, wait_for

SBIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts without the wrapper that switches to the rabbitmq user
START_TIMEOUT = 60  # a loaded CI machine (2 cores, several brokers) can be slow; it usually takes ~5 s


# ------------------------------------------------------------------ the node

class RabbitMQNode:
    """``start()`` returns once AMQP, AMQPS and both management listeners answer."""

    def __init__(self, base: Path):
        self.base = base
        self.name = f"ce-test-{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.amqp_port, self.amqps_port = free_port(), free_port()
        self.api_port, self.api_tls_port = free_port(), free_port()
        self.dist_port = free_port()
        self.pki = make_certificates(base / "pki")
        self.home = base / "home"  # the Erlang cookie of this node and of rabbitmqctl for it
        self.admin = ("admin", f"admin-{secrets.token_hex(8)}")
        self.proc: subprocess.Popen | None = None
        self.log_path = base / "server.out"

    # urls ----------------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def api_tls_url(self) -> str:
        return f"https://localhost:{self.api_tls_port}"

    def amqp_url(self, user: str, password: str, vhost: str = "/") -> str:
        return (f"amqp://{user}:{urllib.parse.quote(password, safe='')}@127.0.0.1:{self.amqp_port}/"
                f"{urllib.parse.quote(vhost, safe='')}")

    def amqps_url(self, user: str, password: str, vhost: str = "/", host: str = "localhost") -> str:
        return (f"amqps://{user}:{urllib.parse.quote(password, safe='')}@{host}:{self.amqps_port}/"
                f"{urllib.parse.quote(vhost, safe='')}")

    def client_ssl_options(self, ca: Path | None = None) -> list[str]:
        """``--broker-ssl-option`` flags: CA verification on, our client certificate."""
        return ["--broker-ssl-option", f"ca_certs={ca or self.pki.ca}",
                "--broker-ssl-option", "cert_reqs=CERT_REQUIRED",
                "--broker-ssl-option", f"certfile={self.pki.client_cert}",
                "--broker-ssl-option", f"keyfile={self.pki.client_key}"]

    # lifecycle -----------------------------------------------------------
    def _env(self) -> dict:
        b = self.base
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.home),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(b / "mnesia"),
            "RABBITMQ_LOG_BASE": str(b / "log"),
            "RABBITMQ_CONFIG_FILE": str(b / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(b / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(b / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(b / "rabbitmq-env.conf"),  # not /etc's, which names the shared node
            "RABBITMQ_PID_FILE": str(b / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _write_config(self) -> None:
        b, pki = self.base, self.pki
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        for d in ("mnesia", "log"):
            (b / d).mkdir(exist_ok=True)
        (b / "rabbitmq-env.conf").write_text("")
        (b / "advanced.config").write_text("[].\n")
        (b / "enabled_plugins").write_text("[rabbitmq_management].\n")
        user, password = self.admin
        (b / "rabbitmq.conf").write_text("\n".join([
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}",
            f"ssl_options.cacertfile = {pki.ca}",
            f"ssl_options.certfile = {pki.server_cert}",
            f"ssl_options.keyfile = {pki.server_key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "management.tcp.ip = 127.0.0.1",
            f"management.tcp.port = {self.api_port}",
            "management.ssl.ip = 127.0.0.1",
            f"management.ssl.port = {self.api_tls_port}",
            f"management.ssl.cacertfile = {pki.ca}",
            f"management.ssl.certfile = {pki.server_cert}",
            f"management.ssl.keyfile = {pki.server_key}",
            "collect_statistics_interval = 1000",
            f"default_user = {user}",
            f"default_pass = {password}",
            "default_user_tags.administrator = true",
            "default_permissions.configure = .*",
            "default_permissions.read = .*",
            "default_permissions.write = .*",
            "loopback_users = none",
            "log.console = true",
            "log.console.level = warning",
            "log.file = false",
            "",
        ]))

    def start(self) -> "RabbitMQNode":
        self._write_config()
        self._out = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(SBIN / "rabbitmq-server")], env=self._env(), cwd=self.base,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"rabbitmq-server exited with {self.proc.returncode}:\n{self.log()}")
            self.api("GET", "/api/overview")
            for port in (self.amqp_port, self.amqps_port, self.api_tls_port):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True

        wait_for(up, START_TIMEOUT, 0.25, message=f"RabbitMQ node {self.name} up")
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl("stop", timeout=30)
            self.proc.wait(30)
        except Exception:  # a node that will not stop cleanly: kill its process group (ours alone)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        finally:
            self._out.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # management -----------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60) -> str:
        """rabbitmqctl against this node (a few seconds each: an Erlang VM starts)."""
        result = subprocess.run([str(SBIN / "rabbitmqctl"), "-n", self.name, *args], env=self._env(),
                                cwd=self.base,  # where an Erlang VM that fails writes its erl_crash.dump
                                capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr or result.stdout}")
        return result.stdout

    def api(self, method: str, path: str, body=None, auth: tuple[str, str] | None = None, timeout: float = 10):
        request = urllib.request.Request(self.api_url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode())
        request.add_header("content-type", "application/json")
        request.add_header("authorization",
                           "Basic " + base64.b64encode(":".join(auth or self.admin).encode()).decode())
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            return json.loads(data) if data else None

    def add_vhost(self, vhost: str) -> None:
        self.api("PUT", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")

    def add_user(self, user: str, password: str, tags: str = "") -> None:
        self.api("PUT", f"/api/users/{urllib.parse.quote(user, safe='')}", {"password": password, "tags": tags})

    def set_permissions(self, vhost: str, user: str, configure: str, write: str, read: str) -> None:
        self.api("PUT", f"/api/permissions/{urllib.parse.quote(vhost, safe='')}/{urllib.parse.quote(user, safe='')}",
                 {"configure": configure, "write": write, "read": read})

    def delete_user(self, user: str) -> None:
        try:
            self.api("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise

    def queues(self, vhost: str) -> list[dict]:
        return self.api("GET", f"/api/queues/{urllib.parse.quote(vhost, safe='')}")


def start_node(tmp_path_factory) -> RabbitMQNode:
    """For a module-scoped fixture: ``node = start_node(tmp_path_factory); yield node; node.stop()``."""
    if not (SBIN / "rabbitmq-server").exists():
        raise AssertionError(f"{SBIN / 'rabbitmq-server'} missing: install Debian's rabbitmq-server")
    base = tmp_path_factory.mktemp("rabbitmq")
    node = RabbitMQNode(base)
    try:
        return node.start()
    except BaseException:
        node.stop()
        raise


