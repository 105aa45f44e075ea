"""TLS settings as bad input (a file that cannot be read) and TLS failures put in words: pure logic."""
import ssl

import pytest

from celery_health_exporter.config import Config, ConfigError, validate_broker_url, validate_ssl_options
from celery_health_exporter.logs import describe_error


def test_certificate_files_named_in_the_url_or_the_flag_must_be_readable(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    missing = tmp_path / "missing.key"
    assert validate_broker_url(f"rediss://:pw@localhost:6380/0?ssl_cert_reqs=required&ssl_ca_certs={ca}")
    assert validate_ssl_options({"ca_certs": str(ca), "cert_reqs": "CERT_REQUIRED"})
    with pytest.raises(ConfigError) as raised:
        validate_broker_url(f"rediss://:secret@localhost:6380/0?ssl_ca_certs={ca}&ssl_keyfile={missing}")
    assert str(raised.value) == f"--broker-url: ssl_keyfile={missing}: cannot read it: No such file or directory"
    with pytest.raises(ConfigError) as raised:
        validate_ssl_options({"certfile": str(tmp_path)})  # a directory
    assert raised.value.flag == "--broker-ssl-option" and "certfile=" in str(raised.value)
    # every failover URL is checked, and the password is never in the message
    with pytest.raises(ConfigError) as raised:
        validate_broker_url(f"sentinel://:secret@a:26379;sentinel://:secret@b:26379?ssl_ca_certs={missing}")
    assert "secret" not in str(raised.value)


@pytest.mark.parametrize("error, hint", [
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: self-signed "
                                     "certificate in certificate chain (_ssl.c:1006)"), "not signed by the CA"),
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address "
                                     "mismatch, certificate is not valid for '10.0.0.1'. (_ssl.c:1006)"),
     "the URL's host is not a name in the broker's certificate"),
    (ConnectionError("Error while reading from redis:6380 : (1, '[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 "
                     "alert certificate required (_ssl.c:2580)')"), "set ssl_certfile and ssl_keyfile"),
    (ConnectionError("Redis: NOPERM this user has no permissions to run the 'psubscribe' command"),
     "docs/brokers.md lists what the exporter needs"),
])
def test_tls_and_acl_failures_say_what_to_change_in_one_line_of_at_most_300_characters(error, hint):
    line = describe_error(type(error)(*error.args[:1], error.args[1] + " " + "x" * 300)
                          if len(error.args) > 1 else type(error)(error.args[0] + " " + "x" * 300))
    assert hint in line and len(line) <= 300 and "\n" not in line


def test_other_errors_get_no_hint():
    assert describe_error(ConnectionError("Error 111 connecting to redis:6379. Connection refused.")) == \
        "ConnectionError: Error 111 connecting to redis:6379. Connection refused."


def test_the_sentinels_password_and_a_key_passphrase_are_secrets_too():
    config = Config(broker_url="sentinel://:redis-pw@a:26379;sentinel://:redis-pw@b:26379",
                    broker_transport_options={"master_name": "m", "sentinel_kwargs": {"password": "sentinel-pw"}},
                    broker_ssl_options={"ssl_password": "key-passphrase"})
    assert {"redis-pw", "sentinel-pw", "key-passphrase"} <= set(config.secrets())
