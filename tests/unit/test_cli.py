"""Flags and environment variables into one validated config; bad input is one line and exit 2."""
import socket
import ssl
import subprocess
import sys

import pytest

from celery_health_exporter.cli import config_from_args, main
from celery_health_exporter.config import ConfigError, mask_url

URL = "amqp://user:s3cret@rabbit:5672/vh"


@pytest.mark.parametrize("argv, flag", [
    (["--broker-url", "kafka://host"], "--broker-url"),
    (["--broker-url", "amqp://"], "--broker-url"),
    (["--broker-url", "redis://localhost:6379/zero"], "--broker-url"),
    (["--broker-url", "amqp://h:notaport/"], "--broker-url"),
    ([], "--broker-url"),
    (["--broker-url", URL, "--static-label", "novalue"], "--static-label"),
    (["--broker-url", URL, "--static-label", "bad-name=x"], "--static-label"),
    (["--broker-url", URL, "--static-label", "hostname=x"], "--static-label"),
    (["--broker-url", URL, "--static-label", "le=x"], "--static-label"),
    (["--broker-url", URL, "--broker-transport-option", "=1"], "--broker-transport-option"),
    (["--broker-url", URL, "--runtime-buckets", "1,0.5,2"], "--runtime-buckets"),
    (["--broker-url", URL, "--runtime-buckets", "1,x"], "--runtime-buckets"),
    (["--broker-url", URL, "--listen-address", "nohost"], "--listen-address"),
    (["--broker-url", URL, "--worker-timeout", "-1"], "--worker-timeout"),
    (["--broker-url", URL, "--max-tracked-tasks", "0"], "--max-tracked-tasks"),
    (["--broker-url", URL, "--log-format", "xml"], "--log-format"),
    (["--broker-url", URL, "--metric-prefix", "9bad"], "--metric-prefix"),
    (["--broker-url", URL, "--rabbitmq-management-url", "ftp://x"], "--rabbitmq-management-url"),
    (["--broker-url", URL, "--event-backlog-max-mb", "0"], "--event-backlog-max-mb"),
    (["--broker-url", URL, "--event-backlog-max-mb", "lots"], "--event-backlog-max-mb"),
])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(argv, flag, capsys, monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err
    assert "s3cret" not in err


def test_unknown_flag_is_one_line_too():
    proc = subprocess.run([sys.executable, "-m", "celery_health_exporter", "--no-such-flag"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--no-such-flag" in proc.stderr


def test_port_in_use_is_bad_input_not_a_crash():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "celery_health_exporter", "--broker-url", URL, "--listen-address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--listen-address" in proc.stderr and "in use" in proc.stderr


def test_environment_variables_set_every_kind_of_flag():
    env = {
        "CELERY_BROKER_URL": "redis://localhost:6379/3",
        "CELERY_EXPORTER_STATIC_LABEL": "env=prod,team=data",
        "CELERY_EXPORTER_BROKER_TRANSPORT_OPTION": 'visibility_timeout=7200,priority_steps=[0,5,9]',
        "CELERY_EXPORTER_ENABLE_EVENTS": "true",
        "CELERY_EXPORTER_WORKER_TIMEOUT": "30",
        "CELERY_EXPORTER_RUNTIME_BUCKETS": "0.1,1,10",
    }
    config = config_from_args([], env)
    assert config.broker_url == "redis://localhost:6379/3" and config.broker_kind == "redis"
    assert config.static_labels == {"env": "prod", "team": "data"}
    assert config.broker_transport_options == {"visibility_timeout": 7200, "priority_steps": [0, 5, 9]}
    assert config.enable_events is True and config.worker_timeout == 30.0
    assert config.runtime_buckets == (0.1, 1.0, 10.0)


def test_flags_win_over_environment_and_exporter_env_over_celery_env():
    env = {"CELERY_BROKER_URL": "redis://a/0", "CELERY_EXPORTER_BROKER_URL": "redis://b/0",
           "CELERY_EXPORTER_LISTEN_ADDRESS": "127.0.0.1:1234"}
    assert config_from_args([], env).broker_url == "redis://b/0"
    config = config_from_args(["--broker-url", "amqp://c//", "--listen-address", "[::1]:9000"], env)
    assert config.broker_url == "amqp://c//" and config.broker_kind == "amqp"
    assert (config.listen_host, config.listen_port) == ("::1", 9000)


def test_bad_boolean_in_environment_names_the_variable():
    with pytest.raises(ConfigError) as info:
        config_from_args([], {"CELERY_BROKER_URL": "redis://a/0", "CELERY_EXPORTER_ENABLE_EVENTS": "maybe"})
    assert "CELERY_EXPORTER_ENABLE_EVENTS" in str(info.value)


def test_defaults():
    config = config_from_args(["--broker-url", "amqp://guest:guest@localhost//"], {})
    assert (config.listen_host, config.listen_port, config.metric_prefix) == ("0.0.0.0", 9808, "celery_")
    assert config.max_tracked_tasks == 100_000 and not config.enable_events


def test_masking_hides_passwords_in_every_failover_url():
    assert mask_url(URL) == "amqp://user:***@rabbit:5672/vh"
    masked = mask_url("amqp://a:p1@h1//;amqp://b:p2@h2//")
    assert "p1" not in masked and "p2" not in masked and masked.count("***") == 2
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_secrets_of_amqps_and_https_management_urls_are_known_in_both_spellings():
    """What the log formatter masks (logs.redact): the passwords of an amqps:// broker URL and of
    a management URL with its own credentials, as written (percent-encoded) and decoded."""
    config = config_from_args(["--broker-url", "amqps://app:b%40pw@rabbit:5671/%2Fprod",
                               "--rabbitmq-management-url", "https://mon:m%2Fpw@rabbit:15671"], {})
    assert {"b%40pw", "b@pw", "m%2Fpw", "m/pw"} <= set(config.secrets())
    assert config.masked_broker_url == "amqps://app:***@rabbit:5671/%2Fprod"


def test_the_amqp_broker_host_name_is_checked_against_its_certificate():
    """py-amqp checks the certificate's names only when given server_hostname (kombu never gives it)."""
    from celery_health_exporter.broker import make_app

    def use_ssl(*args):
        return make_app(config_from_args(["--broker-url", *args], {})).conf.broker_use_ssl

    assert use_ssl("amqps://u:p@rabbit.example:5671//")["server_hostname"] == "rabbit.example"
    assert use_ssl("amqp://u:p@rabbit:5672//", "--broker-ssl-option", "cert_reqs=CERT_REQUIRED") == {
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit"}
    assert use_ssl("amqps://u:p@10.0.0.5//", "--broker-ssl-option", "server_hostname=rabbit")[
        "server_hostname"] == "rabbit"  # given: kept
    assert "server_hostname" not in use_ssl("amqps://u:p@a//;amqps://u:p@b//")  # several hosts: the user's call
    assert not use_ssl("amqp://u:p@rabbit//")  # no TLS: nothing
