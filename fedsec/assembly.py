"""The assembly of objects from a validated config: rules, attacks, derived sizes.

:mod:`fedsec.config` is the schema (dataclasses, parsing, validation, one-line
:class:`~fedsec.config.ConfigError`); this module builds what a run uses from
an :class:`~fedsec.config.ExperimentConfig` that passed it: the aggregation
rule with its pre-aggregation steps and its privacy wrapper
(:func:`build_aggregator`), the configured attack
(:func:`build_configured_attack`), and the quantities derived from several
sections (clients sampled per round, the bucket size and norm bound of secure
aggregation, the model's update length). The privacy mode's own quantities
(noise multipliers, the Skellam plan's setting) live with the mode, in
:mod:`fedsec.privacy.modes`.

Validation builds some of these too (a rule's parameters are only known valid
once it is built); like the registries they come in with torch, so nothing
here imports torch or Flower at module level.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedsec.config import ExperimentConfig
    from fedsec.data import DatasetInfo


def dataset_info_of(cfg: ExperimentConfig) -> DatasetInfo:
    """The :class:`~fedsec.data.DatasetInfo` of the configured data set.

    Built-in data sets are not read; a user's is loaded (cached per process).
    """
    from fedsec.data.datasets import dataset_info

    return dataset_info(cfg.data.dataset, cfg.data.data_dir, seed=cfg.experiment.seed)


def sampled_clients(cfg: ExperimentConfig) -> int:
    """Clients sampled per training round (what a rule sees when all of them reply)."""
    return max(1, round(cfg.client.fraction * cfg.data.num_clients))


def secure_bucket_size(cfg: ExperimentConfig) -> int:
    """``s`` when the config runs bucketed secure aggregation, else 0.

    Bucketed mode is secure aggregation with ``aggregation.pre`` starting with
    ``"bucketing"``: the buckets are then formed by the protocol, not the rule.
    """
    if cfg.secagg.enabled and cfg.aggregation.pre[:1] == ("bucketing",):
        return cfg.aggregation.bucket_size
    return 0


def secure_norm_bound(cfg: ExperimentConfig) -> float:
    """The L2 bound clients apply under secure aggregation (0: none).

    ``secagg.norm_bound``, unless the privacy mode bounds updates itself
    (distributed DP: ``privacy.update_clip``).
    """
    from fedsec.privacy.modes import mode_of

    return mode_of(cfg).secure_norm_bound(cfg)


def model_dim(cfg: ExperimentConfig) -> int:
    """Number of values in the configured model's state (the length of an update)."""
    from fedsec.models import make_model

    info = dataset_info_of(cfg)
    model = make_model(cfg.model.name, info.input_shape, info.num_classes)
    return sum(value.numel() for value in model.state_dict().values())


def largest_sum(cfg: ExperimentConfig) -> tuple[int, int]:
    """Clients in the largest secure sum of a round, and the fewest it may unmask."""
    n = sampled_clients(cfg)
    s = secure_bucket_size(cfg)
    if s:
        buckets = max(1, n // s)
        return n // buckets + (n % buckets > 0), s
    from fedsec.privacy.distributed import unmask_floor

    return n, unmask_floor(n, cfg.secagg.dropout_rate)


def build_aggregator(cfg: ExperimentConfig) -> Any:
    """The configured rule with its pre-aggregation wrappers (a fresh, stateless-so-far object).

    ``aggregation.f`` is passed to every rule or wrapper that takes ``f``;
    ``bucket_size`` and the experiment seed go to bucketing. Under bucketed
    secure aggregation the leading bucketing is the protocol's, so the rule
    returned is what the server applies across the bucket means. The privacy
    mode may wrap the rule (central DP: :class:`~fedsec.privacy.client_level.CentralDPFedAvg`).
    """
    from fedsec.aggregation import PRE_AGGREGATORS, RULES, make_pipeline
    from fedsec.aggregation.registry import parameters_of
    from fedsec.privacy.modes import mode_of

    agg = cfg.aggregation
    params = dict(agg.params)
    rule_cls = RULES.get(agg.rule)
    if "f" in parameters_of(rule_cls):
        # Rules whose f defaults to None (trimmed mean: use beta) only get an explicit f.
        f_default = inspect.signature(rule_cls).parameters["f"].default
        if agg.f > 0 or f_default is not None:
            params["f"] = agg.f
    pre = agg.pre[1:] if secure_bucket_size(cfg) else agg.pre
    pre_params: dict[str, dict[str, Any]] = {}
    for step in pre:
        accepted = parameters_of(PRE_AGGREGATORS.get(step), skip=1)
        pre_params[step] = {
            key: value
            for key, value in {
                "f": agg.f,
                "s": agg.bucket_size,
                "seed": cfg.experiment.seed,
            }.items()
            if key in accepted
        }
    rule = make_pipeline(agg.rule, params, pre, pre_params)
    return mode_of(cfg).wrap_rule(cfg, rule)


def build_configured_attack(cfg: ExperimentConfig) -> Any:
    """The configured attack object (data or model poisoning), or None for ``"none"``."""
    from fedsec.attacks.threat import build_attack

    attack = cfg.attack
    if attack.name == "none":
        return None
    return build_attack(
        attack.name, attack.params, attack.knowledge == "omniscient", cfg.data.dataset
    )
