"""Model-poisoning attacks: the updates malicious clients send instead of honest ones.

An update is "model after local training minus global model", so the honest
direction of change is the mean update. Each attack is a configured object;
``attack.craft(view)`` turns an :class:`~fedsec.attacks.base.AdversaryView`
into the [m, d] malicious updates. Unless stated otherwise all m malicious
clients send the same crafted update, as in the papers.

Non-colluding attacks (:class:`SignFlip`, :class:`GaussianNoise`,
:class:`Scaling`) act on each malicious client's own update alone and also
offer ``perturb(update, generator)`` for use on a single client. The others
estimate honest behaviour from ``view.reference``: all honest updates when the
adversary is omniscient, else the colluders' own honest updates.

Adaptive attacks (:class:`MinMax`, :class:`MinSum`, :class:`FangKrum` when
``view.rule`` is set, and ``fltrust-adaptive``, which needs it) evaluate the
server's rule on the stack ``[malicious x m; honest]``, the n - m honest
updates being the real ones (omniscient) or the colluders' model of them
(:func:`~fedsec.attacks.model_poisoning.base.modelled_honest`), with the
rule's context where the view has it (``view.context``: FLTrust's
``reference``). Each evaluation starts from the rule's current state
(``state_dict``), which is restored afterwards, so probing never changes the
server's rule. A rule that cannot be evaluated on that stack (it needs
context the view lacks, such as FoolsGold's ``client_ids``, or it rejects n)
is not probed: the attack falls back to its rule-agnostic version.

One module per attack (or per family sharing its maths), each citing its
paper: :mod:`.sign_flip`, :mod:`.gaussian` (Blanchard et al., NeurIPS 2017),
:mod:`.scaling` (Bagdasaryan et al., AISTATS 2020), :mod:`.alie` (Baruch et
al., NeurIPS 2019), :mod:`.ipm` (Xie et al., UAI 2020), :mod:`.optimized`
(Min-Max and Min-Sum, Shejwalkar and Houmansadr, NDSS 2021), :mod:`.fang`
(Fang et al., USENIX Security 2020) and :mod:`.mimic` (Karimireddy et al.,
ICLR 2022). Shared checks and rule probing live in :mod:`.base`.

Adding an attack is one new module in this package plus its test: a class
decorated with :func:`~fedsec.attacks.model_poisoning.base.register` joins
:data:`MODEL_ATTACKS` when its module is imported, and importing this package
imports every module in it (:func:`discover`). The built-in ones are imported
first, below, so that :data:`MODEL_ATTACKS` keeps its documented order.

Build attacks by config name through :data:`MODEL_ATTACKS`::

    attack = MODEL_ATTACKS.get("min-max")(direction="std")
    malicious = attack.craft(view)  # [m, d]
"""

from __future__ import annotations

from fedsec.attacks.model_poisoning.base import (
    MAX_RULE_CALLS,
    MODEL_ATTACKS,
    PerClientAttack,
    can_probe,
    probe,
    register,
)
from fedsec.registry import import_package_modules

# Import order is registration order, the order of MODEL_ATTACKS.names() (and of
# the config's list of valid attacks): per-client attacks first. Keep it sorted
# by hand; discover() below appends any other module of the package.
# isort: off
from fedsec.attacks.model_poisoning.sign_flip import SignFlip
from fedsec.attacks.model_poisoning.gaussian import GaussianNoise
from fedsec.attacks.model_poisoning.scaling import Scaling
from fedsec.attacks.model_poisoning.alie import ALIE, ALIEDirection
from fedsec.attacks.model_poisoning.ipm import IPM
from fedsec.attacks.model_poisoning.optimized import (
    MAX_SEARCH_STEPS,
    SCAN_LEVELS,
    MinMax,
    MinSum,
    Perturbation,
    halving_search,
    scan_and_refine,
)
from fedsec.attacks.model_poisoning.fang import MAX_HALVINGS, FangKrum, FangTrimmedMean
from fedsec.attacks.model_poisoning.mimic import Mimic
from fedsec.attacks.model_poisoning.abstain import Abstain
# isort: on


def discover() -> list[str]:
    """Import every module of this package, so each attack in it registers itself.

    Modules already imported are skipped (Python caches them), so calling
    this again only picks up modules added to the package's path since.

    Returns
    -------
    list of str
        The package's module names (``base`` included), in ``pkgutil`` order.
    """
    return import_package_modules(__name__, __path__)


discover()

__all__ = [
    "ALIE",
    "IPM",
    "MAX_HALVINGS",
    "MAX_RULE_CALLS",
    "MAX_SEARCH_STEPS",
    "MODEL_ATTACKS",
    "SCAN_LEVELS",
    "ALIEDirection",
    "Abstain",
    "FangKrum",
    "FangTrimmedMean",
    "GaussianNoise",
    "Mimic",
    "MinMax",
    "MinSum",
    "PerClientAttack",
    "Perturbation",
    "Scaling",
    "SignFlip",
    "can_probe",
    "discover",
    "halving_search",
    "probe",
    "register",
    "scan_and_refine",
]
