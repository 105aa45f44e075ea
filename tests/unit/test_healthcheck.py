"""`celery-health-exporter healthcheck`: which process is the exporter, and where and how to ask it.

The derivation from a command line and an environment, here; against real exporter processes
in tests/image/test_healthcheck_live.py, and in the image in tests/image/test_image.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from celery_health_exporter.healthcheck import (
    ENV_CERT,
    ENV_KEY,
    ENV_PASSWORD_FILE,
    ENV_USER,
    Unhealthy,
    authorization,
    client_context,
    exporter_flags,
    find_exporter,
    probe_host,
    read_environ,
    target_from,
)
from tests.harness import ROOT
from tests.certs import make_pki

BROKER = {"CELERY_BROKER_URL": "redis://127.0.0.1:6379/0"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize("cmdline, flags", [
    # the image's ENTRYPOINT: the console script, run by its venv's python
    (["/opt/venv/bin/python", "/opt/venv/bin/celery-health-exporter", "--listen-address", ":9900"],
     ["--listen-address", ":9900"]),
    (["celery-health-exporter"], []),
    # behind an init (docker run --init, tini)
    (["/sbin/docker-init", "--", "celery-health-exporter", "--web-config-file", "w.yml"],
     ["--web-config-file", "w.yml"]),
    (["python3", "-m", "celery_health_exporter", "--broker-url", "redis://r"], ["--broker-url", "redis://r"]),
    (["python3", "-mcelery_health_exporter", "--log-level", "DEBUG"], ["--log-level", "DEBUG"]),
])
def test_the_exporters_flags_are_found_in_its_command_line(cmdline, flags):
    assert exporter_flags(cmdline) == flags


@pytest.mark.parametrize("cmdline", [
    ["/opt/venv/bin/python", "/opt/venv/bin/celery-health-exporter", "healthcheck"],
    ["celery-health-exporter", "doctor", "--duration", "5s"],
    ["python", "-m", "celery_health_exporter", "demo"],
    ["celery", "-A", "app", "worker"],
    ["/bin/sh", "-c", "sleep 1"],
    ["python", "-m", "celery_health_exporter_plugin"],
    [],
])
def test_other_programs_and_our_subcommands_are_not_the_exporter(cmdline):
    assert exporter_flags(cmdline) is None


def fake_proc(root: Path, processes: dict[int, tuple[list[str], dict]]) -> Path:
    """A directory laid out like /proc for the processes given: cmdline and environ, NUL-separated."""
    for pid, (cmdline, env) in processes.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in cmdline))
        (d / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    (root / "self").mkdir(exist_ok=True)  # not a pid: ignored
    return root


def test_pid_1_is_asked_first(tmp_path):
    proc = fake_proc(tmp_path, {
        1: (["python", "/opt/venv/bin/celery-health-exporter", "--listen-address", ":1"], {}),
        7: (["celery-health-exporter", "--listen-address", ":7"], {}),
    })
    assert find_exporter(proc) == (1, ["--listen-address", ":1"])


def test_without_the_exporter_as_pid_1_the_lowest_pid_running_it_is_taken(tmp_path):
    proc = fake_proc(tmp_path, {
        1: (["/pause"], {}),  # a Kubernetes pod with a shared process namespace
        12: (["celery-health-exporter", "healthcheck"], {}),  # another healthcheck
        30: (["celery-health-exporter", "--listen-address", ":30"], {}),
        400: (["celery-health-exporter", "--listen-address", ":400"], {}),
    })
    assert find_exporter(proc) == (30, ["--listen-address", ":30"])
    assert find_exporter(proc, pid=400) == (400, ["--listen-address", ":400"])


def test_no_exporter_is_unhealthy_with_a_reason(tmp_path):
    proc = fake_proc(tmp_path, {1: (["/bin/sh"], {}), 5: (["celery-health-exporter", "doctor"], {})})
    with pytest.raises(Unhealthy, match="no exporter process found"):
        find_exporter(proc)
    with pytest.raises(Unhealthy, match="process 5 does not run the exporter"):
        find_exporter(proc, pid=5)


def test_the_environment_is_read_as_the_kernel_writes_it(tmp_path):
    proc = fake_proc(tmp_path, {1: (["x"], {"CELERY_BROKER_URL": "amqp://u:p=q@h//", "EMPTY": "", "A": "b=c"})})
    (proc / "1" / "environ").write_bytes((proc / "1" / "environ").read_bytes() + b"NOT_A_PAIR\0")
    assert read_environ(proc, 1) == {"CELERY_BROKER_URL": "amqp://u:p=q@h//", "EMPTY": "", "A": "b=c"}


@pytest.mark.parametrize("listen, host", [
    ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "::1"),
    ("127.0.0.2", "127.0.0.2"), ("::1", "::1"), ("exporter.local", "exporter.local"),
])
def test_wildcards_are_asked_on_loopback(listen, host):
    assert probe_host(listen) == host


@pytest.mark.parametrize("flags, env, url", [
    ([], {}, "http://127.0.0.1:9808/readyz"),  # the default 0.0.0.0:9808
    (["--listen-address", "0.0.0.0:9911"], {}, "http://127.0.0.1:9911/readyz"),
    (["--listen-address", ":9912"], {}, "http://127.0.0.1:9912/readyz"),
    (["--listen-address", "[::]:9913"], {}, "http://[::1]:9913/readyz"),
    (["--listen-address", "[::1]:9914"], {}, "http://[::1]:9914/readyz"),
    (["--listen-address", "127.0.0.5:9915"], {}, "http://127.0.0.5:9915/readyz"),
    ([], {"CELERY_EXPORTER_LISTEN_ADDRESS": "0.0.0.0:9916"}, "http://127.0.0.1:9916/readyz"),
    # a flag wins over the environment, as in the exporter
    (["--listen-address", "127.0.0.1:9917"], {"CELERY_EXPORTER_LISTEN_ADDRESS": "0.0.0.0:9918"},
     "http://127.0.0.1:9917/readyz"),
])
def test_the_listen_address_comes_from_the_exporters_flags_and_environment(flags, env, url):
    target = target_from(1, flags, {**BROKER, **env})
    assert target.url == url
    assert not target.tls and not target.auth_required and not target.client_cert_required


def web_config(tmp_path, text: str) -> str:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return str(path)


def test_tls_in_the_web_config_means_https(tmp_path, pki):
    path = web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki['server_crt']}\n"
                                f"  key_file: {pki['server_key']}\n")
    target = target_from(1, ["--listen-address", ":9443"], {**BROKER, "CELERY_EXPORTER_WEB_CONFIG_FILE": path})
    assert (target.url, target.tls, target.client_cert_required, target.auth_required) == (
        "https://127.0.0.1:9443/readyz", True, False, False)
    # the exporter's certificate is not verified: this checks the process (see the module's docstring)
    context = client_context(target, {}, {})
    assert context.verify_mode.name == "CERT_NONE" and not context.check_hostname


def test_basic_auth_alone_leaves_the_probe_open(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = web_config(tmp_path, f"basic_auth_users:\n  prom: {hashed}\n")
    target = target_from(1, ["--web-config-file", path], BROKER)
    assert target.url.startswith("http://") and not target.auth_required
    assert authorization(target, {}, {}) is None


def test_protected_probes_need_credentials_and_say_which(tmp_path):
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    path = web_config(tmp_path, f"basic_auth_users:\n  prom: {hashed}\nprotect_health_endpoints: true\n")
    target = target_from(1, ["--web-config-file", path], BROKER)
    assert target.auth_required
    with pytest.raises(Unhealthy, match=f"needs basic auth.*{ENV_USER}.*{ENV_PASSWORD_FILE}"):
        authorization(target, {}, {})
    secret = tmp_path / "password"
    secret.write_text("pw\n")
    # our own environment first, then the exporter's
    assert authorization(target, {ENV_USER: "prom"}, {ENV_PASSWORD_FILE: str(secret)}) == "Basic cHJvbTpwdw=="
    with pytest.raises(Unhealthy, match=f"cannot read {ENV_PASSWORD_FILE}"):
        authorization(target, {ENV_USER: "prom", ENV_PASSWORD_FILE: str(tmp_path / "missing")}, {})


def test_required_client_certificates_need_one_for_the_healthcheck(tmp_path, pki):
    path = web_config(tmp_path, f"tls_server_config:\n  cert_file: {pki['server_crt']}\n"
                                f"  key_file: {pki['server_key']}\n  client_auth_type: RequireAndVerifyClientCert\n"
                                f"  client_ca_file: {pki['ca']}\n")
    target = target_from(1, ["--web-config-file", path], BROKER)
    assert target.client_cert_required
    with pytest.raises(Unhealthy, match=f"requires client certificates.*{ENV_CERT}.*{ENV_KEY}"):
        client_context(target, {}, {})
    client_context(target, {ENV_CERT: str(pki["client_crt"]), ENV_KEY: str(pki["client_key"])}, {})
    with pytest.raises(Unhealthy, match="cannot load the client certificate"):
        client_context(target, {ENV_CERT: str(pki["client_crt"]), ENV_KEY: str(tmp_path / "nope.key")}, {})


def test_settings_the_exporter_would_refuse_are_unhealthy_not_a_traceback(tmp_path):
    with pytest.raises(Unhealthy, match="cannot read the exporter's settings.*--listen-address"):
        target_from(9, ["--listen-address", "nonsense"], BROKER)
    with pytest.raises(Unhealthy, match="cannot read the exporter's settings.*--web-config-file"):
        target_from(9, ["--web-config-file", str(tmp_path / "missing.yml")], BROKER)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celery_health_exporter", "healthcheck", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_bad_healthcheck_flags_are_one_line_and_exit_2():
    for args in (["--timeout", "0"], ["--pid", "one"], ["--bogus"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_a_process_that_is_not_the_exporter_is_unhealthy_exit_1():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = run_cli("--pid", str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert proc.returncode == 1, proc
    assert proc.stderr.strip() == f"unhealthy: process {sleeper.pid} does not run the exporter (or is gone)"
    assert proc.stdout == ""


def test_the_dispatch_is_in_the_cli():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "/readyz" in proc.stdout, proc
