"""The benchmark script runs end to end (benchmarks/run.py --quick).

It checks that every scenario produces results, not how fast anything is:
timing targets are judged by a full run on a quiet machine (see
benchmarks/README.md).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
SCENARIOS = {"s1", "s2", "s3", "s4", "s5", "s6"}


@pytest.mark.heavy
@pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not in this tree")
def test_quick_benchmark_reports_every_scenario(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--quick",
            "--rounds",
            "1",
            "--no-chart",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    scenarios = results["scenarios"]
    assert set(scenarios) == SCENARIOS
    for key in ("s1", "s2", "s3"):
        assert scenarios[key]["errors"] == {}
        assert {"apsw_backup", "stdlib"} <= set(scenarios[key]["contenders"])
    for mode in ("journal", "wal"):
        assert {"none", "apsw_backup"} <= set(scenarios["s4"]["modes"][mode])
        for contender in ("apsw_backup", "stdlib"):
            assert scenarios["s6"]["modes"][mode][contender]["runs"] == 1
    assert scenarios["s5"]["errors"] == {}
    assert "Targets" in proc.stdout
