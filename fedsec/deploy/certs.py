"""Certificates and node keys for a TLS deployment with SuperNode authentication.

:func:`write_deployment_keys` makes, with ``cryptography``:

* a self-signed certificate authority (EC P-384), ``ca.crt`` / ``ca.key``;
* the SuperLink's certificate, signed by the CA, valid for the given host
  names and IP addresses (``--ssl-certfile``, ``--ssl-keyfile``; the CA goes
  to ``--ssl-ca-certfile`` and to every SuperNode's ``--root-certificates``);
* each SuperNode's authentication key pair (EC P-384, OpenSSH format, as
  Flower's ``--auth-supernode-private-key`` and ``flwr supernode register``
  read them; Flower derives the public key from the private one, so a node
  needs only its private key);
* each client's Ed25519 key for signed replies (PKCS#8 PEM, and the raw
  32-byte public key the server registers; see
  :mod:`fedsec.deploy.signatures`). The server's ``signatures.key_dir`` holds
  only the ``client-<i>.pub`` files it reads.

Two layouts, with the same :class:`DeploymentKeys` attributes:

* flat (default): everything in one folder, ``supernode-<i>.key`` /
  ``supernode-<i>.pub`` and ``signing/client-<i>.pem`` / ``.pub`` beside the
  CA and server files; the simplest layout on one machine;
* split (``split=True``): one folder per recipient, each mountable alone,
  and no private key in two places::

      ca/ca.crt, ca/ca.key                   the admin keeps it; no machine mounts it
      superlink/ca.crt, server.crt, server.key
      superlink/supernodes/supernode-<i>.pub `flwr supernode register` reads these
      superlink/signing/client-<i>.pub       the ServerApp's signatures.key_dir
      supernode-<i>/ca.crt                   --root-certificates
      supernode-<i>/auth.key                 --auth-supernode-private-key
      supernode-<i>/signing.pem              node config signing-key, with
                                             signing-identity='client-<i>'

Private keys are written with mode 0600 and folders the call makes with
0700; nothing is ever overwritten: an existing file stops the call with a
one-line error before anything is written, so a CA in use cannot be lost by
running it twice. A layout folder that exists already must be a real folder
(not a symbolic link) of the caller or ``owner``, writable by no one else:
keys are never written where another user could swap them. ``owner=(uid,
gid)`` gives every file and folder the call makes to that user (how a root
container writes keys for images that run as uid 1000). A call that fails
midway removes what it made, a partly written file included.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsec.secagg.signing import generate_signing_key

__all__ = ["DeploymentKeys", "parse_owner", "write_deployment_keys"]

#: Curve of every key (Flower accepts NIST curves for SuperNode keys).
CURVE = ec.SECP384R1()
#: Subfolder of the clients' reply-signing public keys (the server's ``signatures.key_dir``).
SIGNING_DIR = "signing"
#: Split layout: the CA's folder, the SuperLink's, and its folder of SuperNode public keys.
CA_DIR = "ca"
SUPERLINK_DIR = "superlink"
SUPERNODES_DIR = "supernodes"
#: Split layout: file names inside ``supernode-<i>/``.
NODE_AUTH_KEY = "auth.key"
NODE_SIGNING_KEY = "signing.pem"
#: Most SuperNodes one call makes keys for; a typo such as ``--nodes 1000000`` would
#: otherwise spend minutes generating keys and fill the folder with 4 files per node.
MAX_NODES = 10_000
#: Longest certificate validity (20 years); beyond a few thousand years the date
#: overflows Python's datetime and X.509's notAfter.
MAX_DAYS = 7_300
#: Largest uid/gid (2**32 - 2; 2**32 - 1 is the "no change" value of chown).
MAX_ID = 2**32 - 2
#: Mode of every folder the call makes: the SuperLink's and each node's hold private keys.
FOLDER_MODE = 0o700


class DeploymentKeys:
    """Paths of the files :func:`write_deployment_keys` writes, in either layout.

    Parameters
    ----------
    folder : Path
        The folder given to :func:`write_deployment_keys`.
    nodes : int
        Number of SuperNodes.
    split : bool
        One folder per recipient (see the module docstring) instead of one folder.

    Attributes
    ----------
    ca_cert, ca_key : Path
        The CA (``ca/`` in the split layout, which no machine mounts).
    server_cert, server_key : Path
        The SuperLink's TLS certificate and key.
    superlink_ca_cert : Path
        The CA certificate the SuperLink reads (``--ssl-ca-certfile``); a copy
        of ``ca_cert`` in the split layout, ``ca_cert`` itself when flat.
    node_keys, node_public_keys : list of Path
        SuperNode ``i``'s authentication private key (on node ``i``) and public
        key (on the SuperLink, for ``flwr supernode register``).
    node_ca_certs : list of Path
        The CA certificate node ``i`` reads (``--root-certificates``).
    signing_dir : Path
        The ServerApp's ``signatures.key_dir``: ``client-<i>.pub`` files (and,
        flat, the ``client-<i>.pem`` private keys beside them).
    signing_keys, signing_public_keys : list of Path
        Client ``i``'s reply-signing private key (node config ``signing-key``)
        and public key (in ``signing_dir``).
    signing_identities : list of str
        ``client-<i>``: the identity node ``i`` signs as (node config
        ``signing-identity``) and its public key's stem.
    """

    def __init__(self, folder: Path, nodes: int, *, split: bool = False) -> None:
        self.folder = folder
        self.split = split
        self.nodes = nodes
        self.ca_dir = folder / CA_DIR if split else folder
        self.superlink_dir = folder / SUPERLINK_DIR if split else folder
        self.ca_cert = self.ca_dir / "ca.crt"
        self.ca_key = self.ca_dir / "ca.key"
        self.superlink_ca_cert = self.superlink_dir / "ca.crt" if split else self.ca_cert
        self.server_cert = self.superlink_dir / "server.crt"
        self.server_key = self.superlink_dir / "server.key"
        self.node_public_key_dir = self.superlink_dir / SUPERNODES_DIR if split else folder
        self.signing_dir = self.superlink_dir / SIGNING_DIR
        self.signing_identities = [f"client-{i}" for i in range(nodes)]
        self.node_public_keys = [
            self.node_public_key_dir / f"supernode-{i}.pub" for i in range(nodes)
        ]
        self.signing_public_keys = [
            self.signing_dir / f"{name}.pub" for name in self.signing_identities
        ]
        if split:
            self.node_keys = [self.node_dir(i) / NODE_AUTH_KEY for i in range(nodes)]
            self.node_ca_certs = [self.node_dir(i) / "ca.crt" for i in range(nodes)]
            self.signing_keys = [self.node_dir(i) / NODE_SIGNING_KEY for i in range(nodes)]
        else:
            self.node_keys = [folder / f"supernode-{i}.key" for i in range(nodes)]
            self.node_ca_certs = [self.ca_cert] * nodes
            self.signing_keys = [
                self.signing_dir / f"{name}.pem" for name in self.signing_identities
            ]

    def node_dir(self, i: int) -> Path:
        """Node ``i``'s folder: ``supernode-<i>/`` when split, else the one folder."""
        if not 0 <= i < self.nodes:
            raise IndexError(f"node {i} out of range [0, {self.nodes})")
        return self.folder / f"supernode-{i}" if self.split else self.folder

    def node_config(self, i: int) -> str:
        """Node ``i``'s ``--node-config``: its partition and its own signing key."""
        return (
            f"partition-id={i} num-partitions={self.nodes} "
            f"signing-key='{self.signing_keys[i]}' "
            f"signing-identity='{self.signing_identities[i]}'"
        )

    def folders(self) -> list[Path]:
        """Every folder of the layout, parents first (the top folder included)."""
        if not self.split:
            return [self.folder, self.signing_dir]
        return [
            self.folder,
            self.ca_dir,
            self.superlink_dir,
            self.node_public_key_dir,
            self.signing_dir,
            *(self.node_dir(i) for i in range(self.nodes)),
        ]

    def all(self) -> list[Path]:
        """Every file, in writing order (CA certificate copies included)."""
        copies = [self.superlink_ca_cert, *self.node_ca_certs] if self.split else []
        return [
            self.ca_cert,
            self.ca_key,
            *copies,
            self.server_cert,
            self.server_key,
            *self.node_keys,
            *self.node_public_keys,
            *self.signing_keys,
            *self.signing_public_keys,
        ]


def parse_owner(text: str) -> tuple[int, int]:
    """``"UID:GID"`` as two numbers.

    Raises
    ------
    ValueError
        If ``text`` is not two decimal numbers in ``[0, MAX_ID]`` joined by ``:``.
    """
    match = re.fullmatch(r"(\d{1,10}):(\d{1,10})", text.strip())
    if match is None or max(int(match[1]), int(match[2])) > MAX_ID:
        raise ValueError(f"owner must be UID:GID with numbers in [0, {MAX_ID}], got {text!r}")
    return int(match[1]), int(match[2])


def write_deployment_keys(
    folder: str | Path,
    *,
    nodes: int,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    split: bool = False,
    owner: tuple[int, int] | None = None,
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
    split : bool
        One folder per recipient (module docstring) instead of one folder.
    owner : (int, int), optional
        ``(uid, gid)`` given every file and folder the call makes (needs the
        right to chown, i.e. root, unless it is the caller's own).

    Raises
    ------
    ValueError
        On bad arguments, if a file to write exists already, if a layout
        folder that exists is a link, another user's or writable by group or
        others, or if ``owner`` cannot be applied (nothing is left behind then).
    OSError
        If a file or folder cannot be made (what the call made is removed).
    """
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"nodes must be in [1, {MAX_NODES}], got {nodes}")
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days must be in [1, {MAX_DAYS}], got {days}")
    if not hosts:
        raise ValueError("hosts must name at least one host name or IP address")
    if owner is not None and not all(0 <= n <= MAX_ID for n in owner):
        raise ValueError(f"owner ids must be in [0, {MAX_ID}], got {owner}")
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    alt_names = _alt_names(hosts)  # a bad host name stops the call before any write
    folder = Path(folder)
    keys = DeploymentKeys(folder, nodes, split=split)
    # lexists: a planted link, even dangling, is taken too (O_EXCL would refuse it later).
    taken = [str(p.relative_to(folder)) for p in keys.all() if os.path.lexists(p)]
    if taken:
        # A few names are enough to recognise the folder; the line stays one line.
        more = f" and {len(taken) - 4} more" if len(taken) > 4 else ""
        raise ValueError(
            f"{folder} already holds {', '.join(taken[:4])}{more}; use an empty folder"
        )
    for path in keys.folders():
        _check_folder(path, owner)

    made: list[Path] = []  # removed, last first, if the call fails
    try:
        _write_all(keys, alt_names, hosts[0], days, owner, made)
    except BaseException:
        for path in reversed(made):
            # A folder someone else put files in meanwhile stays.
            with contextlib.suppress(OSError):
                path.rmdir() if path.is_dir() else path.unlink()
        raise
    return keys


def _write_all(
    keys: DeploymentKeys,
    alt_names: list[x509.GeneralName],
    common_name: str,
    days: int,
    owner: tuple[int, int] | None,
    made: list[Path],
) -> None:
    """The body of :func:`write_deployment_keys`; appends what it makes to ``made``."""
    if not keys.folder.exists():
        keys.folder.parent.mkdir(parents=True, exist_ok=True)
    for path in keys.folders():
        if not path.exists():
            path.mkdir(mode=FOLDER_MODE)
            made.append(path)
            _chown(path, owner, fd=None)

    def write(path: Path, data: bytes, *, private: bool = False) -> None:
        _write(path, data, private=private, owner=owner)
        made.append(path)

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
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    write(keys.ca_cert, ca_pem)
    write(keys.ca_key, _pem_private(ca_key), private=True)
    # The certificate is public: each recipient's folder gets its own copy.
    for copy in dict.fromkeys([keys.superlink_ca_cert, *keys.node_ca_certs]):
        if copy != keys.ca_cert:
            write(copy, ca_pem)
    write(keys.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    write(keys.server_key, _pem_private(server_key), private=True)
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
        write(private_path, private, private=True)
        write(public_path, public + b"\n")
    for private_path, public_path in zip(keys.signing_keys, keys.signing_public_keys, strict=True):
        signing_key, signing_public = generate_signing_key()
        signing_pem = signing_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write(private_path, signing_pem, private=True)
        write(public_path, signing_public)


def _check_folder(path: Path, owner: tuple[int, int] | None) -> None:
    """Refuse a layout folder that exists but others could change.

    Keys are written into folders that already exist (Docker makes ``./keys``).
    A symbolic link would send them elsewhere; a folder another user owns, or
    one writable by group or others, lets that user swap a public key or a
    whole subfolder after the call (e.g. ``superlink/signing/client-0.pub`` for
    their own key: they would then sign as ``client-0``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"{path} is a symbolic link; keys go only into real folders")
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} exists and is not a folder")
    users = {os.geteuid(), *(() if owner is None else (owner[0],))}
    if st.st_uid not in users:
        raise ValueError(
            f"{path} belongs to uid {st.st_uid}, not to the keys' owner "
            "(use a folder of your own, or --owner for its user)"
        )
    if st.st_mode & 0o022:
        raise ValueError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run chmod go-w {path}"
        )


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


def _chown(path: Path, owner: tuple[int, int] | None, *, fd: int | None) -> None:
    """Give ``path`` (open as ``fd``, if given) to ``owner``; a one-line error if refused."""
    if owner is None:
        return
    try:
        if fd is not None:
            os.fchown(fd, *owner)
        else:
            # Never through a link: a folder swapped for one must not hand its target over.
            os.chown(path, *owner, follow_symlinks=False)
    except PermissionError:
        raise ValueError(
            f"cannot give {path} to {owner[0]}:{owner[1]}: not permitted "
            "(only root may give files to another user)"
        ) from None


def _write(
    path: Path, data: bytes, *, private: bool = False, owner: tuple[int, int] | None = None
) -> None:
    """Create ``path`` (never overwrite); private keys readable by the owner only.

    The file changes owner while still empty, so a key never sits, written,
    under the wrong owner.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as handle:
            _chown(path, owner, fd=fd)
            handle.write(data)
    except BaseException:
        # Not yet in the caller's list of what it made: a short write (disk full,
        # a file size limit) must not leave a partial key that blocks the next run.
        with contextlib.suppress(OSError):
            path.unlink()
        raise
