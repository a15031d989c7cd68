"""The files a secured federation needs, made with ``cryptography``: a CA, the SuperLink's TLS
certificate signed by it, and one ECDSA key pair per SuperNode in OpenSSH format.

Every folder is what one machine receives, so each is copied whole:

- ``superlink/``: ``ca.pem``, ``server.pem`` (subject alternative names: the hosts given, as DNS
  names or IP addresses, and 127.0.0.1) and ``server.key``, for ``flower-superlink --ssl-*`` and
  the Fleet gateway;
- ``node-{i}/``: ``ca.pem`` and ``node.key`` (the private key, for ``flower-supernode
  --root-certificates`` and ``--auth-supernode-private-key``) and ``node.pub``, which the
  operator registers with ``flwr supernode register``;
- ``ca.pem`` at the top, for the ``flwr`` CLI's connection.

The CA's private key is not kept: nothing else is ever signed with it (node keys are registered,
not certified), and a key that does not exist cannot leak. Private keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.errors import ConfigError

CA_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE = "ca.pem", "server.pem", "server.key"
NODE_KEY_FILE, NODE_PUBLIC_KEY_FILE = "node.key", "node.pub"
SUPERLINK_DIR = "superlink"
LOOPBACK = "127.0.0.1"
"""Always among the certificate's addresses: the SuperLink's private address, where the gateway
and the operators' SSH tunnel reach it."""
DEFAULT_HOSTS = ("localhost", LOOPBACK)
DEFAULT_DAYS = 365
TLS_CURVE = ec.SECP256R1()
NODE_CURVE = ec.SECP384R1()
"""SuperNode keys: ECDSA on a NIST curve (Flower refuses others), as ``ssh-keygen -t ecdsa -b 384``."""


@dataclass(frozen=True)
class DeploymentFiles:
    """Where `write_credentials` put everything."""

    root: Path
    num_nodes: int
    hosts: tuple[str, ...]

    @property
    def ca(self) -> Path:
        return self.root / CA_FILE

    @property
    def superlink(self) -> Path:
        return self.root / SUPERLINK_DIR

    def node(self, index: int) -> Path:
        return self.root / f"node-{index}"


def write_credentials(
    root: str | Path, num_nodes: int, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = DEFAULT_DAYS
) -> DeploymentFiles:
    """Make the CA, the SuperLink's certificate for ``hosts`` and ``num_nodes`` node key pairs
    under ``root``; refuse (`ConfigError`) to overwrite any file already there."""
    if num_nodes < 1:
        raise ConfigError(f"--nodes must be >= 1, got {num_nodes}")
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    if not hosts or not all(host.strip() for host in hosts):
        raise ConfigError(f"--host needs at least one non-empty name, got {list(hosts)}")
    files = DeploymentFiles(Path(root), num_nodes, tuple(hosts))
    taken = [
        path
        for path in (files.ca, files.superlink, *map(files.node, range(num_nodes)))
        if path.exists()
    ]
    if taken:
        raise ConfigError(
            f"{root}: {', '.join(map(str, taken))} already exist; choose a new folder"
        )

    ca_key = ec.generate_private_key(TLS_CURVE)
    ca_cert = ca_certificate(ca_key, days)
    server_key = ec.generate_private_key(TLS_CURVE)
    names = [*hosts, *([] if LOOPBACK in hosts else [LOOPBACK])]
    server_cert = server_certificate(server_key.public_key(), ca_key, ca_cert, names, days)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)

    write(files.ca, ca_pem)
    write(files.superlink / CA_FILE, ca_pem)
    write(files.superlink / SERVER_CERT_FILE, server_cert.public_bytes(serialization.Encoding.PEM))
    write(files.superlink / SERVER_KEY_FILE, private_pem(server_key), private=True)
    for index in range(num_nodes):
        folder = files.node(index)
        private, public = node_key_pair(f"fedlora-node-{index}")
        write(folder / CA_FILE, ca_pem)
        write(folder / NODE_KEY_FILE, private, private=True)
        write(folder / NODE_PUBLIC_KEY_FILE, public)
    return files


def ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    """A self-signed CA that may sign end-entity certificates only."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora deployment CA")])
    return (
        certificate_builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def server_certificate(
    public_key: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    days: int,
) -> x509.Certificate:
    """The SuperLink's TLS server certificate, valid for every host in ``hosts``."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        certificate_builder(subject, ca_cert.subject, public_key, days)
        .add_extension(x509.SubjectAlternativeName([san(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def certificate_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def san(host: str) -> x509.GeneralName:
    """An IP address entry for an address, a DNS name entry otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def node_key_pair(comment: str) -> tuple[bytes, bytes]:
    """(private key, public key line) of a fresh ECDSA P-384 key, both in OpenSSH format."""
    key = ec.generate_private_key(NODE_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return private, public + f" {comment}\n".encode()


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write(path: Path, content: bytes, private: bool = False) -> None:
    """Write ``content``; a private file is created 0600 (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
