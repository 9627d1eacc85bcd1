"""Privacy modes as registered objects (issue 18, item 6).

Every ``privacy.mode`` is a :class:`~fedsec.privacy.modes.PrivacyMode` in
:data:`~fedsec.privacy.modes.PRIVACY_MODES`; the call sites ask it instead of
comparing names, so a new mode is one module plus its test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import fedsec.privacy.modes as modes
from fedsec.assembly import build_aggregator, secure_norm_bound
from fedsec.config import ConfigError, parse_config
from fedsec.privacy.modes import (
    PRIVACY_MODES,
    PrivacyMode,
    discover,
    ledger_mode_names,
    mode_of,
    register,
)

ROOT = Path(__file__).resolve().parents[1]

#: A small valid config per built-in mode (10 clients, all sampled).
SETTINGS: dict[str, dict[str, Any]] = {
    "none": {},
    "dp-sgd": {"privacy": {"mode": "dp-sgd", "noise_multiplier": 1.0}},
    "local": {"privacy": {"mode": "local", "noise_multiplier": 1.0}},
    "central": {"privacy": {"mode": "central", "noise_multiplier": 1.0}},
    "distributed": {
        "privacy": {"mode": "distributed", "noise_multiplier": 1.0, "update_clip": 0.5},
        "secagg": {"enabled": True, "weight_cap": 0},
    },
}


def test_the_built_in_modes_are_registered_in_the_documented_order() -> None:
    assert PRIVACY_MODES.names()[:5] == ["none", "dp-sgd", "local", "central", "distributed"]
    assert set(SETTINGS) <= set(PRIVACY_MODES.names())


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_mode_validates_and_assembles(name: str) -> None:
    cfg = parse_config(SETTINGS[name])
    mode = mode_of(cfg)
    assert isinstance(mode, PrivacyMode) and mode.name == name == cfg.privacy.mode
    assert mode.runs_on in ("nowhere", "client", "server", "secure-sum")
    rule = build_aggregator(cfg)
    rate, steps = mode.client_round(cfg, 100)
    assert 0 < rate <= 1 and steps >= 1
    metrics = mode.round_metrics(cfg, 3)
    assert (metrics == {}) == (mode.runs_on == "nowhere")
    # What each mode means, as the call sites used to spell it out by name.
    assert mode.keeps_ledger == (name in ("dp-sgd", "local"))
    assert mode.private_training == (name == "dp-sgd")
    assert mode.noises_update == (name == "local")
    assert (type(rule).__name__ == "CentralDPFedAvg") == (name == "central")
    assert ("dp_epsilon" in metrics) == (name == "central")
    if name == "distributed":
        assert metrics["dp_accountant"] == "skellam-rdp"
        assert mode.secure_noise_multiplier(cfg) == 1.0
        assert secure_norm_bound(cfg) == 0.5
    else:
        assert mode.secure_noise_multiplier(cfg) == 0.0
        assert secure_norm_bound(cfg) == cfg.secagg.norm_bound


def test_dp_sgd_costs_poisson_steps_local_one_mechanism() -> None:
    dpsgd = mode_of(parse_config(SETTINGS["dp-sgd"]))
    local = mode_of(parse_config(SETTINGS["local"]))
    cfg = parse_config(SETTINGS["dp-sgd"])
    rate, steps = dpsgd.client_round(cfg, 320)
    assert rate == pytest.approx(32 / 320)  # client.batch_size = 32
    assert steps == 2 * 10  # 2 local epochs of 1 / q expected steps
    assert local.client_round(cfg, 320) == (1.0, 1)


def test_ledger_modes_are_asked_from_the_registry() -> None:
    assert ledger_mode_names() == ["dp-sgd", "local"]


def test_an_unknown_mode_is_one_line_listing_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"privacy": {"mode": "dpsgd"}})
    assert str(err.value) == (
        "privacy.mode: unknown privacy mode 'dpsgd'; valid choices: "
        + ", ".join(PRIVACY_MODES.names())
    )


def test_mode_checks_keep_their_messages() -> None:
    with pytest.raises(ConfigError, match=r"^privacy.mode: distributed DP adds its noise inside"):
        parse_config({"privacy": {"mode": "distributed", "noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match=r"^secagg.norm_bound: distributed DP bounds updates"):
        parse_config(
            {
                "privacy": {"mode": "distributed", "noise_multiplier": 1.0},
                "secagg": {"enabled": True, "weight_cap": 0, "norm_bound": 1.0},
            }
        )
    with pytest.raises(ConfigError, match=r"^client.precision: fp16 cannot be used with DP-SGD"):
        parse_config({**SETTINGS["dp-sgd"], "client": {"precision": "fp16"}})
    with pytest.raises(ConfigError, match=r"^evasion.adversarial_training: is not supported"):
        parse_config({**SETTINGS["dp-sgd"], "evasion": {"adversarial_training": True}})
    with pytest.raises(ConfigError, match=r"^privacy.mode: central DP adds noise on the server"):
        parse_config({**SETTINGS["central"], "secagg": {"enabled": True}})


def test_a_mode_needs_a_name() -> None:
    class Nameless(PrivacyMode):
        pass

    with pytest.raises(ValueError, match="needs a name"):
        register(Nameless)


NEW_MODE = '''
"""A test mode: local DP that refuses noise below 2 (adding a mode is this one file)."""

from typing import ClassVar

from fedsec.config import ConfigError
from fedsec.privacy.modes.local import LocalDP
from fedsec.privacy.modes.base import register


@register
class StrongLocal(LocalDP):
    name: ClassVar[str] = "{name}"

    def check(self, cfg):
        super().check(cfg)
        if cfg.privacy.noise_multiplier < 2:
            raise ConfigError("privacy.noise_multiplier", "{name} needs at least 2")
'''


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modes registered by a test disappear afterwards."""
    monkeypatch.setattr(PRIVACY_MODES, "_entries", dict(PRIVACY_MODES._entries))


@pytest.mark.usefixtures("scratch_registry")
def test_a_new_module_in_the_package_registers_by_import_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "strong-local-pkg"
    (tmp_path / "strong_local_pkg.py").write_text(NEW_MODE.format(name=name), encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown privacy mode"):
        parse_config({"privacy": {"mode": name, "noise_multiplier": 3.0}})
    # The package's folder gains a file: discover() (run when the package is imported) finds it.
    monkeypatch.setattr(modes, "__path__", [*modes.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "fedsec.privacy.modes.strong_local_pkg", raising=False)
    try:
        assert "strong_local_pkg" in discover()
        cfg = parse_config({"privacy": {"mode": name, "noise_multiplier": 3.0}})
        mode = mode_of(cfg)
        assert mode.name == name and mode.keeps_ledger and mode.noises_update
        assert name in ledger_mode_names()
        with pytest.raises(
            ConfigError, match=f"^privacy.noise_multiplier: {name} needs at least 2"
        ):
            parse_config({"privacy": {"mode": name, "noise_multiplier": 1.0}})
    finally:
        sys.modules.pop("fedsec.privacy.modes.strong_local_pkg", None)


@pytest.mark.usefixtures("scratch_registry")
def test_a_users_module_registers_by_import_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "strong-local-user"
    (tmp_path / "my_strong_mode.py").write_text(NEW_MODE.format(name=name), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        __import__("my_strong_mode")
        assert (
            parse_config({"privacy": {"mode": name, "noise_multiplier": 2.0}}).privacy.mode == name
        )
    finally:
        sys.modules.pop("my_strong_mode", None)


#: A comparison of the configured privacy mode with a name, or a hand-kept list of names.
_COMPARISON = re.compile(
    r"""\b(?:privacy|dp)\.mode\s*(?:==|!=|\bin\b|\bnot\s+in\b)"""
    r"""|\bLEDGER_MODES\b|\bPRIVACY_MODES\s*=\s*\("""
    r"""|mode\s*(?:==|!=)\s*["'](?:none|dp-sgd|local|central|distributed)["']"""
)


def test_no_call_site_compares_the_mode_name() -> None:
    package = ROOT / "fedsec" / "privacy" / "modes"
    offenders = []
    for folder in (ROOT / "fedsec", ROOT / "strategies"):
        for path in folder.rglob("*.py"):
            if package in path.parents or path.relative_to(ROOT).parts[:2] == (
                "fedsec",
                "strategies",
            ):
                continue  # the modes themselves; fedsec/strategies links to strategies/
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _COMPARISON.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_pattern_catches_the_old_spellings() -> None:
    for line in (
        'if cfg.privacy.mode == "dp-sgd":',
        "if dp.mode != 'none':",
        "if cfg.privacy.mode not in LEDGER_MODES:",
        'PRIVACY_MODES = ("none", "dp-sgd")',
        'distributed = mode == "distributed"',
    ):
        assert _COMPARISON.search(line), line
    assert not _COMPARISON.search("if mode_of(cfg).keeps_ledger:")


def test_importing_the_schema_and_the_modes_loads_neither_torch_nor_flower() -> None:
    code = textwrap.dedent(
        """
        import sys
        import fedsec.config, fedsec.assembly, fedsec.privacy.modes
        print(sorted(m for m in ("torch", "flwr") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == "[]"
