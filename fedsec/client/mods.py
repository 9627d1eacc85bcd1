"""Flower client mods for any ClientApp, configured where they are created.

A Flower user adopts these in their own ``ClientApp``, with their own model,
data and ``@app.train`` loop, as they would Flower's ``LocalDpMod``::

    from fedsec.client.mods import local_dp, signing

    app = ClientApp(mods=[
        signing(key=lambda ctx: f"keys/client-{ctx.node_config['partition-id']}.pem"),
        local_dp(clip=1.0, noise_multiplier=1.1, delta=1e-5, epsilon_budget=8.0,
                 state_dir="/var/lib/my-node"),
    ])

Nothing here reads fedsec's experiment config: every parameter is given at
creation (a value, or a function of the Flower ``Context`` where it differs
from node to node).

* :func:`signing` signs every reply as fedsec's server checks it
  (:class:`fedsec.strategies.signatures.SignatureFilter`); defined in
  :mod:`fedsec.client.reply_signing`, it is also the mod fedsec's own ClientApp
  runs, configured with fedsec's key source
  (:data:`fedsec.client.signing_mod.signing_mod`).
* :func:`local_dp` applies client-level local differential privacy to the
  model update the user's ``train`` returns, with a durable privacy ledger that
  refuses rounds beyond the budget.

Order: Flower applies ``mods`` outermost first, so list :func:`signing` first:
it must sign the reply as it leaves the node, after :func:`local_dp` (and any
secure-aggregation mod) changed it. A mod listed after it would alter a signed
reply and the server would reject it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

# The one signing mod (fedsec's own ClientApp uses it too), exported here for users.
from fedsec.client.reply_signing import KeySource, Signing, signing
from fedsec.privacy.accounting import check_accountant, check_delta
from fedsec.wire import (  # LOCAL_DP_REFUSED, LOCAL_DP_STATE_KEY: re-exported (__all__)
    LOCAL_DP_REFUSED,
    LOCAL_DP_STATE_KEY,
    PARTITION_ID_KEY,
    PRIVACY_BUDGET_EXHAUSTED,
    PRIVACY_LEDGER_UNUSABLE,
)

if TYPE_CHECKING:
    from fedsec.client.privacy import LedgerUnavailableError
    from fedsec.privacy.ledger import PrivacyLedger

__all__ = [
    "LOCAL_DP_REFUSED",
    "LOCAL_DP_STATE_KEY",
    "KeySource",
    "LocalDP",
    "Signing",
    "local_dp",
    "signing",
]

logger = logging.getLogger("fedsec")

#: What :func:`local_dp` accepts as ``state_dir``: a folder, or a function of the context.
StateDirSource: TypeAlias = str | os.PathLike[str] | Callable[[Context], "str | os.PathLike[str]"]

# LOCAL_DP_REFUSED (a training reply local_dp will not send: its arrays cannot be
# privatized) and LOCAL_DP_STATE_KEY (the context.state record of the histories local_dp
# committed, per ledger file: checked against the file, so a file that lost recorded
# rounds while the node ran is refused) are defined in fedsec.wire.


def _error(msg: Message, code: int, reason: str, what: str) -> Message:
    logger.warning("%s: refused to reply: %s", what, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


# ---- local differential privacy -------------------------------------------------------


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"local_dp: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"local_dp: {name} must be finite and > 0, got {value!r}")
    return float(value)


class LocalDP:
    """The Flower mod :func:`local_dp` returns (see there)."""

    def __init__(
        self,
        *,
        clip: float,
        noise_multiplier: float,
        delta: float,
        epsilon_budget: float,
        state_dir: StateDirSource | None = None,
        partition: int | Callable[[Context], int] | None = None,
        accountant: str = "rdp",
    ) -> None:
        self.clip = _positive("clip", clip)
        self.noise_multiplier = _positive("noise_multiplier", noise_multiplier)
        self.epsilon_budget = _positive("epsilon_budget", epsilon_budget)
        try:
            self.delta = check_delta(delta)
            self.accountant = check_accountant(accountant)
        except ValueError as err:
            raise ValueError(f"local_dp: {err}") from None
        if state_dir is not None and not (
            callable(state_dir) or isinstance(state_dir, str | os.PathLike)
        ):
            raise TypeError(
                "local_dp: state_dir must be a folder or a function of the Context, got "
                f"{type(state_dir).__name__}"
            )
        if not (partition is None or callable(partition) or _is_index(partition)):
            raise ValueError(f"local_dp: partition must be an integer >= 0, got {partition!r}")
        self.state_dir = state_dir
        self.partition = partition

    # -- where the ledger lives

    def _partition(self, context: Context) -> int:
        raw: object = self.partition(context) if callable(self.partition) else self.partition
        if raw is None:
            raw = context.node_config.get(PARTITION_ID_KEY, 0)
        if not isinstance(raw, int) or not _is_index(raw):
            raise _unavailable(f"partition must be an integer >= 0, got {raw!r}")
        return raw

    def ledger_path(self, context: Context) -> Path:
        """The ledger file of this node: ``<state_dir>/privacy/partition-<id>.json``.

        Raises
        ------
        LedgerUnavailableError
            If ``state_dir`` (or its function) names no existing folder, or the
            ``privacy`` folder in it cannot be created.
        """
        from fedsec.client.privacy import LEDGER_SUBDIR, default_state_dir, ledger_file_name

        partition = self._partition(context)
        if self.state_dir is None:
            state = default_state_dir()
            try:
                state.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as err:
                raise _unavailable(
                    f"cannot create the state folder {state}: {err.strerror or err}"
                ) from None
        else:
            raw = self.state_dir
            if callable(raw):
                try:
                    raw = raw(context)
                except Exception as err:
                    raise _unavailable(
                        f"state_dir function raised {type(err).__name__}: {err}"
                    ) from None
            state = Path(raw).expanduser()
            if not state.is_dir():
                # A typo or an unmounted volume must not start a fresh (empty) ledger.
                raise _unavailable(
                    f"state_dir '{state}' is not an existing folder; create it (it keeps "
                    "this node's privacy ledger across restarts)"
                )
        folder = state / LEDGER_SUBDIR
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
        except OSError as err:
            raise _unavailable(
                f"cannot create the privacy ledger folder {folder}: {err.strerror or err}"
            ) from None
        return folder / ledger_file_name(partition)

    def _terms(self) -> PrivacyLedger:
        from fedsec.privacy.ledger import PrivacyLedger

        return PrivacyLedger(self.epsilon_budget, self.delta, self.accountant)

    # -- the mod

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Privatize the update of a ``train`` reply under the ledger (see :func:`local_dp`)."""
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if len(msg.content.array_records) != 1:
            # No model to diff against: pass through, but never let arrays out unprivatized.
            reply = call_next(msg, context)
            if not reply.has_error() and reply.content.array_records:
                return _error(
                    msg,
                    LOCAL_DP_REFUSED,
                    f"the instruction carries {len(msg.content.array_records)} ArrayRecords, "
                    "not 1, so the reply's arrays cannot be privatized",
                    "local_dp",
                )
            return reply
        return self._train(msg, context, call_next)

    def _train(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        from fedsec.client.privacy import (
            LedgerUnavailableError,
            locked_stored_ledger,
            tighten_ledger,
        )
        from fedsec.privacy.ledger import LedgerFile

        sigma, rate, steps = self.noise_multiplier, 1.0, 1
        try:
            path = self.ledger_path(context)
            file = LedgerFile(path, self._partition(context))
            with locked_stored_ledger(file, _remembered(context, path)) as stored:
                ledger = self._terms() if stored is None else tighten_ledger(stored, self._terms())
                if ledger.would_exceed(sigma, rate, steps)[0]:
                    reason = ledger.refusal_reason(sigma, rate, steps)
                    # Before training: the global model stays as received, nothing is released.
                    return _error(msg, PRIVACY_BUDGET_EXHAUSTED, reason, "local_dp")
                received = next(iter(msg.content.array_records.values()))
                reply = call_next(msg, context)
                if reply.has_error():
                    return reply
                try:
                    name, arrays = self._privatize(received, reply)
                except ValueError as err:
                    return _error(msg, LOCAL_DP_REFUSED, str(err), "local_dp")
                ledger.record(sigma, rate, steps)
                # Durable before the update leaves: a crash from here over-counts, never under.
                try:
                    file.save(ledger)
                except OSError as err:
                    raise _unavailable(
                        f"cannot write privacy ledger {path}: {err.strerror or err}"
                    ) from None
                _remember(context, path, ledger)
        except LedgerUnavailableError as err:
            return _error(msg, PRIVACY_LEDGER_UNUSABLE, str(err), "local_dp")
        reply.content[name] = arrays
        logger.info(
            "local_dp: update clipped to %g, noise multiplier %g; epsilon spent %.4g of %.4g "
            "(delta %g)",
            self.clip,
            sigma,
            ledger.spent(),
            ledger.epsilon_budget,
            ledger.delta,
        )
        return reply

    def _privatize(self, received: ArrayRecord, reply: Message) -> tuple[str, ArrayRecord]:
        """The reply's ArrayRecord name and its privatized replacement.

        Raises
        ------
        ValueError
            If the reply has not exactly one ArrayRecord with the received
            keys and shapes, or its update is not finite.
        """
        import torch

        from fedsec.privacy.client_level import privatize_update

        records = reply.content.array_records
        if len(records) != 1:
            raise ValueError(f"the reply carries {len(records)} ArrayRecords, not 1")
        name, returned = next(iter(records.items()))
        if list(returned) != list(received):
            raise ValueError("the reply's array keys differ from the instruction's")
        old = {key: received[key].numpy() for key in received}
        new = {key: returned[key].numpy() for key in returned}
        for key in old:
            if old[key].shape != new[key].shape:
                raise ValueError(
                    f"array {key!r} has shape {new[key].shape} in the reply, "
                    f"{old[key].shape} in the instruction"
                )
        floats = [key for key in old if np.issubdtype(new[key].dtype, np.floating)]
        if floats:
            delta = np.concatenate(
                [(new[k].astype(np.float64) - old[k].astype(np.float64)).ravel() for k in floats]
            )
            if not np.isfinite(delta).all():
                raise ValueError("the update is not finite; nothing was sent")
            noisy = privatize_update(
                torch.from_numpy(delta),
                clip=self.clip,
                noise_multiplier=self.noise_multiplier,
                secure=True,  # OS CSPRNG: noise nobody (the server included) can reproduce
            ).numpy()
        out: dict[str, Array] = {}
        offset = 0
        for key in old:
            if key in floats:
                size = old[key].size
                part = noisy[offset : offset + size].reshape(old[key].shape)
                offset += size
                # np.asarray: 0-d sums come back as numpy scalars, which Array refuses.
                value = np.asarray((old[key].astype(np.float64) + part).astype(new[key].dtype))
                out[key] = Array(value.reshape(old[key].shape))
            else:
                # Integer buffers (BatchNorm's num_batches_tracked) count local batches:
                # data-dependent and outside the guarantee, so they go back as received.
                out[key] = received[key]
        return name, ArrayRecord(out)


def _remembered(context: Context, path: Path) -> list[tuple[float, float, int]]:
    """The history this node last committed to ``path`` (empty if none in this process)."""
    record = context.state.config_records.get(LOCAL_DP_STATE_KEY)
    text = None if record is None else record.get(str(path))
    if not isinstance(text, str):
        return []
    return [(float(s), float(q), int(t)) for s, q, t in json.loads(text)]


def _remember(context: Context, path: Path, ledger: PrivacyLedger) -> None:
    """Keep ``ledger``'s history for ``path`` in the node's memory (one entry per file)."""
    record = context.state.config_records.get(LOCAL_DP_STATE_KEY)
    entries = dict(record) if record is not None else {}
    entries[str(path)] = json.dumps([list(entry) for entry in ledger.history])
    context.state[LOCAL_DP_STATE_KEY] = ConfigRecord(entries)


def _unavailable(reason: str) -> LedgerUnavailableError:
    from fedsec.client.privacy import LedgerUnavailableError

    return LedgerUnavailableError(reason)


def local_dp(
    *,
    clip: float,
    noise_multiplier: float,
    delta: float,
    epsilon_budget: float,
    state_dir: StateDirSource | None = None,
    partition: int | Callable[[Context], int] | None = None,
    accountant: str = "rdp",
) -> LocalDP:
    """A Flower mod for client-level local DP on the model update, with a budget.

    On each ``train`` message the mod checks the node's privacy ledger, lets
    the user's handler train, and replaces the returned arrays by ``received +
    clip_C(returned - received) + N(0, (noise_multiplier * C)^2 I)``: the
    update is clipped to L2 norm C over all floating-point arrays together and
    Gaussian noise is added by the client itself, the Gaussian mechanism of
    DP-FedAvg applied locally (McMahan, Ramage, Talwar, Zhang, "Learning
    Differentially Private Recurrent Language Models", ICLR 2018; the moments
    accountant of Abadi et al., "Deep Learning with Differential Privacy",
    CCS 2016, here Opacus's RDP or PRV accountant). The noise comes from the
    operating system's CSPRNG (``os.urandom``), never from a seed the server
    could know (:func:`fedsec.privacy.client_level.privatize_update` with
    ``secure=True``).

    Parameters
    ----------
    clip : float
        L2 bound C on the whole update (> 0).
    noise_multiplier : float
        Noise std divided by C (> 0).
    delta : float
        The delta epsilon is accounted at, in (0, 1).
    epsilon_budget : float
        Total epsilon the node accepts to spend on its data (> 0); a round
        that would take the ledger above it is refused.
    state_dir : str, os.PathLike, callable or None
        Folder that keeps the durable ledger (must exist), or a function of
        the ``Context`` returning it; the ledger is
        ``<state_dir>/privacy/partition-<id>.json``. None: ``$FLWR_HOME/fedsec``
        (``~/.flwr/fedsec``), as for fedsec's own ClientApp.
    partition : int, callable or None
        Which data the ledger accounts for, or a function of the ``Context``;
        by default the node config's ``partition-id`` (0 if it has none).
    accountant : {"rdp", "prv"}
        Opacus accountant composing the rounds.

    Returns
    -------
    LocalDP
        The mod; list it after :func:`signing` in ``ClientApp(mods=[...])``.

    Raises
    ------
    TypeError, ValueError
        At creation, for a parameter out of range or of the wrong kind.

    Notes
    -----
    * Spending: each round the node trains is one Gaussian mechanism with
      noise multiplier sigma at sampling rate 1, recorded before the reply
      leaves: the ledger file is replaced atomically and ``fsync``-ed
      (:class:`fedsec.privacy.ledger.LedgerFile`), so a node restarted (a new
      process, a new mod object) continues its spending; a crash after the
      write over-counts, never under-counts.
    * Budget: a round whose spend would exceed ``epsilon_budget`` is refused
      before the user's handler runs, with the error
      ``PRIVACY_BUDGET_EXHAUSTED`` (4001) naming the epsilon it would reach;
      a ledger that cannot be used (missing ``state_dir``, altered file)
      gives ``PRIVACY_LEDGER_UNUSABLE`` (4002); a reply whose arrays cannot be
      privatized (other keys or shapes, a non-finite update) gives
      :data:`LOCAL_DP_REFUSED` (4003). No model leaves in any of these cases.
    * Terms only tighten: a ledger file written with other terms keeps its
      accountant and the smaller budget and delta of the file's and these.
    * Keying: one ledger per data partition in a state folder, across runs,
      as differential privacy composes over every release of the same
      records. Two partitions never share a file (and a file records its
      partition, so a copied one is refused). To give each simulation run
      its own ledgers, make the folder a function of the run, e.g.
      ``state_dir=lambda ctx: make_dir(f"runs/{ctx.run_id}")``.
    * Sensitivity: against adding or removing the node's whole contribution
      the sensitivity is C (noise multiplier sigma, as accounted); for
      replacing the node's data by other data it is 2C.
    * Outside the guarantee: non-floating arrays (integer buffers such as
      BatchNorm's ``num_batches_tracked``) are sent back as received, and the
      reply's metrics (the example count the server weights with, the loss)
      are sent as the handler wrote them.
    """
    return LocalDP(
        clip=clip,
        noise_multiplier=noise_multiplier,
        delta=delta,
        epsilon_budget=epsilon_budget,
        state_dir=state_dir,
        partition=partition,
        accountant=accountant,
    )
