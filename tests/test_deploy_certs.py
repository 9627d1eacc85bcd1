"""`fedsec certs`: a CA, the SuperLink's certificate, SuperNode keys Flower can read, signing keys.

Flat layout (one folder) and split layout (one folder per recipient, ``--split``),
and ``--owner`` (files written by root for the images' uid 1000).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from fedsec.cli import cli
from fedsec.deploy.certs import parse_owner, write_deployment_keys
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


# ---- split layout: one folder per recipient (issue 17, keys per node) ---------------

SPLIT_FILES = {
    "ca/ca.crt",
    "ca/ca.key",
    "superlink/ca.crt",
    "superlink/server.crt",
    "superlink/server.key",
    "superlink/supernodes/supernode-0.pub",
    "superlink/supernodes/supernode-1.pub",
    "superlink/signing/client-0.pub",
    "superlink/signing/client-1.pub",
    "supernode-0/ca.crt",
    "supernode-0/auth.key",
    "supernode-0/signing.pem",
    "supernode-1/ca.crt",
    "supernode-1/auth.key",
    "supernode-1/signing.pem",
}
SPLIT_PRIVATE = {
    "ca/ca.key",
    "superlink/server.key",
    "supernode-0/auth.key",
    "supernode-0/signing.pem",
    "supernode-1/auth.key",
    "supernode-1/signing.pem",
}


def _tree(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))}


def test_split_layout_gives_each_recipient_only_its_files(tmp_path: Path) -> None:
    keys = write_deployment_keys(tmp_path / "k", nodes=2, split=True)
    tree = _tree(tmp_path / "k")
    files = {name for name, p in tree.items() if p.is_file()}
    assert files == SPLIT_FILES
    assert {str(p.relative_to(keys.folder)) for p in keys.all()} == SPLIT_FILES
    for name, path in tree.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, name
        else:
            assert mode == (0o600 if name in SPLIT_PRIVATE else 0o644), name
    # No private key is written twice; the CA certificate is (it is public).
    private = [tree[n].read_bytes() for n in SPLIT_PRIVATE]
    assert len(set(private)) == len(private)
    for blob in private:
        assert sum(p.read_bytes() == blob for p in tree.values() if p.is_file()) == 1
    ca = keys.ca_cert.read_bytes()
    assert keys.superlink_ca_cert.read_bytes() == ca
    assert all(p.read_bytes() == ca for p in keys.node_ca_certs)
    # The folders the split layout is for.
    assert keys.superlink_dir == tmp_path / "k" / "superlink"
    assert keys.node_dir(1) == tmp_path / "k" / "supernode-1"
    assert keys.ca_dir == tmp_path / "k" / "ca"
    with pytest.raises(IndexError):
        keys.node_dir(2)


def test_split_keys_pair_up_and_the_server_registry_holds_only_public_keys(
    tmp_path: Path,
) -> None:
    keys = write_deployment_keys(tmp_path, nodes=2, split=True, hosts=["superlink"])
    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(keys.server_cert.read_bytes()).verify_directly_issued_by(ca)
    for private_path, public_path in zip(keys.node_keys, keys.node_public_keys, strict=True):
        private = serialization.load_ssh_private_key(private_path.read_bytes(), None)
        public = serialization.load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert sorted(p.name for p in keys.signing_dir.iterdir()) == ["client-0.pub", "client-1.pub"]
    registry = load_registry(keys.signing_dir)
    for i, pem in enumerate(keys.signing_keys):
        assert public_bytes(load_signing_key(pem)) == registry[keys.signing_identities[i]]


def test_split_node_config_signs_as_the_registered_identity(tmp_path: Path) -> None:
    """`signing.pem`'s stem is not the identity: node_config names it (signing-identity)."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from fedsec.client.signing_mod import resolve_signer

    keys = write_deployment_keys(tmp_path, nodes=2, split=True)
    registry = load_registry(keys.signing_dir)
    for i in range(2):
        node_config = parse_config_args([keys.node_config(i)])
        assert node_config["partition-id"] == i and node_config["num-partitions"] == 2
        context = Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
        )
        signer = resolve_signer(context, None)
        assert signer is not None
        identity, key = signer
        assert identity == f"client-{i}" and public_bytes(key) == registry[identity]


def test_both_layouts_expose_the_same_attributes(tmp_path: Path) -> None:
    flat = write_deployment_keys(tmp_path / "flat", nodes=2)
    split = write_deployment_keys(tmp_path / "split", nodes=2, split=True)
    for keys in (flat, split):
        for name in ("ca_cert", "ca_key", "server_cert", "server_key", "superlink_ca_cert"):
            assert getattr(keys, name).is_file(), name
        for name in ("node_keys", "node_public_keys", "signing_keys", "signing_public_keys"):
            assert len(getattr(keys, name)) == 2 and all(p.is_file() for p in getattr(keys, name))
        assert (
            keys.signing_dir.is_dir() and keys.superlink_dir.is_dir() and keys.node_dir(1).is_dir()
        )
    # The flat layout is today's: one folder, client-<i>.pem beside the public keys.
    assert flat.node_keys[0] == tmp_path / "flat" / "supernode-0.key"
    assert flat.signing_keys[1] == tmp_path / "flat" / "signing" / "client-1.pem"
    assert flat.superlink_dir == flat.node_dir(0) == tmp_path / "flat"


def test_split_refuses_a_folder_that_holds_any_of_its_files(tmp_path: Path) -> None:
    (tmp_path / "supernode-1").mkdir()
    (tmp_path / "supernode-1" / "signing.pem").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"already holds supernode-1/signing\.pem"):
        write_deployment_keys(tmp_path, nodes=2, split=True)
    assert (tmp_path / "supernode-1" / "signing.pem").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernode-1"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root (chown)")
def test_owner_gives_every_written_file_and_folder_away(tmp_path: Path) -> None:
    top = tmp_path / "keys"
    top.mkdir()  # as Docker makes a missing bind-mount source: root's
    keys = write_deployment_keys(top, nodes=2, split=True, owner=(1000, 1001))
    tree = _tree(top)
    assert len(tree) == len(SPLIT_FILES) + len(keys.folders()) - 1
    for name, path in tree.items():
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (1000, 1001), name
    assert (top.stat().st_uid, top.stat().st_gid) == (0, 0)  # not made here: left alone


def _certs_as(uid: int, args: list[str]) -> tuple[int, str]:
    """``fedsec certs ARGS`` run by ``uid`` (a forked child; the caller is root): exit, stderr."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, run the command in-process, report, exit
        code = 99
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = CliRunner().invoke(cli, ["certs", *args])
            os.write(write, f"{result.exit_code}\n{result.stderr}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as handle:
        data = handle.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    exit_code, _, stderr = data.partition("\n")
    return int(exit_code), stderr


def test_owner_refused_is_one_line_exit_2_and_leaves_nothing() -> None:
    """An unprivileged user may not give files away: one line, and nothing is left behind."""
    # Not under tmp_path: pytest's root folder is 0700, and nobody must reach this one.
    base = Path(tempfile.mkdtemp(prefix="fedsec-certs-"))
    try:
        base.chmod(0o777)
        out = str(base / "k")
        if os.geteuid() == 0:
            code, stderr = _certs_as(65534, [out, "--split", "--owner", "1000:1000"])
        else:
            other = 0 if os.getegid() != 0 else 1
            result = CliRunner().invoke(cli, ["certs", out, "--split", "--owner", f"0:{other}"])
            code, stderr = result.exit_code, result.stderr
        assert code == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and "not permitted" in lines[0], stderr
        assert list(base.iterdir()) == []  # the folders it made are removed
        if os.geteuid() == 0:
            # Its own ids are allowed, as chown allows them.
            code, stderr = _certs_as(65534, [out, "--split", "--owner", "65534:65534"])
            assert code == 0, stderr
            assert all(p.stat().st_uid == 65534 for p in (base / "k").rglob("*"))
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize(
    "owner", ["1000", "1000:", ":1000", "a:b", "-1:0", "1:2:3", "4294967295:0"]
)
def test_malformed_owner_is_one_line_exit_2(tmp_path: Path, owner: str) -> None:
    result = CliRunner().invoke(cli, ["certs", str(tmp_path / "k"), "--split", "--owner", owner])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "owner must be UID:GID" in lines[0]
    assert not (tmp_path / "k").exists()


def test_parse_owner() -> None:
    assert parse_owner("1000:1000") == (1000, 1000)
    assert parse_owner("0:5") == (0, 5)
    with pytest.raises(ValueError, match="UID:GID"):
        parse_owner("root:root")


def test_cli_split_writes_the_layout_and_says_what_to_mount(tmp_path: Path) -> None:
    out = tmp_path / "k"
    result = CliRunner().invoke(cli, ["certs", str(out), "--nodes", "2", "--split"])
    assert result.exit_code == 0, result.output
    assert {n for n, p in _tree(out).items() if p.is_file()} == SPLIT_FILES
    assert "supernode-1/signing.pem" in result.stdout
    assert "mount superlink/ on the SuperLink" in result.stdout
