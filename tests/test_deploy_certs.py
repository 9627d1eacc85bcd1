"""`fedsec certs`: a CA, the SuperLink's certificate and SuperNode keys Flower can read."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsec.deploy.certs import write_deployment_keys


def test_certificates_chain_to_the_ca_and_name_the_hosts(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=2, hosts=["superlink.lan", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["superlink.lan"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
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


def test_existing_keys_are_never_overwritten(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path, nodes=1)
    before = keys.ca_key.read_bytes()
    with pytest.raises(ValueError, match=r"already holds ca\.crt"):
        write_deployment_keys(tmp_path, nodes=1)
    assert keys.ca_key.read_bytes() == before
    with pytest.raises(ValueError, match="not a host name"):
        write_deployment_keys(tmp_path / "x", nodes=1, hosts=["bad host"])


def test_cli_writes_the_files_and_fails_with_one_line(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "fedsec.cli", "certs", str(tmp_path / "k"), "--nodes", "2"]
    first = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "k" / "supernode-1.pub").exists()
    again = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2
    assert "already holds" in again.stderr and len(again.stderr.strip().splitlines()) == 1
