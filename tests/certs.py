"""Certificates the tests make for themselves: a CA, server and client certificates it
signs, and a second CA that signed nothing here (verifying against it must fail).
EC keys: fast to make. Used for the brokers' TLS (tests/redis_servers.py,
tests/rabbitmq_node.py) and the exporter's own endpoints (--web-config-file)."""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2)))


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, common_name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (_valid(x509.CertificateBuilder()).subject_name(_name(common_name)).issuer_name(_name(common_name))
                     .public_key(self.key.public_key())
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False, encipher_only=False,
                                                  decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    def issue(self, common_name: str, *, server: bool, dns: tuple = (), ips: tuple = ()):
        """(certificate, key) for a server (its names: ``dns``, ``ips``) or a client."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (_valid(x509.CertificateBuilder()).subject_name(_name(common_name)).issuer_name(self.cert.subject)
                   .public_key(key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        names = [x509.DNSName(name) for name in dns] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def write_cert(path: Path, cert) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def write_key(path: Path, key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


@dataclass
class Certificates:
    """What a TLS broker test needs, as files."""

    ca: Path  # signed the server's and the client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # signed nothing here: "wrong CA"

    def key_lines(self) -> list[str]:
        """The private keys' base64 lines: none may ever show in a log, a page or a metric."""
        return [line for path in (self.server_key, self.client_key) for line in path.read_text().splitlines()
                if line and not line.startswith("-----")]


def make_certificates(directory: Path) -> Certificates:
    """A broker's: the server certificate names ``localhost`` only, so that connecting to
    127.0.0.1 is the tests' wrong host name."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = TestCA("celery-health-exporter test CA")
    server_cert, server_key = ca.issue("localhost", server=True, dns=("localhost",))
    client_cert, client_key = ca.issue("exporter", server=False)
    return Certificates(
        ca=write_cert(directory / "ca.pem", ca.cert),
        server_cert=write_cert(directory / "server.pem", server_cert),
        server_key=write_key(directory / "server.key", server_key),
        client_cert=write_cert(directory / "client.pem", client_cert),
        client_key=write_key(directory / "client.key", client_key),
        other_ca=write_cert(directory / "other-ca.pem", TestCA("some other CA").cert),
    )


def make_pki(directory: Path) -> dict[str, Path]:
    """For the exporter's own endpoints (--web-config-file): a CA, a server certificate for
    127.0.0.1 and localhost, client certificates (SAN scraper.test and other.test) from that
    CA, and one from a rogue CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, rogue = TestCA("test CA"), TestCA("rogue CA")
    out = {"ca": write_cert(directory / "ca.crt", ca.cert)}
    leaves = {
        "server": ca.issue("127.0.0.1", server=True, dns=("localhost",), ips=("127.0.0.1",)),
        "client": ca.issue("scraper", server=False, dns=("scraper.test",)),
        "other_client": ca.issue("other", server=False, dns=("other.test",)),
        "rogue_client": rogue.issue("scraper", server=False, dns=("scraper.test",)),
    }
    for label, (cert, key) in leaves.items():
        out[f"{label}_crt"] = write_cert(directory / f"{label}.crt", cert)
        out[f"{label}_key"] = write_key(directory / f"{label}.key", key)
    return out
