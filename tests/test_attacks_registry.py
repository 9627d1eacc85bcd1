"""The model-poisoning package registers its attacks by module: one file per attack."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
import textwrap
from pathlib import Path

import pytest

import fedsec.attacks.model_poisoning as mp
from fedsec.attacks.base import ModelPoisoningAttack
from fedsec.attacks.model_poisoning import MODEL_ATTACKS


def _attack_modules() -> list[str]:
    """The package's modules other than the shared ``base``."""
    return [i.name for i in pkgutil.iter_modules(mp.__path__) if i.name != "base"]


def test_every_module_of_the_package_registers_its_attacks() -> None:
    modules = _attack_modules()
    assert len(modules) >= 8
    registered_modules = {MODEL_ATTACKS.get(n).__module__ for n in MODEL_ATTACKS}
    for name in modules:
        module = importlib.import_module(f"{mp.__name__}.{name}")
        attacks = [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, ModelPoisoningAttack)
            and cls.__module__ == module.__name__
            and not cls.__name__.startswith("_")
        ]
        # Each module holds at least one attack, and every attack it defines is registered.
        assert attacks, f"{name} defines no attack"
        for cls in attacks:
            assert MODEL_ATTACKS.get(cls.name) is cls
        assert module.__name__ in registered_modules
    # Conversely every registered attack comes from a module of the package.
    assert registered_modules == {f"{mp.__name__}.{name}" for name in modules}


def test_a_new_attack_file_registers_by_import_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "fedsec-test-zero"
    module_name = "zero_attack_for_test"
    (tmp_path / f"{module_name}.py").write_text(
        textwrap.dedent(
            f'''
            """A test attack in a new file: it sends zeros."""

            import torch

            from fedsec.attacks.base import AdversaryView, ModelPoisoningAttack
            from fedsec.attacks.model_poisoning.base import register


            @register
            class Zero(ModelPoisoningAttack):
                name = "{name}"

                def craft(self, view: AdversaryView) -> torch.Tensor:
                    return torch.zeros_like(view.own)
            '''
        )
    )
    # The new file lies on the package's search path, as a file dropped into the
    # package folder would; nothing else is edited.
    monkeypatch.setattr(mp, "__path__", [*mp.__path__, str(tmp_path)])
    full = f"{mp.__name__}.{module_name}"
    assert name not in MODEL_ATTACKS
    try:
        assert module_name in mp.discover()
        cls = MODEL_ATTACKS.get(name)
        assert cls.__module__ == full and issubclass(cls, ModelPoisoningAttack)
        assert MODEL_ATTACKS.names()[-1] == name  # appended after the built-in ones
        # Resolvable by config name like a built-in attack.
        from fedsec.attacks.threat import build_attack

        assert type(build_attack(name, {}, omniscient=False)) is cls
    finally:
        MODEL_ATTACKS._entries.pop(name, None)
        sys.modules.pop(full, None)


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="model-poisoning attack 'alie' is already registered"):

        @mp.register
        class Again(ModelPoisoningAttack):
            name = "alie"
