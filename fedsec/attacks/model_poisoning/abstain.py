"""Abstain: the malicious clients send nothing, the reference a defence is measured against.

A defence that removed exactly the malicious clients' updates would leave the
server with the honest clients' updates alone. Running the colluders as absent
measures that ceiling in the same setting: the accuracy lost to the missing
data (at Dirichlet 0.1 some classes live mostly on a few clients) rather than
to poisoning. Robust-aggregation papers compare against the same honest-only
reference (e.g. Karimireddy, He, Jaggi, ICLR 2022; Allouah et al., AISTATS
2023, whose lower bound is stated against the honest clients' objective).
"""

from __future__ import annotations

import torch

from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
from fedsec.attacks.model_poisoning.base import register


@register
class Abstain(ModelPoisoningAttack):
    """The malicious clients withhold their updates: the honest-only reference.

    The reference of robust-aggregation theory, whose error bounds are stated
    against the honest clients' objective (Allouah et al., AISTATS 2023). The
    adversary component drops the colluders' training replies (under
    secure aggregation they drop out before masking, as dropouts do), so the
    server aggregates the honest clients' updates only, through the defence
    as configured. A grid's report lists it beside the attacks but leaves it
    out of every worst case: it is what a perfect defence could reach, given
    the data the malicious clients hold and do not contribute.

    Knowledge: none. It crafts nothing.
    """

    name = "abstain"
    withholds = True

    def craft(self, view: AdversaryView) -> torch.Tensor:
        raise RuntimeError("abstain crafts no update: the adversary component drops its replies")
