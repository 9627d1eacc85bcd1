"""`fedsec certs`: a CA, the SuperLink's certificate, SuperNode keys Flower can read, signing keys."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsec.deploy.certs import write_deployment_keys
from fedsec.deploy.signatures import load_registry, load_signing_key, sign_reply, verify_reply
from fedsec.secagg.signing import public_bytes


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=2, hosts=["superlink.lan", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # The loopback names are always there: the SuperLink's SuperExec dials 127.0.0.1.
    assert names.get_values_for_type(x509.DNSName) == ["superlink.lan", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    server_key = serialization.load_pem_private_key(keys.server_key.read_bytes(), None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()


def test_node_keys_are_openssh_ec_pairs_and_private_files_are_private(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=3)
    for private_path, public_path in zip(keys.node_keys, keys.node_public_keys, strict=True):
        private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
        assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.ca_key.stat().st_mode) == 0o600
    assert len({p.read_bytes() for p in keys.node_keys}) == 3


def test_signing_keys_are_ed25519_pairs_the_server_can_register(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=2)
    assert keys.signing_dir == tmp_path / "signing"
    assert sorted(p.name for p in keys.signing_dir.iterdir()) == [
        "client-0.pem",
        "client-0.pub",
        "client-1.pem",
        "client-1.pub",
    ]
    registry = load_registry(keys.signing_dir)
    assert sorted(registry) == ["client-0", "client-1"]
    fields: dict[str, Any] = {
        "run_id": 1,
        "message_id": "m",
        "message_type": "train",
        "group_id": "",
        "content_digest": bytes(32),
    }
    for i, pem in enumerate(keys.signing_keys):
        key = load_signing_key(pem)
        assert public_bytes(key) == registry[f"client-{i}"]
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        signature = sign_reply(key, identity=f"client-{i}", **fields)
        verify_reply(registry[f"client-{i}"], signature, identity=f"client-{i}", **fields)
    assert registry["client-0"] != registry["client-1"]


def test_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=1)
    before = keys.ca_key.read_bytes()
    with pytest.raises(ValueError, match=r"already holds ca\.crt"):
        write_deployment_keys(tmp_path, nodes=1)
    assert keys.ca_key.read_bytes() == before
    # A signing key alone also blocks the command (and is kept).
    other = tmp_path / "other"
    (other / "signing").mkdir(parents=True)
    (other / "signing" / "client-0.pem").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"already holds signing/client-0\.pem"):
        write_deployment_keys(other, nodes=1)
    assert (other / "signing" / "client-0.pem").read_bytes() == b"keep"
    assert not (other / "ca.crt").exists()
    with pytest.raises(ValueError, match="not a host name"):
        write_deployment_keys(tmp_path / "x", nodes=1, hosts=["bad host"])


def test_cli_writes_the_files_and_fails_with_one_line(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "fedsec.cli", "certs", str(tmp_path / "k"), "--nodes", "2"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "k" / "supernode-1.pub").exists()
    assert (tmp_path / "k" / "signing" / "client-1.pem").exists()
    assert "signing/client-1.pem" in first.stdout
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert "already holds" in again.stderr and len(again.stderr.strip().splitlines()) == 1
