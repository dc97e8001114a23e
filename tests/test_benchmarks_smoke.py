"""The benchmark runner runs every scenario end to end (run.py --quick).

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
SCENARIOS = {
    "s1",
    "s2",
    "s3",
    "s4",
    "s5",
    "s6",
    "live_copy",
    "wal_writer_latency",
    "disk_gentle",
    "journal_stall",
    "wal_growth",
    "cli_vs_shell",
}


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
    s6 = scenarios["s6"]
    for mode in ("journal", "wal"):
        assert {"none", "apsw_backup"} <= set(scenarios["s4"]["modes"][mode])
        for contender in ("apsw_backup", "stdlib"):
            assert contender in s6["modes"][mode], s6["errors"]
            assert scenarios["s6"]["modes"][mode][contender]["runs"] == 1
    assert scenarios["s5"]["errors"] == {}
    for key in SCENARIOS - {"s1", "s2", "s3", "s4", "s5", "s6"}:
        assert scenarios[key]["errors"] == {}, key
    for mode in ("journal", "wal"):
        cases = scenarios["live_copy"]["modes"][mode]
        assert cases["copy pages=-1"]["runs"] == 1
        assert cases["acopy pages=100"]["runs"] == 1
    latency = scenarios["wal_writer_latency"]["cases"]
    assert latency["none"]["commits"] > 0
    assert latency["copy() defaults"]["copy_median_s"] > 0
    assert scenarios["disk_gentle"]["cases"]["cp + fsync"]["commits"] >= 0
    assert (
        scenarios["journal_stall"]["cases"]["copy() defaults (pages=-1)"]["runs"] == 1
    )
    assert scenarios["cli_vs_shell"]["checks"]["integrity_check"]["median"] > 0
    assert "Targets" in proc.stdout


VERIFY_SPEED = RUN.with_name("verify_speed.py")


@pytest.mark.heavy
@pytest.mark.skipif(not VERIFY_SPEED.exists(), reason="benchmarks/ is not in this tree")
def test_verify_speed_benchmark_reports_every_target(tmp_path):
    out = tmp_path / "verify_speed.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(VERIFY_SPEED),
            "--mb",
            "4",
            "--rounds",
            "1",
            "--checks",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    targets = {v["target"].split(" (")[0] for v in report["verdicts"]}
    assert "copy+shim / copy" in targets and "page hash GB/s, one core" in targets
    assert any(t.startswith("integrity_check / full check") for t in targets)
    assert report["times"]["copy+shim+verify"]


ROLLBACK_SHIM = RUN.with_name("rollback_shim.py")


@pytest.mark.heavy
@pytest.mark.skipif(
    not ROLLBACK_SHIM.exists(), reason="benchmarks/ is not in this tree"
)
def test_rollback_shim_benchmark_reports_both_pairs(tmp_path):
    out = tmp_path / "rollback_shim.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROLLBACK_SHIM),
            "--mb",
            "2",
            "--rounds",
            "1",
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for name in ("backup, no fsync", "copy(), unverified"):
        assert report[name]["shim_s"] > 0 and report[name]["cpu_ratio"] > 0
