"""The privacy-mode object: what ``privacy.mode`` means, asked instead of compared.

Every value of ``privacy.mode`` is a :class:`PrivacyMode` registered in
:data:`PRIVACY_MODES` by :func:`register` when its module is imported. A mode
says where its noise is added (:attr:`PrivacyMode.runs_on`), whether each
client keeps a privacy ledger, which client training step it needs, how its
part of a config is validated (:meth:`PrivacyMode.check`) and what the server
and the secure sum take from it (its rule wrapper, its noise, its per-round
metrics). The call sites (:mod:`fedsec.config`, :mod:`fedsec.assembly`,
:mod:`fedsec.client`, the ServerApp) ask ``mode_of(cfg)`` and never compare
the name, so adding a mode is one module in this package plus its test.

Nothing here imports torch or Flower: the config is validated before either is
loaded. The mechanisms themselves (accounting, DP-SGD, the Skellam plan) are
imported where a method needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from fedsec.config import ConfigError
from fedsec.registry import Registry

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig

#: Where a mode adds its noise.
Place = Literal["nowhere", "client", "server", "secure-sum"]


class PrivacyMode:
    """One value of ``privacy.mode``: its properties and hooks (defaults: no DP).

    Subclasses set the class attributes and override the hooks they change;
    instances are stateless (one per registered name).
    """

    #: The config value, ``privacy.mode = "<name>"``.
    name: ClassVar[str] = ""
    #: Where the noise is added: nowhere, on each client, on the server, or
    #: inside the secure sum (by the clients, so the server never sees less).
    runs_on: ClassVar[Place] = "nowhere"
    #: Each client keeps a durable ledger of its spend and refuses rounds past its
    #: budget; a node that caps its spend refuses every mode without one.
    keeps_ledger: ClassVar[bool] = False
    #: The client's training step is DP-SGD (per-example clipping and noise):
    #: fedsec's private loop, which rules out fp16, a user's ``client.train_fn``
    #: and adversarial training.
    private_training: ClassVar[bool] = False
    #: The client clips its whole update and adds Gaussian noise before sending it.
    noises_update: ClassVar[bool] = False

    def check(self, cfg: ExperimentConfig) -> None:
        """Validate this mode's part of ``cfg`` (after the common ``privacy.*`` ranges).

        Raises
        ------
        ConfigError
            One line naming the field.
        """

    def check_secure(self, cfg: ExperimentConfig) -> None:
        """Checks that need the secure-aggregation settings validated first (enabled only)."""

    def client_round(self, cfg: ExperimentConfig, num_examples: float) -> tuple[float, int]:
        """Sampling rate and steps one client's round costs the accountant (``(1.0, 1)``)."""
        return 1.0, 1

    def wrap_rule(self, cfg: ExperimentConfig, rule: Any) -> Any:
        """The server's aggregation rule under this mode (unchanged by default)."""
        return rule

    def secure_norm_bound(self, cfg: ExperimentConfig) -> float:
        """The L2 bound clients apply under secure aggregation (0: none)."""
        return cfg.secagg.norm_bound

    def secure_noise_multiplier(self, cfg: ExperimentConfig) -> float:
        """Noise multiplier the clients add inside the secure sum (0: none)."""
        return 0.0

    def round_metrics(self, cfg: ExperimentConfig, server_round: int) -> dict[str, object]:
        """The server's privacy bookkeeping for a round: delta and accountant.

        With client-side DP each client reports its own ledger's epsilon
        (``dp_epsilon_max``); modes that account on the server add theirs.
        """
        if self.runs_on == "nowhere":
            return {}
        return {"dp_delta": cfg.privacy.delta, "dp_accountant": cfg.privacy.accountant}


#: Every privacy mode by config name, in registration order (filled by :func:`register`).
PRIVACY_MODES: Registry[PrivacyMode] = Registry("privacy mode")

M = TypeVar("M", bound=type[PrivacyMode])


def register(cls: M) -> M:
    """Class decorator: add an instance of ``cls`` to :data:`PRIVACY_MODES` as ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a privacy mode needs a name")
    PRIVACY_MODES.add(cls.name, cls())
    return cls


def mode_of(cfg: ExperimentConfig) -> PrivacyMode:
    """The :class:`PrivacyMode` of ``cfg.privacy.mode`` (validated configs always have one)."""
    return PRIVACY_MODES.get(cfg.privacy.mode)


def ledger_mode_names() -> list[str]:
    """Names of the modes in which each client keeps a ledger, in registration order."""
    return [name for name in PRIVACY_MODES.names() if PRIVACY_MODES.get(name).keeps_ledger]


# ---- shared checks ------------------------------------------------------------------


def require_one_noise_source(cfg: ExperimentConfig) -> None:
    """Exactly one of ``privacy.noise_multiplier`` and ``privacy.target_epsilon``."""
    dp = cfg.privacy
    if (dp.noise_multiplier > 0) == (dp.target_epsilon > 0):
        raise ConfigError(
            "privacy.noise_multiplier",
            f"privacy mode '{dp.mode}' needs exactly one of privacy.noise_multiplier "
            "and privacy.target_epsilon",
        )


class ClientSideMode(PrivacyMode):
    """A mode whose clients add the noise and account for it in their own ledgers.

    Each client solves its own noise for ``target_epsilon`` over the whole run
    (:func:`fedsec.client.privacy.plan_round`); validation solves it for a
    client of average size, so an unreachable target fails before training.
    """

    runs_on: ClassVar[Place] = "client"
    keeps_ledger: ClassVar[bool] = True

    def check(self, cfg: ExperimentConfig) -> None:
        require_one_noise_source(cfg)
        dp = cfg.privacy
        if not dp.target_epsilon:
            return
        from fedsec.assembly import dataset_info_of
        from fedsec.privacy.accounting import solve_noise_multiplier

        average = dataset_info_of(cfg).num_train / cfg.data.num_clients
        rate, steps = self.client_round(cfg, average)
        try:
            solve_noise_multiplier(
                target_epsilon=dp.target_epsilon,
                target_delta=dp.delta,
                sample_rate=rate,
                steps=steps * cfg.experiment.rounds,
                accountant=dp.accountant,  # type: ignore[arg-type]
            )
        except ValueError as err:
            raise ConfigError("privacy.target_epsilon", str(err)) from None
