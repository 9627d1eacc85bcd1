"""``fedsec certs`` refuses node counts and validity periods that make no deployment (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedsec.cli import cli
from fedsec.deploy.certs import MAX_DAYS, MAX_NODES, write_deployment_keys


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--nodes", 0, "nodes must be in [1, "),
        ("--nodes", -1, "nodes must be in [1, "),
        ("--nodes", MAX_NODES + 1, f"nodes must be in [1, {MAX_NODES}]"),
        ("--nodes", 10**12, "nodes must be in [1, "),
        ("--days", 0, "days must be in [1, "),
        ("--days", 10**9, f"days must be in [1, {MAX_DAYS}]"),
    ],
)
def test_bad_counts_are_one_line_exit_2_and_write_nothing(
    tmp_path: Path, option: str, value: int, fragment: str
) -> None:
    out = tmp_path / "keys"
    result = CliRunner().invoke(cli, ["certs", str(out), option, str(value)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]
    assert not out.exists()  # refused before the folder or any key is made


def test_zero_nodes_is_refused_by_the_function_too(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nodes must be in"):
        write_deployment_keys(tmp_path, nodes=0)
    assert not any(tmp_path.iterdir())
