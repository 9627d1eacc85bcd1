"""Config input hardening (issue 16): non-finite numbers, integer limits, deep and empty TOML.

Every refusal is one line naming the field, from ``parse_config`` and from
``fedsec validate`` (exit 2, no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import get_type_hints

import pytest
from typer.testing import CliRunner

from fedsec.attacks.threat import round_generator
from fedsec.bench.grid import GridError, load_grid
from fedsec.cli import cli
from fedsec.config import (
    _SECTIONS,
    MAX_INT,
    MAX_ROUNDS,
    MAX_SEED,
    ConfigError,
    load_config,
    parse_config,
)
from fedsec.data import DATASETS, load_dataset

# Every float and int field of the schema, found from the dataclasses, so a field
# added later is covered without editing this list.
FLOAT_FIELDS = [
    (section, key)
    for section, cls in _SECTIONS.items()
    for key, kind in get_type_hints(cls).items()
    if kind is float
]
INT_FIELDS = [
    (section, key)
    for section, cls in _SECTIONS.items()
    for key, kind in get_type_hints(cls).items()
    if kind is int
]


def _error(raw: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _validate(tmp_path: Path, text: str) -> tuple[int, str]:
    """``fedsec validate`` on ``text``: exit code and stderr."""
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    return result.exit_code, result.stderr


def _assert_one_line_exit_2(code: int, stderr: str, *fragments: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- non-finite floats --------------------------------------------------------


def test_every_float_field_is_found() -> None:
    assert ("client", "lr") in FLOAT_FIELDS and ("data", "alpha") in FLOAT_FIELDS
    assert len(FLOAT_FIELDS) >= 20


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize(("section", "key"), FLOAT_FIELDS)
def test_every_float_field_refuses_non_finite(section: str, key: str, value: float) -> None:
    message = _error({section: {key: value}})
    assert message.startswith(f"{section}.{key}: must be a finite number")


def test_float_field_refuses_an_integer_beyond_the_float_range() -> None:
    assert _error({"client": {"lr": 10**400}}).startswith("client.lr: must be a finite number")


@pytest.mark.parametrize("section", ["aggregation", "attack"])
def test_params_refuse_non_finite(section: str) -> None:
    message = _error({section: {"params": {"beta": float("inf")}}})
    assert message.startswith(f"{section}.params.beta: must be a finite number")


@pytest.mark.parametrize(
    ("field", "literal"),
    [
        ("client.lr", "inf"),
        ("server.lr", "+inf"),
        ("server.round_timeout", "inf"),
        ("privacy.update_clip", "inf"),
        ("data.alpha", "inf"),
        ("client.lr", "nan"),
    ],
)
def test_validate_refuses_toml_inf_and_nan(tmp_path: Path, field: str, literal: str) -> None:
    section, key = field.split(".")
    code, stderr = _validate(tmp_path, f"[{section}]\n{key} = {literal}\n")
    _assert_one_line_exit_2(code, stderr, field, "finite")


def test_finite_floats_above_what_waits_and_samplers_take_are_refused() -> None:
    # Finite but overflowing time_t in the engine's waits, and numpy's Dirichlet.
    assert _error({"server": {"round_timeout": 1e300}}).startswith("server.round_timeout:")
    assert _error({"secagg": {"stage_timeout": 1e12}}).startswith("secagg.stage_timeout:")
    assert _error({"data": {"partition": "dirichlet", "alpha": 1e308}}).startswith("data.alpha:")


# ---- integer limits -----------------------------------------------------------


@pytest.mark.parametrize(("section", "key"), INT_FIELDS)
def test_every_int_field_refuses_int64_max(section: str, key: str) -> None:
    message = _error({section: {key: 2**63 - 1}})
    assert message.startswith(f"{section}.{key}: must be at most 2**31 in magnitude")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"client": {"batch_size": 2**63 - 1}}, "client.batch_size: must be at most 2**31"),
        ({"experiment": {"seed": 2**63 - 1}}, "experiment.seed: must be at most 2**31"),
        ({"experiment": {"seed": MAX_SEED + 1}}, f"experiment.seed: must be <= {MAX_SEED}"),
        ({"experiment": {"rounds": MAX_ROUNDS + 1}}, f"experiment.rounds: must be <= {MAX_ROUNDS}"),
        ({"client": {"batch_size": 1_438}}, "client.batch_size: must be <= 1437"),
        ({"client": {"max_batch": MAX_INT}}, "client.max_batch: must be <= 1437"),
    ],
)
def test_integer_limits(raw: dict[str, object], expected: str) -> None:
    assert _error(raw).startswith(expected)


def test_validate_refuses_int64_seed_and_batch(tmp_path: Path) -> None:
    code, stderr = _validate(tmp_path, "[experiment]\nseed = 9223372036854775807\n")
    _assert_one_line_exit_2(code, stderr, "experiment.seed")
    code, stderr = _validate(tmp_path, "[client]\nbatch_size = 9223372036854775807\n")
    _assert_one_line_exit_2(code, stderr, "client.batch_size")


def test_largest_accepted_seed_and_rounds_work_where_seeds_are_derived() -> None:
    """The limits are the ones the code needs: every derived seed stays valid at them."""
    assert DATASETS.get("digits").num_train == 1_437  # the batch limit used above
    cfg = parse_config(
        {"experiment": {"seed": MAX_SEED, "rounds": MAX_ROUNDS}, "client": {"batch_size": 1_437}}
    )
    # fedsec.client.app: a client's seed from (experiment seed, round, partition), then
    # round_generator's; the partition is below data.num_clients <= MAX_INT.
    client_seed = cfg.experiment.seed * 1_000_003 + MAX_ROUNDS * 10_007 + MAX_INT
    for salt in range(5):
        round_generator(client_seed, MAX_ROUNDS, salt=salt)  # torch: below 2**64
    # The digits split takes the seed as scikit-learn's random_state (below 2**32).
    assert len(load_dataset("digits", seed=MAX_SEED).train_y) == 1_437


# ---- TOML that is empty or nested too deeply -------------------------------------


DEEP_ARRAY = "[experiment]\nname = " + "[" * 5_000 + "]" * 5_000 + "\n"
DEEP_TABLE = "[aggregation]\nparams = " + "{a = " * 5_000 + "1" + "}" * 5_000 + "\n"


@pytest.mark.parametrize("text", [DEEP_ARRAY, DEEP_TABLE], ids=["array", "inline-table"])
def test_deep_toml_is_one_line(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
    _assert_one_line_exit_2(*_validate(tmp_path, text), "invalid TOML", "nested too deeply")


def test_deep_grid_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text("[grid]\nname = " + "[" * 5_000 + "]" * 5_000 + "\n", encoding="utf-8")
    with pytest.raises(GridError, match="nested too deeply"):
        load_grid(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match="empty config"):
        load_config(path)
    _assert_one_line_exit_2(*_validate(tmp_path, text), "empty config")


def test_an_empty_mapping_is_still_the_default() -> None:
    # Only a file that sets nothing is suspicious; the API's {} means "all defaults".
    assert parse_config({}) == parse_config({"experiment": {}})


# ---- validate checks the data set as run does ---------------------------------------


def test_validate_refuses_a_missing_data_set(tmp_path: Path) -> None:
    text = "[data]\ndataset = 'mnist'\ndata_dir = 'nowhere'\n[model]\nname = 'cnn28'\n"
    _assert_one_line_exit_2(*_validate(tmp_path, text), "mnist", "train-images-idx3-ubyte")


def test_validate_accepts_the_bundled_digits(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("[experiment]\nname = 'ok'\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["validate", str(path)])
    assert result.exit_code == 0 and result.stdout.startswith("ok:"), result.output
