"""One module names what travels on the wire (issue 18, item 6).

:mod:`fedsec.wire` names the record keys, SecAgg+ stages, reply tags, node-config
and ``context.state`` keys and error codes that fedsec's server and clients must
agree on. These tests check that the names are distinct where they must be,
that each is documented, that the module stays light (a SuperNode imports it
for every message), that the server side takes them from ``fedsec.wire`` and
not from ``fedsec.client``, and that no other module defines one again.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import fedsec.wire as wire

ROOT = Path(__file__).resolve().parents[1]
WIRE = ROOT / "fedsec" / "wire.py"

#: Names ``strategies/`` may still import from ``fedsec.client``: the harness runs
#: fedsec's own ClientApp in simulations, and the verifier shares the signer's digest.
#: None of them is a wire name; a new entry needs a reason here.
SERVER_USES_OF_CLIENT = {
    ("fedsec.client.app", "app"),  # audit and bench run fedsec's ClientApp
    ("fedsec.client.app", "client_partition"),  # the audit attacks a client's data
    ("fedsec.client.app", "local_train"),  # the ServerApp's in-process training
    ("fedsec.client.privacy", "simulation_ledger_config"),  # simulation's ledger folder
    ("fedsec.client.signing_mod", "content_digest"),  # what is signed is what is verified
}


def _constants(namespace: Mapping[str, object]) -> dict[str, str | int]:
    """The public wire constants of ``namespace``: upper-case names bound to a str or int."""
    return {
        name: value
        for name, value in namespace.items()
        if name.isupper() and not name.startswith("_") and isinstance(value, str | int)
    }


def _undocumented_duplicates(
    constants: Mapping[str, str | int], same_thing: Mapping[frozenset[str], str]
) -> list[frozenset[str]]:
    """Groups of names sharing a value that :data:`fedsec.wire.SAME_THING` does not explain."""
    by_value: dict[tuple[type, str | int], set[str]] = defaultdict(set)
    for name, value in constants.items():
        by_value[(type(value), value)].add(name)
    return [
        frozenset(names)
        for names in by_value.values()
        if len(names) > 1 and frozenset(names) not in same_thing
    ]


def test_wire_names_are_distinct_unless_documented_as_the_same_thing() -> None:
    assert _undocumented_duplicates(_constants(vars(wire)), wire.SAME_THING) == []


def test_the_uniqueness_check_catches_a_shared_value() -> None:
    # Two records under one key would overwrite each other in a RecordDict.
    clash = {**_constants(vars(wire)), "OTHER_RECORD_KEY": wire.SIGNATURE_KEY}
    assert _undocumented_duplicates(clash, wire.SAME_THING) == [
        frozenset({"SIGNATURE_KEY", "OTHER_RECORD_KEY"})
    ]


def test_same_thing_lists_only_names_that_do_share_a_value() -> None:
    constants = _constants(vars(wire))
    for names, why in wire.SAME_THING.items():
        assert why and len(names) == 2 and names <= constants.keys(), names
        assert len({constants[n] for n in names}) == 1, names


def test_error_codes_are_distinct_and_free_in_flower() -> None:
    from flwr.common.constant import ErrorCode

    codes = {n: v for n, v in _constants(vars(wire)).items() if isinstance(v, int)}
    flower = {v for n, v in vars(ErrorCode).items() if n.isupper() and isinstance(v, int)}
    assert len(set(codes.values())) == len(codes), codes
    assert not set(codes.values()) & flower, codes


def test_every_name_is_exported_and_documented() -> None:
    tree = ast.parse(WIRE.read_text(encoding="utf-8"))
    lines = WIRE.read_text(encoding="utf-8").splitlines()
    assigned = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id.isupper():
                assigned.append(target.id)
                # A `#:` comment right above: who writes the name and who reads it.
                assert lines[node.lineno - 2].startswith("#:"), target.id
    assert sorted(assigned) == sorted(wire.__all__)


def test_wire_imports_nothing() -> None:
    tree = ast.parse(WIRE.read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert [getattr(n, "module", None) for n in imports] == ["__future__"]
    probe = (
        "import sys, json, fedsec.wire\n"
        "print(json.dumps([m for m in ('flwr', 'torch', 'numpy') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_secagg_messages_use_the_wire_stage_names() -> None:
    from fedsec.secagg import messages

    assert messages.STAGES == wire.SECAGG_STAGES
    assert messages.STAGE_KEY == wire.STAGE_KEY
    request_stages = {
        vars(cls)["stage"]
        for cls in vars(messages).values()
        if isinstance(cls, type) and "stage" in vars(cls)
    } - {""}
    assert request_stages == set(wire.SECAGG_STAGES)
    assert wire.IDENTIFY_STAGE not in wire.SECAGG_STAGES


def test_old_import_paths_still_name_the_same_strings() -> None:
    from fedsec.attacks import threat
    from fedsec.client import app as client_app
    from fedsec.client import collusion, mods, privacy, secagg_mod, signing_mod
    from fedsec.strategies import strategy

    for module, name in [
        (secagg_mod, "SECAGG_KEY"),
        (secagg_mod, "SECAGG_NEXT_KEY"),
        (secagg_mod, "MASKED_KEY"),
        (secagg_mod, "IDENTIFY_STAGE"),
        (secagg_mod, "SECAGG_REQUIRED_KEY"),
        (secagg_mod, "SECAGG_REFUSED"),
        (collusion, "ADVERSARY_KEY"),
        (collusion, "NUM_EXAMPLES_ARRAY"),
        (collusion, "MASKED_INPUT_STAGE"),
        (collusion, "COLLUSION_REFUSED"),
        (signing_mod, "SIGNATURE_KEY"),
        (signing_mod, "SIGNING_REFUSED"),
        (mods, "LOCAL_DP_REFUSED"),
        (mods, "LOCAL_DP_STATE_KEY"),
        (privacy, "LEDGER_KEY"),
        (privacy, "STATE_DIR_KEY"),
        (privacy, "EPSILON_CAP_KEY"),
        (privacy, "DELTA_CAP_KEY"),
        (privacy, "LEDGER_DIR_KEY"),
        (privacy, "PRIVACY_BUDGET_EXHAUSTED"),
        (privacy, "PRIVACY_LEDGER_UNUSABLE"),
        (client_app, "USER_MODULES_KEY"),
        (threat, "MALICIOUS_TAG"),
        (threat, "TRUTH_TAG"),
        (strategy, "ARRAYS_KEY"),
        (strategy, "NUM_EXAMPLES_KEY"),
    ]:
        assert getattr(module, name) == getattr(wire, name), (module.__name__, name)
    assert getattr(strategy, "PARTITION_KEY") == wire.PARTITION_ID_KEY  # noqa: B009


# --- the code base: who imports and who defines the wire names ---


def _sources(root: Path, folders: tuple[str, ...]) -> Iterator[Path]:
    """Python files under ``folders`` of ``root`` (``fedsec/strategies`` is a link: skipped)."""
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            if root / "fedsec" / "strategies" not in path.parents:
                yield path


def _absolute(module: str | None, level: int, path: Path, root: Path) -> str:
    """The dotted module an ``ImportFrom`` in ``path`` names (relative imports resolved)."""
    if level == 0:
        return module or ""
    package = path.relative_to(root).parent.parts
    if package[:1] == ("strategies",):  # imported as fedsec.strategies
        package = ("fedsec", *package)
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, *([module] if module else [])])


def server_wire_imports(root: Path) -> list[str]:
    """Imports in ``strategies/`` of a wire name from anywhere but :mod:`fedsec.wire`,
    and imports from ``fedsec.client`` outside :data:`SERVER_USES_OF_CLIENT`."""
    found = []
    for path in _sources(root, ("strategies",)):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            module = _absolute(node.module, node.level, path, root)
            for alias in node.names:
                where = f"{path.relative_to(root)}:{node.lineno}: from {module} import {alias.name}"
                wire_name_elsewhere = alias.name in wire.__all__ and module != "fedsec.wire"
                client_use = module.startswith("fedsec.client")
                if wire_name_elsewhere or (
                    client_use and (module, alias.name) not in SERVER_USES_OF_CLIENT
                ):
                    found.append(where)
    return found


def _literal_strings(node: ast.expr | None) -> list[str]:
    """String constants of ``node``: a string, or one inside a tuple, list or set display."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return [s for elt in node.elts for s in _literal_strings(elt)]
    return []


def redefined_wire_strings(root: Path) -> list[str]:
    """``NAME = "<a wire string>"`` (module or class level) outside ``fedsec/wire.py``."""
    values = {v for v in _constants(vars(wire)).values() if isinstance(v, str)}
    found = []
    for path in _sources(root, ("fedsec", "strategies")):
        if path == root / "fedsec" / "wire.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        for body in bodies:
            for node in body:
                value: ast.expr | None
                if isinstance(node, ast.Assign):
                    targets, value = node.targets, node.value
                elif isinstance(node, ast.AnnAssign):
                    targets, value = [node.target], node.value
                else:
                    continue
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                hits = [s for s in _literal_strings(value) if s in values]
                if hits and any(n.isupper() or n == "stage" for n in names):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {names[0]} = {hits}")
    return found


def test_the_server_side_takes_wire_names_from_fedsec_wire() -> None:
    assert server_wire_imports(ROOT) == []


def test_no_module_defines_a_wire_string_again() -> None:
    assert redefined_wire_strings(ROOT) == []


@pytest.mark.parametrize("check", [server_wire_imports, redefined_wire_strings])
def test_the_code_base_checks_catch_a_violation(tmp_path: Path, check: object) -> None:
    # A server module taking a key from the client package, and a client module
    # spelling the key out again: each check must flag its own case.
    (tmp_path / "strategies").mkdir()
    (tmp_path / "fedsec" / "client").mkdir(parents=True)
    (tmp_path / "strategies" / "bad.py").write_text(
        "from fedsec.client.secagg_mod import SECAGG_KEY\nfrom .strategy import ARRAYS_KEY\n"
    )
    (tmp_path / "fedsec" / "client" / "bad.py").write_text(
        'SECAGG_KEY = "fedsec-secagg"\nPUBLIC = ("dp_epsilon_max",)\n'
    )
    assert callable(check)
    found = check(tmp_path)
    assert len(found) == 2, found
