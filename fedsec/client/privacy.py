"""Client-side differential privacy: the per-round plan and the durable ledger.

Before a round the client computes what the round would spend; if that would
exceed its budget it refuses to train and replies with the ledger's one-line
reason. The spend of a round that runs is written to disk before the update
leaves the client (:class:`NodeLedger`), so a SuperNode restarted, or a
simulation killed and resumed, continues its clients' ledgers instead of
starting them from zero.

Where a client's ledger lives (:func:`ledger_location`), first match wins:

1. node config ``state-dir`` (``flower-supernode --node-config "partition-id=0
   state-dir='/var/lib/fedsec'"``): ``<state-dir>/privacy/partition-<id>.json``.
   The folder ``state-dir`` must exist: a missing one (a typo, an unmounted
   volume) is refused rather than silently starting a fresh ledger.
2. in a simulation (:func:`~fedsec.attacks.threat.simulated_adversary`: the
   server and the clients are one user's processes), the run's folder, which
   the server names in the round config (``privacy-ledger-dir``):
   ``results/<run>/privacy/partition-<id>.json``, so ``fedsec run --resume``
   continues it. The server creates ``privacy/`` when the run starts; a
   client refuses to train if it is missing later (deleted), or if the run
   folder is not visible at all (a Ray worker on another machine: the run
   folder must be on a filesystem every worker mounts at the same path, and
   ``FEDSEC_SIMULATED_ADVERSARY=1`` exported where ``ray start`` runs; a
   worker without it acts as a deployed node and keeps its ledgers under its
   own ``$FLWR_HOME``, across runs, which over-counts but never under-counts).
   A simulation whose server names no folder keeps the ledger in the node's
   memory only (unit tests that call the ClientApp directly).
3. otherwise (a deployed node without ``state-dir``):
   ``$FLWR_HOME/fedsec/privacy/partition-<id>.json``, with ``FLWR_HOME``
   defaulting to ``~/.flwr`` as for Flower itself; created if missing.

A path sent by the server is never used outside a simulation: a curious server
could otherwise point a node at an empty folder and reset its budget.

Outside a simulation, a node's ledger is per partition and not per run: every
run on the node's data spends from the same ledger, as differential privacy
composes over every release of the same records. A ledger's terms can only
tighten: the budget and delta used are the smaller of the file's and the
config's (and the smaller is stored), and the accountant stays the one the
history was started with. A node's own caps (node config ``epsilon-budget``,
``delta-budget``, the latter 1e-5 by default once epsilon is capped) bound
what any server sends, and a capped node refuses rounds of a privacy mode
without a client ledger (``none``, ``distributed``). To start over (new
data, a deliberate new budget) the node's operator removes the file. What
cannot be detected: a whole state folder (or ``FLWR_HOME``) removed between
two runs of a node looks like a node that never trained. Within a process, a
file that lost rounds the node recorded in memory (deleted, restored from an
old backup) is refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedsec.config import ExperimentConfig
from fedsec.privacy.accounting import solve_noise_multiplier
from fedsec.privacy.ledger import LedgerFile, LedgerFileError, PrivacyLedger
from fedsec.privacy.modes import mode_of
from fedsec.wire import DELTA_CAP_KEY as DELTA_CAP_KEY
from fedsec.wire import EPSILON_CAP_KEY as EPSILON_CAP_KEY
from fedsec.wire import LEDGER_DIR_KEY as LEDGER_DIR_KEY
from fedsec.wire import LEDGER_KEY as LEDGER_KEY
from fedsec.wire import PRIVACY_BUDGET_EXHAUSTED as PRIVACY_BUDGET_EXHAUSTED
from fedsec.wire import PRIVACY_LEDGER_UNUSABLE as PRIVACY_LEDGER_UNUSABLE
from fedsec.wire import STATE_DIR_KEY as STATE_DIR_KEY

logger = logging.getLogger(__name__)

# LEDGER_KEY, the error codes PRIVACY_BUDGET_EXHAUSTED / PRIVACY_LEDGER_UNUSABLE and the
# keys STATE_DIR_KEY, EPSILON_CAP_KEY, DELTA_CAP_KEY, LEDGER_DIR_KEY are defined in
# fedsec.wire (re-exported here).
#: Delta of a node that caps epsilon (``epsilon-budget``) but names no delta cap
#: (``delta-budget``): the config's default, so that a server-sent delta (say 0.5,
#: which makes every epsilon small) cannot stretch the epsilon cap.
DEFAULT_NODE_DELTA = 1e-5
#: Sub-folder of the state folder, and of a simulation's run folder, holding ledgers.
LEDGER_SUBDIR = "privacy"


class LedgerUnavailableError(Exception):
    """The node's ledger cannot be used; the message is the one-line refusal reason."""


def ledger_file_name(partition_id: int) -> str:
    """File name of a partition's ledger: ``partition-<id>.json``."""
    return f"partition-{int(partition_id)}.json"


def default_state_dir() -> Path:
    """A deployed node's state folder when its node config sets none: ``$FLWR_HOME/fedsec``."""
    from flwr.supercore.utils import get_flwr_home

    return get_flwr_home().expanduser() / "fedsec"


def simulation_ledger_config(
    cfg: ExperimentConfig, run_path: Path, *, fresh: bool
) -> dict[str, str]:
    """Round-config entries that tell a simulation's clients where their ledgers go.

    For the server of a simulation: empty unless the privacy mode keeps client
    ledgers and this is a simulation. ``fresh`` (a run starting at round 1)
    creates ``<run>/privacy``; a resumed run's folder is not recreated, so a
    deleted one makes the clients refuse instead of restarting their spend.
    """
    from fedsec.attacks.threat import simulated_adversary

    if not mode_of(cfg).keeps_ledger or not simulated_adversary():
        return {}
    folder = Path(run_path).resolve() / LEDGER_SUBDIR
    if fresh:
        folder.mkdir(mode=0o700, exist_ok=True)
    return {LEDGER_DIR_KEY: str(folder)}


def ledger_location(
    context: Context, round_config: Mapping[str, Any], partition_id: int
) -> Path | None:
    """Where this node keeps partition ``partition_id``'s ledger (None: in memory only).

    See the module docstring for the order of the choices.

    Raises
    ------
    LedgerUnavailableError
        If ``state-dir`` is not an existing folder, a simulation's run folder
        is not visible, or its ledger folder is missing.
    """
    from fedsec.attacks.threat import simulated_adversary

    name = ledger_file_name(partition_id)
    node = context.node_config
    if STATE_DIR_KEY in node:
        state = Path(str(node[STATE_DIR_KEY])).expanduser()
        if not state.is_dir():
            raise LedgerUnavailableError(
                f"node config {STATE_DIR_KEY} '{state}' is not an existing folder; create it "
                "(it keeps this node's privacy ledger across restarts)"
            )
        folder = state / LEDGER_SUBDIR
    elif simulated_adversary():
        sent = round_config.get(LEDGER_DIR_KEY)
        if not sent:
            return None
        folder = Path(str(sent))
        if not folder.parent.is_dir():
            raise LedgerUnavailableError(
                f"the run folder {folder.parent} is not visible to this client; on a Ray "
                "cluster every worker needs it on a shared filesystem at the same path"
            )
        if not folder.is_dir():
            raise LedgerUnavailableError(
                f"privacy ledger folder {folder} is missing although the run has started; "
                "restore it, or create it empty to restart every client's spend from zero"
            )
        return folder / name
    else:
        folder = default_state_dir() / LEDGER_SUBDIR
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise LedgerUnavailableError(
            f"cannot create the privacy ledger folder {folder}: {err.strerror or err}"
        ) from None
    return folder / name


@dataclass(frozen=True)
class RoundPlan:
    """What one round of the client's training costs, for the accountant."""

    noise_multiplier: float
    sample_rate: float
    steps: int


@functools.lru_cache(maxsize=64)
def _solve(target: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    return solve_noise_multiplier(
        target_epsilon=target,
        target_delta=delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,  # type: ignore[arg-type]
    )


def plan_round(cfg: ExperimentConfig, num_examples: int) -> RoundPlan:
    """The round's noise multiplier, sampling rate and steps.

    The sampling rate and steps come from the privacy mode
    (:meth:`~fedsec.privacy.modes.PrivacyMode.client_round`). DP-SGD: Poisson
    sampling at ``q = batch_size / n`` and ``1 / q`` expected steps per epoch.
    Local DP: one Gaussian mechanism on the whole update.
    With ``target_epsilon`` the noise is solved for the whole run (every
    round, as if the client took part in all of them), before training.
    """
    dp = cfg.privacy
    rounds = cfg.experiment.rounds
    rate, steps = mode_of(cfg).client_round(cfg, num_examples)
    sigma = dp.noise_multiplier or _solve(
        dp.target_epsilon, dp.delta, rate, steps * rounds, dp.accountant
    )
    return RoundPlan(noise_multiplier=sigma, sample_rate=rate, steps=steps)


def configured_ledger(cfg: ExperimentConfig) -> PrivacyLedger:
    """An empty ledger with the config's terms.

    The budget is ``privacy.epsilon_budget``, else ``target_epsilon``; with
    neither (a fixed noise multiplier) spending is recorded but never refused.
    """
    dp = cfg.privacy
    budget = dp.epsilon_budget or dp.target_epsilon or sys.float_info.max
    return PrivacyLedger(epsilon_budget=budget, delta=dp.delta, accountant=dp.accountant)  # type: ignore[arg-type]


def load_ledger(context: Context, cfg: ExperimentConfig) -> PrivacyLedger:
    """The ledger in the node's memory (``context.state``), or a new one with the config's terms."""
    record = context.state.config_records.get(LEDGER_KEY)
    if record is not None:
        return PrivacyLedger.from_config(dict(record))
    return configured_ledger(cfg)


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    """Store the ledger in the node's memory (``context.state``)."""
    context.state[LEDGER_KEY] = ConfigRecord(ledger.to_config())  # type: ignore[arg-type]


def reconcile(stored: PrivacyLedger, cfg: ExperimentConfig) -> PrivacyLedger:
    """The stored ledger under the stricter of its terms and the config's.

    A changed config never resets the history and never loosens the terms: the
    budget and delta are the smaller of the two (a smaller delta gives a larger
    epsilon for the same history), and the accountant stays the stored one, so
    the whole history is composed by one accountant.
    """
    return tighten_ledger(stored, configured_ledger(cfg))


def tighten_ledger(stored: PrivacyLedger, configured: PrivacyLedger) -> PrivacyLedger:
    """``stored``'s history under the stricter of its terms and ``configured``'s.

    :func:`reconcile` for terms given as an (empty) ledger rather than a
    config: the budget and delta are the smaller of the two, the accountant
    stays the stored one (warnings name what is not used).
    """
    if configured.accountant != stored.accountant:
        logger.warning(
            "privacy ledger kept with accountant %s; the config's %s is not used for it",
            stored.accountant,
            configured.accountant,
        )
    if configured.epsilon_budget > stored.epsilon_budget:
        logger.warning(
            "privacy ledger budget %.4g kept; the config's larger %.4g is not used",
            stored.epsilon_budget,
            configured.epsilon_budget,
        )
    return PrivacyLedger(
        epsilon_budget=min(stored.epsilon_budget, configured.epsilon_budget),
        delta=min(stored.delta, configured.delta),
        accountant=stored.accountant,
        history=list(stored.history),
    )


@dataclass
class NodeLedger:
    """A node's ledger for one round, and where it is kept.

    Record the round's spend in :attr:`ledger`, then call :meth:`commit`
    before the update leaves the node.
    """

    ledger: PrivacyLedger
    context: Context
    file: LedgerFile | None

    def commit(self) -> None:
        """Make the recorded spend durable (file first, then the node's memory).

        Raises
        ------
        LedgerUnavailableError
            If the file cannot be written: the update must then not be sent.
        """
        if self.file is not None:
            try:
                self.file.save(self.ledger)
            except OSError as err:
                raise LedgerUnavailableError(
                    f"cannot write privacy ledger {self.file.path}: {err.strerror or err}"
                ) from None
        save_ledger(self.context, self.ledger)


def node_epsilon_cap(context: Context) -> float | None:
    """The node's own budget cap (node config ``epsilon-budget``), if it sets one.

    Raises
    ------
    LedgerUnavailableError
        If the value is not a finite number > 0.
    """
    raw = context.node_config.get(EPSILON_CAP_KEY)
    if raw is None:
        return None
    try:
        cap = float(raw)
    except (TypeError, ValueError):
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0) or isinstance(raw, bool):
        raise LedgerUnavailableError(
            f"node config {EPSILON_CAP_KEY} must be a finite number > 0, got {str(raw)[:40]!r}"
        )
    return cap


def node_delta_cap(context: Context) -> float | None:
    """The node's own delta cap (node config ``delta-budget``).

    :data:`DEFAULT_NODE_DELTA` when the node caps epsilon without naming a
    delta (an epsilon cap means nothing at a delta the server picks), None
    when it caps neither.

    Raises
    ------
    LedgerUnavailableError
        If the value is not a number in (0, 1).
    """
    raw = context.node_config.get(DELTA_CAP_KEY)
    if raw is None:
        return DEFAULT_NODE_DELTA if EPSILON_CAP_KEY in context.node_config else None
    try:
        cap = float(raw)
    except (TypeError, ValueError):
        cap = math.nan
    if not 0 < cap < 1 or isinstance(raw, bool):
        raise LedgerUnavailableError(
            f"node config {DELTA_CAP_KEY} must be a number in (0, 1), got {str(raw)[:40]!r}"
        )
    return cap


def node_requires_client_dp(context: Context) -> bool:
    """Whether the node caps its privacy spend, and so trains only under a ledger mode."""
    return EPSILON_CAP_KEY in context.node_config or DELTA_CAP_KEY in context.node_config


def _capped(
    ledger: PrivacyLedger, cap: float | None, delta_cap: float | None = None
) -> PrivacyLedger:
    """``ledger`` with budget and delta lowered to the node's caps (a server cannot raise them)."""
    budget = ledger.epsilon_budget if cap is None else min(cap, ledger.epsilon_budget)
    delta = ledger.delta if delta_cap is None else min(delta_cap, ledger.delta)
    if (budget, delta) == (ledger.epsilon_budget, ledger.delta):
        return ledger
    # A new ledger, not a mutated one: spent() caches its value for the old delta.
    return PrivacyLedger(budget, delta, ledger.accountant, list(ledger.history))


@contextlib.contextmanager
def open_node_ledger(
    context: Context,
    cfg: ExperimentConfig,
    round_config: Mapping[str, Any],
    partition_id: int,
) -> Iterator[NodeLedger]:
    """The node's ledger for one round, locked against concurrent rounds of the node.

    The lock is held until the block ends, so spend, commit and reply of one
    message finish before another message of the node reads the ledger.

    Raises
    ------
    LedgerUnavailableError
        If the ledger's location is unusable (:func:`ledger_location`), its file
        is malformed or altered, or it lacks rounds this process recorded in
        memory (deleted or rolled back while the node ran).
    """
    cap = node_epsilon_cap(context)
    delta_cap = node_delta_cap(context)
    path = ledger_location(context, round_config, partition_id)
    if path is None:
        yield NodeLedger(_capped(load_ledger(context, cfg), cap, delta_cap), context, None)
        return
    file = LedgerFile(path, partition_id)
    record = context.state.config_records.get(LEDGER_KEY)
    remembered = PrivacyLedger.from_config(dict(record)).history if record else []
    with locked_stored_ledger(file, remembered) as stored:
        ledger = configured_ledger(cfg) if stored is None else reconcile(stored, cfg)
        yield NodeLedger(_capped(ledger, cap, delta_cap), context, file)


@contextlib.contextmanager
def locked_stored_ledger(
    file: LedgerFile, remembered: list[tuple[float, float, int]]
) -> Iterator[PrivacyLedger | None]:
    """Lock ``file`` for the block and yield the ledger stored in it (None: no file yet).

    ``remembered`` is the history this process last committed to the file: a
    file that lacks any of it was deleted or rolled back while the node ran,
    and the node refuses to train rather than spend its budget again.

    Raises
    ------
    LedgerUnavailableError
        If the file cannot be locked, is malformed or altered, or lacks
        remembered rounds.
    """
    path = file.path
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file.locked())
        except OSError as err:
            raise LedgerUnavailableError(
                f"cannot lock privacy ledger {path}: {err.strerror or err}"
            ) from None
        try:
            stored = file.load()
        except LedgerFileError as err:
            raise LedgerUnavailableError(f"{err}; refusing to train") from None
        on_disk = stored.history if stored is not None else []
        if on_disk[: len(remembered)] != remembered:
            raise LedgerUnavailableError(
                f"privacy ledger {path} lacks rounds this node recorded "
                f"({len(on_disk)} on disk, {len(remembered)} in memory: deleted or rolled "
                "back?); refusing to train"
            )
        yield stored
