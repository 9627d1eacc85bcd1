"""``privacy.mode = "central"``: DP-FedAvg, the server clips and noises the mean.

McMahan et al., "Learning Differentially Private Recurrent Language Models",
ICLR 2018: the server clips each client update to ``privacy.update_clip`` and
adds Gaussian noise to the mean (:class:`fedsec.privacy.client_level.CentralDPFedAvg`),
accounted at client level (sampling rate = clients per round / clients, one
Gaussian mechanism per round). The server is trusted with the raw updates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from fedsec.config import ConfigError
from fedsec.privacy.modes.base import Place, PrivacyMode, register, require_one_noise_source

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig


def central_noise_multiplier(cfg: ExperimentConfig) -> float:
    """DP-FedAvg's noise multiplier: given, or solved for ``target_epsilon`` over the run."""
    from fedsec.assembly import sampled_clients
    from fedsec.privacy.accounting import solve_client_level_noise_multiplier

    dp = cfg.privacy
    if dp.noise_multiplier:
        return dp.noise_multiplier
    return solve_client_level_noise_multiplier(
        target_epsilon=dp.target_epsilon,
        target_delta=dp.delta,
        clients_per_round=sampled_clients(cfg),
        total_clients=cfg.data.num_clients,
        rounds=cfg.experiment.rounds,
        accountant=dp.accountant,  # type: ignore[arg-type]
    )


@register
class CentralDP(PrivacyMode):
    """The server wraps the mean in :class:`~fedsec.privacy.client_level.CentralDPFedAvg`."""

    name: ClassVar[str] = "central"
    runs_on: ClassVar[Place] = "server"

    def check(self, cfg: ExperimentConfig) -> None:
        require_one_noise_source(cfg)
        if cfg.secagg.enabled:
            raise ConfigError(
                "privacy.mode",
                "central DP adds noise on the server, so it cannot protect updates from the "
                "server that secure aggregation guards against; use 'local' or 'dp-sgd'",
            )
        agg = cfg.aggregation
        if agg.rule != "mean" or agg.pre:
            raise ConfigError(
                "privacy.mode",
                f"central DP-FedAvg bounds the sensitivity of the mean only; got rule "
                f"'{agg.rule}' with pre {list(agg.pre)} (use aggregation.rule = \"mean\")",
            )
        if cfg.privacy.target_epsilon:
            try:
                central_noise_multiplier(cfg)
            except ValueError as err:
                raise ConfigError("privacy.target_epsilon", str(err)) from None

    def wrap_rule(self, cfg: ExperimentConfig, rule: Any) -> Any:
        from fedsec.privacy.client_level import CentralDPFedAvg

        return CentralDPFedAvg(
            rule,
            clip=cfg.privacy.update_clip,
            noise_multiplier=central_noise_multiplier(cfg),
            seed=cfg.experiment.seed,
        )

    def round_metrics(self, cfg: ExperimentConfig, server_round: int) -> dict[str, object]:
        """Delta, accountant and the epsilon spent after ``server_round`` rounds."""
        from fedsec.assembly import sampled_clients
        from fedsec.privacy.accounting import client_level_epsilon

        dp = cfg.privacy
        out = super().round_metrics(cfg, server_round)
        out["dp_epsilon"] = client_level_epsilon(
            noise_multiplier=central_noise_multiplier(cfg),
            clients_per_round=sampled_clients(cfg),
            total_clients=cfg.data.num_clients,
            rounds=server_round,
            delta=dp.delta,
            accountant=dp.accountant,  # type: ignore[arg-type]
        )
        return out
