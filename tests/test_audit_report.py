"""`fedsec audit`: the scenarios run, and the report says what the store holds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsec.config import parse_config
from fedsec.strategies.audit import AuditSettings, run_audit


def test_audit_writes_a_report_that_matches_its_numbers(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "experiment": {"name": "tiny", "rounds": 2, "seed": 0},
            "data": {"partition": "iid", "num_clients": 5},
            "client": {"local_epochs": 1},
        }
    )
    settings = AuditSettings(
        images=2, epsilons=(8.0,), secure_clients=5, bucket_size=2, inversion_steps=120
    )
    results = run_audit(cfg, tmp_path, settings)
    stored = json.loads((tmp_path / "audit.json").read_text())
    assert stored == json.loads(json.dumps(results))
    assert (tmp_path / "inversion.png").stat().st_size > 1000
    report = (tmp_path / "report.md").read_text()
    inversion_section = report.split("## Membership inference", 1)[0]

    scenarios = stored["inversion"]["scenarios"]
    assert list(scenarios) == [
        "plain",
        "dp-sgd eps=8",
        "secure sum k=5",
        "bucket s=2",
        "secure sum k=5, whole partitions",
    ]
    for name, values in scenarios.items():
        row = re.search(rf"\| {re.escape(name)} \| ([\d.]+) \| ([-\d.]+) \|", inversion_section)
        assert row is not None, name
        assert float(row.group(1)) == pytest.approx(values["mean_psnr"], abs=0.05)
        assert float(row.group(2)) == pytest.approx(values["mean_ssim"], abs=0.0005)

    # Unprotected one-example updates give the image away; DP-SGD at eps = 8 and a
    # secure sum of whole-partition updates stay within 1 dB of the random guess.
    def above_guess(name: str) -> float:
        values = scenarios[name]
        return float(values["mean_psnr"] - values["mean_random_guess_psnr"])

    assert above_guess("plain") > 10
    assert above_guess("dp-sgd eps=8") < 1
    assert above_guess("secure sum k=5, whole partitions") < 1

    membership = stored["membership"]
    assert list(membership) == ["plain", "dp-sgd eps=8"]
    section = report.split("## Membership inference", 1)[1]
    for name, values in membership.items():
        row = re.search(rf"\| {re.escape(name)} \| ([\d.]+) \| ([\d.]+) \|", section)
        assert row is not None, name
        assert float(row.group(2)) == pytest.approx(values["loss_auc"], abs=0.0005)
        assert 0.0 <= values["loss_auc"] <= 1.0 and values["num_members"] > 100


def test_audit_refuses_settings_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="bucket_size must be >= 2"):
        AuditSettings(bucket_size=1)
    with pytest.raises(ValueError, match="epsilons"):
        AuditSettings(epsilons=(0.0,))
    cfg = parse_config({"data": {"num_clients": 3}})
    with pytest.raises(ValueError, match="at least 5 clients"):
        run_audit(cfg, Path("/nonexistent-never-written"), AuditSettings())


def test_audit_cli_bad_input_is_one_line_with_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedsec.cli", "audit", "--bucket-size", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "bucket_size must be >= 2" in lines[0]
