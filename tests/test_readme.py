"""Every code example in README.md runs, as the README shows it."""

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
TIMEOUT = 60


def blocks(language):
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def run(args, cwd):
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_example_runs(index, tmp_path):
    result = run([sys.executable, "-c", blocks("python")[index]], tmp_path)
    assert result.returncode == 0, result.stderr


def test_there_are_python_examples():
    assert len(blocks("python")) >= 3


def test_first_setup_command_runs_the_demo(tmp_path):
    install_and_run = blocks("sh")[0].strip()
    assert install_and_run.endswith("apsw-backup --demo")
    result = run([sys.executable, "-m", "apsw_backup", "--demo"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "integrity_check ok" in result.stdout


def test_test_command_is_the_one_ci_runs():
    test_command = blocks("sh")[1].strip()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci


def test_command_line_session_behaves_as_shown(tmp_path):
    db = sqlite3.connect(tmp_path / "app.db")
    db.execute("CREATE TABLE t(x)")
    db.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 2000)
    db.commit()
    db.close()
    session = blocks("text")[0].splitlines()
    commands = [i for i, line in enumerate(session) if line.startswith("$ ")]
    assert len(commands) == 3
    for i in commands:
        args = session[i][2:].split()
        assert args[0] == "apsw-backup"
        result = run([sys.executable, "-m", "apsw_backup", *args[1:]], tmp_path)
        shown = session[i + 1]
        out = (result.stdout + result.stderr).strip()
        # The same kind of answer: the words before the first figure.
        prefix = re.split(r"\d", shown, maxsplit=1)[0]
        assert out.startswith(prefix), (shown, out)
        assert result.returncode == (2 if "not empty" in shown else 0), out
