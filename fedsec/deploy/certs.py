"""Certificates and node keys for a TLS deployment with SuperNode authentication.

:func:`write_deployment_keys` makes, with ``cryptography``:

* ``ca.crt`` / ``ca.key``: a self-signed certificate authority (EC P-384);
* ``server.crt`` / ``server.key``: the SuperLink's certificate, signed by the
  CA, valid for the given host names and IP addresses (``--ssl-certfile``,
  ``--ssl-keyfile``; the CA goes to ``--ssl-ca-certfile`` and to every
  SuperNode's ``--root-certificates``);
* ``supernode-<i>.key`` / ``supernode-<i>.pub``: each SuperNode's
  authentication key pair (EC P-384, OpenSSH format, as Flower's
  ``--auth-supernode-private-key`` and ``flwr supernode register`` read them);
* ``signing/client-<i>.pem`` / ``signing/client-<i>.pub``: each client's
  Ed25519 key for signed replies (PKCS#8 PEM, and the raw 32-byte public key
  the server registers; see :mod:`fedsec.deploy.signatures`). The server's
  ``signatures.key_dir`` is ``signing/`` (it reads only the ``.pub`` files);
  node i gets ``client-<i>.pem`` as its node config ``signing-key``.

Private keys are written with mode 0600 and never overwritten: an existing
file stops the command with a one-line error, so a CA in use cannot be lost
by running it twice.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsec.secagg.signing import generate_signing_key

__all__ = ["DeploymentKeys", "write_deployment_keys"]

#: Curve of every key (Flower accepts NIST curves for SuperNode keys).
CURVE = ec.SECP384R1()
#: Subfolder of the clients' reply-signing keys (the server's ``signatures.key_dir``).
SIGNING_DIR = "signing"
#: Most SuperNodes one call makes keys for; a typo such as ``--nodes 1000000`` would
#: otherwise spend minutes generating keys and fill the folder with 4 files per node.
MAX_NODES = 10_000
#: Longest certificate validity (20 years); beyond a few thousand years the date
#: overflows Python's datetime and X.509's notAfter.
MAX_DAYS = 7_300


class DeploymentKeys:
    """Paths of the files :func:`write_deployment_keys` wrote."""

    def __init__(self, folder: Path, nodes: int) -> None:
        self.folder = folder
        self.ca_cert = folder / "ca.crt"
        self.ca_key = folder / "ca.key"
        self.server_cert = folder / "server.crt"
        self.server_key = folder / "server.key"
        self.node_keys = [folder / f"supernode-{i}.key" for i in range(nodes)]
        self.node_public_keys = [folder / f"supernode-{i}.pub" for i in range(nodes)]
        self.signing_dir = folder / SIGNING_DIR
        self.signing_keys = [self.signing_dir / f"client-{i}.pem" for i in range(nodes)]
        self.signing_public_keys = [self.signing_dir / f"client-{i}.pub" for i in range(nodes)]

    def all(self) -> list[Path]:
        """Every file, in writing order."""
        return [
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            *self.node_keys,
            *self.node_public_keys,
            *self.signing_keys,
            *self.signing_public_keys,
        ]


def write_deployment_keys(
    folder: str | Path,
    *,
    nodes: int,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
) -> DeploymentKeys:
    """Write a CA, the SuperLink's certificate, ``nodes`` SuperNode and signing key pairs.

    Parameters
    ----------
    folder : path
        Created if missing; must not hold any of the files yet.
    nodes : int
        SuperNode key pairs, and client reply-signing key pairs, to make, in
        ``[1, MAX_NODES]``: a deployment without a node has nothing to run on.
    hosts : sequence of str
        DNS names and IP addresses the SuperLink is reached at (its
        certificate's subject alternative names). ``localhost`` and
        ``127.0.0.1`` are always added: the SuperLink's own SuperExec
        connects to it on 127.0.0.1 over TLS, and without them every run
        hangs at its start.
    days : int
        Validity of the certificates, in ``[1, MAX_DAYS]``.

    Raises
    ------
    ValueError
        On bad arguments, or if a file to write exists already.
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be in [1, {MAX_NODES}], got {nodes}")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be in [1, {MAX_DAYS}], got {days}")
    if not hosts:
        raise ValueError("hosts must name at least one host name or IP address")
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    folder = Path(folder)
    keys = DeploymentKeys(folder, nodes)
    taken = [str(p.relative_to(folder)) for p in keys.all() if p.exists()]
    if taken:
        raise ValueError(f"{folder} already holds {', '.join(taken)}; use an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    keys.signing_dir.mkdir(exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsec deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(keys.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(keys.ca_key, _pem_private(ca_key), private=True)
    _write(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(keys.server_key, _pem_private(server_key), private=True)
    for private_path, public_path in zip(keys.node_keys, keys.node_public_keys, strict=True):
        node_key = ec.generate_private_key(CURVE)
        private = node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(private_path, private, private=True)
        _write(public_path, public + b"\n")
    for private_path, public_path in zip(keys.signing_keys, keys.signing_public_keys, strict=True):
        signing_key, signing_public = generate_signing_key()
        signing_pem = signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write(private_path, signing_pem, private=True)
        _write(public_path, signing_public)
    return keys


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ValueError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host))
    return names


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Create ``path`` (never overwrite); private keys readable by the owner only."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
