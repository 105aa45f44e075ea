"""`celery-health-exporter healthcheck`: is the exporter running next to us ready?

The image's HEALTHCHECK. It takes no copy of the exporter's settings: it reads the running
exporter's own command line and environment (``/proc/<pid>/cmdline`` and ``environ``; PID 1
first, as in a container, otherwise the first process that runs the exporter) and derives from
them, with the exporter's own parser, where it listens and how (``--listen-address``,
``--web-config-file``). It does not bind anything. Then it asks ``/readyz``:

- a wildcard listen address (``0.0.0.0``, ``::``) is asked on loopback (127.0.0.1, ::1);
- with ``tls_server_config`` it speaks https. It does not verify the exporter's certificate: it
  checks this process, over loopback, not the certificate (127.0.0.1 is in no certificate, and a
  private CA is not in the image's trust store). A bad or expired certificate shows where it
  matters, in the scraper (Prometheus' ``up`` and scrape errors);
- ``client_auth_type: RequireAndVerifyClientCert``: set ``CELERY_EXPORTER_HEALTHCHECK_CERT_FILE``
  and ``CELERY_EXPORTER_HEALTHCHECK_KEY_FILE`` to a client certificate the exporter accepts;
- ``protect_health_endpoints: true`` (basic auth on /readyz): set
  ``CELERY_EXPORTER_HEALTHCHECK_USERNAME`` and ``CELERY_EXPORTER_HEALTHCHECK_PASSWORD_FILE`` (a file
  holding the password). Without them the check fails and says so: a 401 proves that something
  answers, not that the exporter is ready, and a healthcheck that cannot see readiness must not
  report it.

These variables are read from our own environment, then from the exporter's.

Exit codes (Docker's): 0 ready, 1 not ready or not reachable, with one line saying why.
Bad flags of the healthcheck itself: one line and exit code 2.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

EXIT_HEALTHY, EXIT_UNHEALTHY, EXIT_USAGE = 0, 1, 2
SUBCOMMANDS = ("demo", "doctor", "healthcheck")
SCRIPT = "celery-health-exporter"
MODULE = "celery_health_exporter"
ENV_CERT = "CELERY_EXPORTER_HEALTHCHECK_CERT_FILE"
ENV_KEY = "CELERY_EXPORTER_HEALTHCHECK_KEY_FILE"
ENV_USER = "CELERY_EXPORTER_HEALTHCHECK_USERNAME"
ENV_PASSWORD_FILE = "CELERY_EXPORTER_HEALTHCHECK_PASSWORD_FILE"


class Unhealthy(Exception):
    """The check failed; the message is the one line for `docker inspect`."""


@dataclass(frozen=True)
class Target:
    pid: int
    url: str  # e.g. https://127.0.0.1:9443/readyz
    host: str
    port: int
    tls: bool
    client_cert_required: bool
    auth_required: bool  # basic auth on /readyz


# ------------------------------------------------------------ the process

def exporter_flags(cmdline: list[str]) -> list[str] | None:
    """The exporter's flags in a process's command line, or None if it does not run the exporter
    daemon (another program, or one of our subcommands such as this healthcheck).

    Recognised: ``celery-health-exporter ARGS`` (also as ``python /path/celery-health-exporter``
    and behind an init such as ``tini --``) and ``python -m celery_health_exporter ARGS``.
    """
    for i, arg in enumerate(cmdline):
        if os.path.basename(arg) == SCRIPT:
            rest = cmdline[i + 1:]
            break
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] == MODULE:
            rest = cmdline[i + 2:]
            break
        if arg.startswith("-m") and arg[2:] == MODULE:
            rest = cmdline[i + 1:]
            break
    else:
        return None
    if rest[:1] and rest[0] in SUBCOMMANDS:
        return None
    return rest


def read_cmdline(proc: Path, pid: int) -> list[str]:
    raw = (proc / str(pid) / "cmdline").read_bytes()
    return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0")[:-1]] if raw else []


def read_environ(proc: Path, pid: int) -> dict[str, str]:
    env = {}
    for item in (proc / str(pid) / "environ").read_bytes().split(b"\0"):
        key, sep, value = item.decode("utf-8", "surrogateescape").partition("=")
        if sep and key:
            env[key] = value
    return env


def find_exporter(proc: Path = Path("/proc"), pid: int | None = None) -> tuple[int, list[str]]:
    """(pid, flags) of the exporter: ``pid`` if given, else PID 1, else the lowest pid running it."""
    if pid is not None:
        candidates = [pid]
    else:
        others = sorted(int(p.name) for p in proc.iterdir() if p.name.isdigit() and p.name != "1")
        candidates = [1, *others]
    me = os.getpid()
    for candidate in candidates:
        if candidate == me:
            continue
        try:
            flags = exporter_flags(read_cmdline(proc, candidate))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if flags is not None:
            return candidate, flags
    if pid is not None:
        raise Unhealthy(f"process {pid} does not run the exporter (or is gone)")
    raise Unhealthy("no exporter process found (neither PID 1 nor any other process runs celery-health-exporter)")


# --------------------------------------------------------------- deriving

def probe_host(listen_host: str) -> str:
    """Where to ask an exporter that listens on ``listen_host``: wildcards become loopback."""
    if listen_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen_host == "::":
        return "::1"
    return listen_host


def target_from(pid: int, flags: list[str], env: dict[str, str]) -> Target:
    """The exporter's listen address and web config, parsed as the exporter parsed them."""
    from .cli import config_from_args

    try:
        config = config_from_args(flags, env)
    except ConfigError as exc:
        raise Unhealthy(f"cannot read the exporter's settings (pid {pid}): {exc}") from None
    except SystemExit:  # argparse rejected them (and printed why); the exporter itself would not run
        raise Unhealthy(f"cannot parse the exporter's flags (pid {pid}): {' '.join(flags)}") from None
    web = config.web_config
    tls = bool(web is not None and web.tls)
    host = probe_host(config.listen_host)
    shown = f"[{host}]" if ":" in host else host
    return Target(
        pid=pid,
        url=f"{'https' if tls else 'http'}://{shown}:{config.listen_port}/readyz",
        host=host,
        port=config.listen_port,
        tls=tls,
        client_cert_required=bool(tls and web.ssl_context.verify_mode == ssl.CERT_REQUIRED),
        auth_required=bool(web is not None and web.users and web.protect_health_endpoints),
    )


def _setting(name: str, own_env, exporter_env) -> str:
    return own_env.get(name) or exporter_env.get(name) or ""


def client_context(target: Target, own_env, exporter_env) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # see the module docstring: this checks the process, not the cert
    cert, key = _setting(ENV_CERT, own_env, exporter_env), _setting(ENV_KEY, own_env, exporter_env)
    if cert or key:
        try:
            context.load_cert_chain(cert, key or None)
        except (OSError, ssl.SSLError) as exc:
            raise Unhealthy(f"cannot load the client certificate {ENV_CERT}={cert!r} {ENV_KEY}={key!r}: "
                            f"{getattr(exc, 'strerror', None) or exc}") from None
    elif target.client_cert_required:
        raise Unhealthy(f"the exporter requires client certificates (client_auth_type): set {ENV_CERT} and "
                        f"{ENV_KEY} to one it accepts")
    return context


def authorization(target: Target, own_env, exporter_env) -> str | None:
    user = _setting(ENV_USER, own_env, exporter_env)
    password_file = _setting(ENV_PASSWORD_FILE, own_env, exporter_env)
    if not (user and password_file):
        if target.auth_required:
            raise Unhealthy(f"/readyz needs basic auth (protect_health_endpoints: true): set {ENV_USER} and "
                            f"{ENV_PASSWORD_FILE} for the healthcheck")
        return None
    try:
        password = Path(password_file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise Unhealthy(f"cannot read {ENV_PASSWORD_FILE}={password_file!r}: {exc.strerror or exc}") from None
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------ asking

def ask(target: Target, timeout: float, context: ssl.SSLContext | None, auth: str | None) -> str:
    """GET /readyz; the first line of the answer when it is 200, else Unhealthy."""
    if target.tls:
        conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    headers = {"User-Agent": "celery-health-exporter-healthcheck"}
    if auth:
        headers["Authorization"] = auth
    where = target.url
    try:
        conn.request("GET", "/readyz", headers=headers)
        response = conn.getresponse()
        body = response.read(4096).decode("utf-8", "replace").strip().splitlines()
    except ConnectionRefusedError:
        raise Unhealthy(f"{where}: connection refused (is the exporter still starting, or listening "
                        f"elsewhere?)") from None
    except (TimeoutError, socket.timeout):
        raise Unhealthy(f"{where}: no answer within {timeout:g}s") from None
    except ssl.SSLError as exc:
        hint = f" (a client certificate it accepts: {ENV_CERT}, {ENV_KEY})" if target.client_cert_required else ""
        raise Unhealthy(f"{where}: TLS handshake failed: {exc.reason or exc}{hint}") from None
    except (OSError, http.client.HTTPException) as exc:
        if target.client_cert_required and isinstance(exc, (http.client.RemoteDisconnected, ConnectionResetError)):
            # TLS 1.3: the server checks the client certificate after the handshake, and hangs up
            raise Unhealthy(f"{where}: the exporter closed the connection: it did not accept the client "
                            f"certificate ({ENV_CERT})") from None
        raise Unhealthy(f"{where}: {getattr(exc, 'strerror', None) or exc!r}") from None
    finally:
        conn.close()
    first = body[0] if body else ""
    if response.status == 200:
        return first
    if response.status == 401:
        raise Unhealthy(f"{where}: 401 Unauthorized" + (
            f" (check {ENV_USER} and {ENV_PASSWORD_FILE})" if auth else
            f" (set {ENV_USER} and {ENV_PASSWORD_FILE})"))
    raise Unhealthy(f"{where}: {response.status} {response.reason}: {first}".rstrip(": "))


def check(pid: int | None = None, timeout: float = 5.0, proc: Path = Path("/proc"), own_env=None) -> str:
    """The whole check: the one line to print when healthy; raises Unhealthy otherwise."""
    own_env = os.environ if own_env is None else own_env
    pid, flags = find_exporter(proc, pid)
    try:
        exporter_env = read_environ(proc, pid)
    except OSError as exc:
        raise Unhealthy(f"cannot read the environment of the exporter (pid {pid}): {exc.strerror or exc} "
                        "(run the healthcheck as the exporter's user)") from None
    # Relative paths (--web-config-file, the files it names, and ours) are the exporter's:
    # resolve them from its working directory.
    here = os.getcwd()
    try:
        os.chdir(proc / str(pid) / "cwd")
    except OSError:
        pass
    try:
        target = target_from(pid, flags, exporter_env)
        context = client_context(target, own_env, exporter_env) if target.tls else None
        auth = authorization(target, own_env, exporter_env)
    finally:
        os.chdir(here)
    return f"ready: {target.url}: {ask(target, timeout, context, auth)}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="celery-health-exporter healthcheck",
        description="Exit 0 when the running exporter answers 200 on /readyz (its listen address, TLS and "
                    "basic auth taken from its own command line and environment), 1 otherwise.",
    )
    parser.add_argument("--pid", type=int, default=None,
                        help="The exporter's process id (default: PID 1 if it is the exporter, else the first "
                             "exporter process found in /proc).")
    parser.add_argument("--timeout", type=float, default=5.0, help="Seconds to wait for /readyz. Default: 5.")
    parser.error = lambda message: parser.exit(EXIT_USAGE, f"{parser.prog}: error: {message}\n")
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be more than 0, got {args.timeout:g}")
    try:
        print(check(args.pid, args.timeout))
    except Unhealthy as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    return EXIT_HEALTHY
