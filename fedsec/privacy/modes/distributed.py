"""``privacy.mode = "distributed"``: Skellam noise inside secure aggregation.

Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private
Federated Learning", NeurIPS 2021: under secure aggregation each client
clips its update to ``privacy.update_clip`` and adds a share of Skellam noise
to its encoded vector, so every sum the server unmasks is DP against the
server itself (:mod:`fedsec.privacy.distributed`). The noise is sized for the
fewest clients a sum may unmask: the bucket size, or the round's sampled
clients less the tolerated dropouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedsec.config import ConfigError
from fedsec.privacy.modes.base import Place, PrivacyMode, register, require_one_noise_source

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig


def distributed_noise_multiplier(cfg: ExperimentConfig) -> float:
    """The noise multiplier: given, or solved for ``target_epsilon`` over the run.

    The sum of the fewest clients ever unmasked carries Skellam noise of std
    ``noise_multiplier`` times the update's sensitivity
    (:func:`fedsec.privacy.distributed.plan_skellam`); a client may take part
    in every round.
    """
    from fedsec.privacy.distributed import skellam_noise_multiplier_for

    dp = cfg.privacy
    if dp.noise_multiplier:
        return dp.noise_multiplier
    return skellam_noise_multiplier_for(
        target_epsilon=dp.target_epsilon,
        delta=dp.delta,
        rounds=cfg.experiment.rounds,
        **skellam_setting(cfg),
    )


def skellam_setting(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the Skellam plan of the run's largest secure sum depends on, but the noise."""
    from fedsec.assembly import largest_sum, model_dim

    n, least = largest_sum(cfg)
    return {
        "norm_bound": cfg.privacy.update_clip,
        "clip": cfg.secagg.clip,
        "dim": model_dim(cfg),
        "num_clients": n,
        "min_clients": least,
        "modulus_bits": cfg.secagg.modulus_bits,
        "bits": cfg.secagg.bits,
    }


@register
class DistributedDP(PrivacyMode):
    """Clients clip to ``privacy.update_clip`` and add Skellam shares inside the secure sum."""

    name: ClassVar[str] = "distributed"
    runs_on: ClassVar[Place] = "secure-sum"

    def check(self, cfg: ExperimentConfig) -> None:
        require_one_noise_source(cfg)
        if not cfg.secagg.enabled:
            raise ConfigError(
                "privacy.mode",
                "distributed DP adds its noise inside secure aggregation; set "
                "secagg.enabled = true",
            )
        if cfg.secagg.weight_cap:
            raise ConfigError(
                "secagg.weight_cap",
                "distributed DP needs equal weights (secagg.weight_cap = 0): a weight rides in "
                "the sum without noise and would reveal the client's example count (got "
                f"{cfg.secagg.weight_cap})",
            )
        from fedsec.privacy.distributed import plan_skellam

        try:  # the solver already checks that its plan fits; a given noise is checked here
            plan_skellam(noise_multiplier=distributed_noise_multiplier(cfg), **skellam_setting(cfg))
        except ValueError as err:
            raise ConfigError("privacy", f"distributed DP: {err}") from None

    def check_secure(self, cfg: ExperimentConfig) -> None:
        if cfg.secagg.norm_bound:
            raise ConfigError(
                "secagg.norm_bound",
                "distributed DP bounds updates by privacy.update_clip; leave secagg.norm_bound "
                "at 0",
            )

    def secure_norm_bound(self, cfg: ExperimentConfig) -> float:
        return cfg.privacy.update_clip

    def secure_noise_multiplier(self, cfg: ExperimentConfig) -> float:
        return distributed_noise_multiplier(cfg)

    def round_metrics(self, cfg: ExperimentConfig, server_round: int) -> dict[str, object]:
        """Delta and the Skellam accountant; the secure sum reports ``dp_distributed_epsilon``."""
        out = super().round_metrics(cfg, server_round)
        out["dp_accountant"] = "skellam-rdp"
        return out
