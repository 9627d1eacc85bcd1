"""Config validation: every problem is one line that names the field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedsec.config import (
    ConfigError,
    ExperimentConfig,
    default_config,
    load_config,
    parse_config,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[1]


def _error(raw: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_is_the_quickstart_file() -> None:
    assert load_config(ROOT / "simulations" / "quickstart.toml") == default_config()


@pytest.mark.parametrize("path", sorted((ROOT / "simulations").glob("*.toml")))
def test_shipped_configs_validate(path: Path) -> None:
    assert isinstance(load_config(path), ExperimentConfig)


def test_round_trip_through_toml_and_dict() -> None:
    cfg = parse_config(
        {"data": {"partition": "dirichlet", "alpha": 0.1}, "experiment": {"name": "x"}}
    )
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg
    assert parse_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"num_clients": -3}}, "data.num_clients: must be >= 1 (got -3)"),
        ({"data": {"alpha": 0}}, "data.alpha: must be > 0 (got 0.0)"),
        ({"data": {"alpha": -1.5}}, "data.alpha: must be > 0 (got -1.5)"),
        (
            {"data": {"num_clients": 5000}},
            "data.num_clients: 5000 clients but dataset 'digits' has only",
        ),
        (
            {"aggregation": {"rule": "krumm"}},
            "aggregation.rule: unknown aggregation rule 'krumm'; valid choices: mean",
        ),
        (
            {"data": {"dataset": "imagenet"}},
            "data.dataset: unknown dataset 'imagenet'; valid choices: digits",
        ),
        (
            {"data": {"partition": "random"}},
            "data.partition: unknown partitioner 'random'; valid choices: iid",
        ),
        (
            {"model": {"name": "vgg"}},
            "model.name: unknown model 'vgg'; valid choices: mlp",
        ),
        (
            {"model": {"name": "cnn28"}},
            "model.name: model 'cnn28' expects 28x28 inputs, got 8x8",
        ),
        (
            {"client": {"optimizer": "lbfgs"}},
            "client.optimizer: unknown optimizer 'lbfgs'",
        ),
        ({"client": {"fraction": 0}}, "client.fraction: must be in (0, 1] (got 0.0)"),
        (
            {"client": {"local_epochs": 1.5}},
            "client.local_epochs: must be an integer (got 1.5)",
        ),
        (
            {"client": {"local_epochs": True}},
            "client.local_epochs: must be an integer (got True)",
        ),
        ({"client": {"lr": "fast"}}, "client.lr: must be a number (got 'fast')"),
        ({"experiment": {"rounds": 0}}, "experiment.rounds: must be >= 1 (got 0)"),
        ({"experiment": {"name": "../escape"}}, "experiment.name: must be letters"),
        ({"experiment": {"device": "tpu"}}, "experiment.device: must be auto, cpu"),
        (
            {"data": {"num_client": 3}},
            "data.num_client: unknown key (did you mean 'num_clients'?)",
        ),
        ({"dta": {}}, "dta: unknown section (did you mean 'data'?)"),
        ({"data": 3}, "data: must be a table"),
        (
            {"attack": {"name": "alie2"}},
            "attack.name: unknown attack 'alie2'; valid choices: none, label-flip",
        ),
        (
            {"attack": {"name": "alie"}},
            "attack.num_malicious: attack 'alie' needs malicious clients",
        ),
        (
            {"attack": {"name": "alie", "num_malicious": 1}},
            "attack: alie with colluder knowledge needs m >= 2",
        ),
        (
            {"attack": {"name": "mimic", "num_malicious": 2}},
            "attack: mimic needs omniscient knowledge",
        ),
        ({"attack": {"name": "ipm", "fraction": 1.0}}, "attack.fraction: must be in [0, 1)"),
        (
            {"attack": {"name": "ipm", "num_malicious": 2, "params": {"eps": 3}}},
            "attack.params: attack 'ipm' has no parameter 'eps'; valid: epsilon",
        ),
        (
            {"attack": {"name": "backdoor", "num_malicious": 2, "adaptive": True}},
            "attack.adaptive: 'backdoor' is data poisoning",
        ),
        ({"attack": {"knowledge": "god"}}, "attack.knowledge: unknown knowledge 'god'"),
        (
            {"evasion": {"attack": "cw"}},
            "evasion.attack: unknown evasion attack 'cw'; valid choices: none, fgsm, pgd",
        ),
        ({"evasion": {"eps": 0}}, "evasion.eps: must be in (0, 1]"),
        ({"secagg": {"enabled": "yes"}}, "secagg.enabled: must be true or false"),
    ],
)
def test_invalid_values_name_the_field(raw: dict[str, object], expected: str) -> None:
    assert _error(raw).startswith(expected)


def test_malformed_toml_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[data\nnum_clients = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML")
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_replace_revalidates() -> None:
    cfg = default_config()
    assert cfg.replace("experiment", rounds=3).experiment.rounds == 3
    with pytest.raises(ConfigError, match=r"experiment\.rounds"):
        cfg.replace("experiment", rounds=-1)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ({"rule": "krum", "f": 4}, "aggregation.f: krum needs n > 2f + 2, got n=10, f=4"),
        ({"rule": "bulyan", "f": 2}, "aggregation.f: bulyan needs n >= 4f + 3, got n=10, f=2"),
        ({"rule": "trimmed-mean", "params": {"beta": 0.7}}, "aggregation.params: "),
        (
            {"rule": "median", "params": {"bogus": 1}},
            "aggregation.params: aggregation rule 'median' has no parameter 'bogus'",
        ),
        (
            {"rule": "krum", "params": {"f": 1}},
            "aggregation.params.f: set the number of attackers as aggregation.f",
        ),
        (
            {"rule": "median", "pre": ["bucketin"]},
            "aggregation.pre: unknown pre-aggregation 'bucketin'; valid choices: bucketing, nnm",
        ),
        ({"rule": "median", "pre": "nnm"}, "aggregation.pre: must be a list of strings"),
        ({"rule": "median", "params": {"x": {"y": 1}}}, "aggregation.params.x: must be a number"),
        ({"rule": "foolsgold", "pre": ["bucketing"]}, "aggregation.params: "),
    ],
)
def test_aggregation_section(aggregation: dict[str, object], expected: str) -> None:
    assert _error({"aggregation": aggregation}).startswith(expected)


def test_aggregation_f_reaches_rule_and_wrappers() -> None:
    from fedsec.assembly import build_aggregator

    raw = {
        "data": {"num_clients": 20},
        "aggregation": {"rule": "krum", "f": 2, "pre": ["nnm", "bucketing"], "bucket_size": 2},
    }
    cfg = parse_config(raw)
    assert cfg.aggregation.pre == ("nnm", "bucketing")
    rule = build_aggregator(cfg)
    text = repr(rule)
    assert "NearestNeighborMixing" in text and "Bucketing" in text and "Krum" in text
    assert parse_config(tomllib.loads(to_toml(cfg))) == cfg


def test_bucketing_shrinks_what_the_rule_sees() -> None:
    # 10 clients in buckets of 3 -> 4 bucket means; Krum with f=2 needs 7.
    raw = {"aggregation": {"rule": "krum", "f": 2, "pre": ["bucketing"], "bucket_size": 3}}
    assert _error(raw).startswith("aggregation.f: krum needs n > 2f + 2, got n=4, f=2")


def test_f_only_overrides_beta_when_set() -> None:
    from fedsec.assembly import build_aggregator

    default = build_aggregator(
        parse_config({"aggregation": {"rule": "trimmed-mean", "params": {"beta": 0.2}}})
    )
    assert getattr(default, "f", None) is None and getattr(default, "beta", None) == 0.2
    explicit = build_aggregator(parse_config({"aggregation": {"rule": "trimmed-mean", "f": 2}}))
    assert getattr(explicit, "f", None) == 2
    krum = build_aggregator(parse_config({"aggregation": {"rule": "krum"}}))
    assert getattr(krum, "f", None) == 0  # aggregation.f's default, not Krum's own
