"""Every code example in README.md runs, as the README shows it."""

import os
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
    assert "quick_check ok" in result.stdout
    assert "the files are kept in apsw-backup-demo-" in result.stderr


def test_test_command_is_the_one_ci_runs():
    test_command = blocks("sh")[1].strip()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci


def make_app_db(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(x)")
    db.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 2000)
    db.commit()
    db.close()


def shown_exit_code(shown):
    """The exit code the README's output implies."""
    if '"exit_code": ' in shown:
        return int(shown.split('"exit_code": ')[1].split(",")[0])
    return 2 if "not empty" in shown or "Choose another DEST" in shown else 0


def test_command_line_session_behaves_as_shown(tmp_path):
    make_app_db(tmp_path / "app.db")
    session = blocks("text")[0].splitlines()
    commands = [i for i, line in enumerate(session) if line.startswith("$ ")]
    assert len(commands) >= 3
    for n, i in enumerate(commands):
        line = session[i][2:]
        if line.startswith("mkdir backups && "):
            (tmp_path / "backups").mkdir()
            line = line.removeprefix("mkdir backups && ")
        args = line.split()
        assert args[0] == "apsw-backup"
        if args[1] == "verify":  # the backup the session made just before
            args[2:] = [f"backups/{name}" for name in os.listdir(tmp_path / "backups")]
        result = run([sys.executable, "-m", "apsw_backup", *args[1:]], tmp_path)
        end = commands[n + 1] if n + 1 < len(commands) else len(session)
        shown = "\n".join(session[i + 1 : end])
        out = (result.stderr + result.stdout).strip()
        # The same kind of answer, line by line: the words before the first
        # figure (timestamps and timings differ from run to run).
        for want, got in zip(shown.splitlines(), out.splitlines(), strict=True):
            prefix = re.split(r"\d", want, maxsplit=1)[0]
            assert got.startswith(prefix), (want, got)
        assert result.returncode == shown_exit_code(shown), out


def test_cron_example_runs_and_keeps_the_newest(tmp_path):
    (line,) = blocks("cron")[0].strip().splitlines()
    schedule, command = line[:10], line[10:].strip()
    assert schedule.split() == ["15", "3", "*", "*", "*"]
    args = command.removesuffix(">/dev/null").split()
    assert args[0] == "apsw-backup"
    source, folder = args[-2], args[-1]
    assert folder.endswith("/") and source.endswith(".db")
    make_app_db(tmp_path / "app.db")
    (tmp_path / "backups").mkdir()
    args[-2:] = [str(tmp_path / "app.db"), f"{tmp_path / 'backups'}/"]
    keep = int(args[args.index("--keep") + 1])
    for _ in range(keep + 2):
        result = run([sys.executable, "-m", "apsw_backup", *args[1:]], tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""  # cron mails stderr: nothing on success
    assert len(os.listdir(tmp_path / "backups")) == keep
