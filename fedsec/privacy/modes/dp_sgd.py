"""``privacy.mode = "dp-sgd"``: record-level DP-SGD on every client.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016: each
client clips every example's gradient to ``privacy.max_grad_norm`` and adds
Gaussian noise to each Poisson-sampled batch (fedsec's private loop,
:func:`fedsec.privacy.dpsgd.dp_train`); its ledger accounts for the
subsampled Gaussian mechanism at ``q = batch_size / n``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from fedsec.config import ConfigError
from fedsec.privacy.modes.base import ClientSideMode, register

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig


@register
class DPSGD(ClientSideMode):
    """Per-example clipping and noise in the client's training step."""

    name: ClassVar[str] = "dp-sgd"
    private_training: ClassVar[bool] = True

    def check(self, cfg: ExperimentConfig) -> None:
        super().check(cfg)
        if cfg.evasion.adversarial_training:
            raise ConfigError(
                "evasion.adversarial_training", "is not supported together with DP-SGD"
            )

    def client_round(self, cfg: ExperimentConfig, num_examples: float) -> tuple[float, int]:
        """Poisson sampling at ``q = batch_size / n``, ``1 / q`` expected steps per epoch."""
        from fedsec.privacy.dpsgd import dp_sgd_steps

        client = cfg.client
        rate = min(1.0, client.batch_size / num_examples)
        steps = dp_sgd_steps(
            num_examples, client.batch_size, client.local_epochs, client.local_steps or None
        )
        return rate, steps
