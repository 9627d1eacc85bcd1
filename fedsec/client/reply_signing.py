"""Signed client replies: the one signing mod, for any ClientApp (fedsec's own included).

A node signs each reply with its Ed25519 key (Bernstein et al., "High-speed
high-security signatures", CHES 2011) so that the server's
:class:`fedsec.strategies.signatures.SignatureFilter` can drop a reply altered
after it left the node, replayed into another round or message, or sent under
another node's name. This module holds the whole client side: the digest of a
reply's records (:func:`content_digest`), the signature record
(:func:`sign_message`) and the Flower mod (:class:`Signing`, made by
:func:`signing`, exported as :func:`fedsec.client.mods.signing`). fedsec's own
ClientApp uses the same mod, configured with fedsec's key source
(:data:`fedsec.client.signing_mod.signing_mod`).

It imports neither torch nor fedsec's experiment config: a SuperNode imports it
for every message, SecAgg's key and unmask stages included.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsec.deploy.signatures import ContentHasher, SignatureError, load_signing_key, sign_reply
from fedsec.wire import SIGNATURE_KEY, SIGNING_REFUSED

__all__ = [
    "KeySource",
    "Signing",
    "content_digest",
    "load_key",
    "sign_message",
    "signing",
]

logger = logging.getLogger("fedsec")

#: What a key source yields: a PEM path or the key itself.
Key: TypeAlias = str | os.PathLike[str] | Ed25519PrivateKey
#: What :func:`signing` accepts as ``key``: a PEM path, a key, or a function of the
#: ``Context`` or of the ``(Message, Context)`` returning one (or None: see ``allow_unsigned``).
KeySource: TypeAlias = (
    Key | Callable[[Context], Key | None] | Callable[[Message, Context], Key | None]
)

# Keys read once per process, by absolute path (a SuperNode runs many messages).
_KEYS: dict[Path, Ed25519PrivateKey] = {}


def load_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The Ed25519 key at ``path`` (``~`` expanded), read once per process.

    Raises
    ------
    SignatureError
        If the file is missing or not an unencrypted Ed25519 PEM private key.
    """
    absolute = Path(path).expanduser().absolute()
    key = _KEYS.get(absolute)
    if key is None:
        key = _KEYS[absolute] = load_signing_key(absolute)
    return key


def content_digest(content: RecordDict) -> bytes:
    """SHA-256 over every record of ``content`` but the signature record.

    Records in sorted name order, each tagged with its kind and name; an
    ArrayRecord's arrays in sorted key order with key, dtype, shape, stype
    and data bytes; MetricRecord and ConfigRecord entries in sorted key order
    with their typed values (:class:`~fedsec.deploy.signatures.ContentHasher`).

    Raises
    ------
    TypeError
        If a record or value is of a type Flower's records do not hold.
    """
    hasher = ContentHasher()
    names = sorted(name for name in content if name != SIGNATURE_KEY)
    hasher.update(len(names))
    for name in names:
        record = content[name]
        if isinstance(record, ArrayRecord):
            keys = sorted(record)
            hasher.update_all(("array", name, len(keys)))
            for key in keys:
                array = record[key]
                hasher.update_all((key, array.dtype, list(array.shape), array.stype, array.data))
        elif isinstance(record, MetricRecord | ConfigRecord):
            kind = "metric" if isinstance(record, MetricRecord) else "config"
            keys = sorted(record)
            hasher.update_all((kind, name, len(keys)))
            for key in keys:
                hasher.update(key).update(record[key])
        else:
            raise TypeError(f"record {name!r} is a {type(record).__name__}, not a Flower record")
    return hasher.digest()


def sign_message(reply: Message, request: Message, identity: str, key: Ed25519PrivateKey) -> None:
    """Add the ``fedsec-signature`` record to ``reply``, the answer to ``request`` (in place).

    The metadata bound are the instruction's as this node received it: run
    id, message id, message type and group id. Flower copies them into a
    reply made with ``Message(content, reply_to=request)`` (the message id
    as ``reply_to_message_id``), which is where the server reads them.
    """
    meta = request.metadata
    signature = sign_reply(
        key,
        run_id=meta.run_id,
        message_id=meta.message_id,
        message_type=meta.message_type,
        group_id=meta.group_id,
        identity=identity,
        content_digest=content_digest(reply.content),
    )
    reply.content[SIGNATURE_KEY] = ConfigRecord({"identity": identity, "signature": signature})


def _takes_message(source: Callable[..., object]) -> bool:
    """Whether the key function is called as ``source(msg, context)`` (else ``source(context)``).

    A function that accepts one positional argument is a function of the
    context (so ``*args`` and defaulted extras keep today's one-argument call);
    one that needs exactly two is a function of the message and the context.

    Raises
    ------
    TypeError
        If it accepts neither one nor two positional arguments.
    """
    try:
        sig = inspect.signature(source)
    except (TypeError, ValueError):  # a builtin without a signature: the documented default
        return False
    accepts = []
    for count in (1, 2):
        try:
            sig.bind(*([None] * count))
        except TypeError:
            accepts.append(False)
        else:
            accepts.append(True)
    if accepts[0]:
        return False
    if accepts[1]:
        return True
    raise TypeError(
        "signing: a key function takes (context) or (message, context), "
        f"got a function of signature {sig}"
    )


class Signing:
    """The Flower mod :func:`signing` returns (see there)."""

    def __init__(
        self,
        key: KeySource,
        identity: str | Callable[[Context], str | None] | None = None,
        *,
        allow_unsigned: bool = False,
    ) -> None:
        if not (callable(key) or isinstance(key, str | os.PathLike | Ed25519PrivateKey)):
            raise TypeError(
                "signing: key must be a PEM path, an Ed25519PrivateKey or a function of "
                f"the Context, got {type(key).__name__}"
            )
        if isinstance(key, Ed25519PrivateKey) and identity is None:
            raise ValueError("signing: identity= is required when key is a key object, not a file")
        if isinstance(identity, str) and not identity:
            raise ValueError("signing: identity must not be empty")
        if identity is not None and not (isinstance(identity, str) or callable(identity)):
            raise TypeError(
                f"signing: identity must be a str or a function of the Context, got "
                f"{type(identity).__name__}"
            )
        if not isinstance(allow_unsigned, bool):
            raise TypeError(
                f"signing: allow_unsigned must be a bool, got {type(allow_unsigned).__name__}"
            )
        is_function = callable(key) and not isinstance(key, Ed25519PrivateKey)
        if allow_unsigned and not is_function:
            raise ValueError(
                "signing: allow_unsigned=True needs a key function (a fixed key is never missing)"
            )
        self.key = key
        self.identity = identity
        self.allow_unsigned = allow_unsigned
        self._with_message = is_function and _takes_message(key)  # type: ignore[arg-type]

    def signer(
        self, context: Context, msg: Message | None = None
    ) -> tuple[str, Ed25519PrivateKey] | None:
        """This node's identity and key for ``msg``; None: no key, under ``allow_unsigned``.

        Raises
        ------
        SignatureError
            If the key function raises (its own :class:`SignatureError`
            verbatim, anything else named in one line) or returns something
            unusable, the PEM is missing or not an unencrypted Ed25519 key, or
            the identity cannot be had.
        TypeError
            If the key is a function of the message and no ``msg`` is given.
        """
        source: object = self.key
        if callable(source) and not isinstance(source, Ed25519PrivateKey):
            if self._with_message and msg is None:
                raise TypeError("signing: this key function needs the message it answers")
            try:
                source = source(msg, context) if self._with_message else source(context)
            except SignatureError:
                raise  # the source refusing, in its own words
            except Exception as err:  # the user's function: report it in one line
                raise SignatureError(f"key function raised {type(err).__name__}: {err}") from None
            if source is None and self.allow_unsigned:
                return None
        stem = ""
        if isinstance(source, Ed25519PrivateKey):
            key = source
        elif isinstance(source, str | os.PathLike) and str(source):
            key = load_key(source)
            stem = Path(source).stem
        else:
            raise SignatureError(
                f"key function returned {type(source).__name__}, not a PEM path or an "
                "Ed25519PrivateKey"
            )
        identity = self.identity
        if callable(identity):
            try:
                identity = identity(context)
            except Exception as err:
                raise SignatureError(
                    f"identity function raised {type(err).__name__}: {err}"
                ) from None
        identity = stem if identity is None else identity
        if not isinstance(identity, str) or not identity:
            raise SignatureError(
                "no identity: pass identity= when the key function returns a key object"
            )
        return identity, key

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Answer ``msg`` through ``call_next`` and sign the reply.

        A node whose key cannot be used answers with the error
        :data:`~fedsec.wire.SIGNING_REFUSED` before running the handler (no
        work for a reply that cannot go); error replies pass unsigned (they
        carry no content), and so does every reply when the key source says
        this node has no key (``allow_unsigned``).
        """
        try:
            signer = self.signer(context, msg)
        except SignatureError as err:
            reason = f"signing key: {err}"
            logger.warning("signing: refused to reply: %s", reason)
            return Message(Error(code=SIGNING_REFUSED, reason=reason), reply_to=msg)
        reply = call_next(msg, context)
        if signer is None or reply.has_error():
            return reply
        sign_message(reply, msg, *signer)
        return reply


def signing(
    key: KeySource,
    identity: str | Callable[[Context], str | None] | None = None,
    *,
    allow_unsigned: bool = False,
) -> Signing:
    """A Flower mod that signs every reply of the node with its Ed25519 key.

    Each reply gets the ConfigRecord ``fedsec-signature`` (``identity``,
    ``signature``): an Ed25519 signature over the domain ``fedsec/v1/reply``,
    the run id, the id of the instruction answered, its message type and group
    id, the identity, and a digest of every other record of the reply
    (:func:`sign_message`; the same mod signs fedsec's own ClientApp). On the
    server, :class:`fedsec.strategies.signatures.SignatureFilter` passes on
    only replies signed by a registered identity (``<identity>.pub``), so a
    reply altered after it left the node, replayed into another round or
    another message, or sent under another node's name is dropped.

    Parameters
    ----------
    key : str, os.PathLike, Ed25519PrivateKey or callable
        The node's key: the path of an unencrypted PKCS#8 PEM (as
        ``fedsec certs`` writes), the key itself, or a function returning
        either, of the Flower ``Context`` (a key named per node, e.g.
        ``lambda ctx: ctx.node_config["signing-key"]``) or of the
        ``(Message, Context)`` being answered (a key that depends on what the
        server sent). A path is read on first use and kept for the process. A
        function may raise :class:`~fedsec.deploy.signatures.SignatureError`
        to refuse with its own reason.
    identity : str, callable or None
        The registered identity the node signs as, or a function of the
        ``Context`` returning it (None: the default); by default the key
        file's stem (``keys/client-0.pem`` signs as ``client-0``). Required
        for a key object.
    allow_unsigned : bool
        Only with a key function: a function returning None says "this node
        has no key", and the node then replies unsigned. Off by default, when
        None is an unusable key like any other.

    Returns
    -------
    Signing
        The mod; put it first in ``ClientApp(mods=[...])`` so it signs what
        the other mods produced.

    Raises
    ------
    TypeError, ValueError
        At creation, for a ``key`` or ``identity`` of the wrong kind, a key
        function taking neither ``(context)`` nor ``(message, context)``, a
        key object without an identity, or ``allow_unsigned`` with a fixed key.

    Notes
    -----
    The key is only ever the one given here: there is no fallback to a folder
    named by the server (which would hold every node's keys) or by fedsec's
    config. A key that cannot be loaded makes the node answer each message
    with the error ``SIGNING_REFUSED`` (4602) instead of replying unsigned.

    Examples
    --------
    >>> from flwr.clientapp import ClientApp
    >>> app = ClientApp(mods=[signing(key="keys/client-0.pem")])  # doctest: +SKIP
    """
    return Signing(key, identity, allow_unsigned=allow_unsigned)
