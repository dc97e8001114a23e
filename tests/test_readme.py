"""Every code example in README.md and docs/*.md runs, as the page shows it.

- ```python blocks run in a fresh folder, each on its own (a block that
  starts with "# heavy example" is marked heavy);
- ```text blocks that are command-line sessions ("$ apsw-backup ...") run,
  and each answer must be of the kind shown, with the exit code it implies;
- ```sh blocks: the README's set-up and test commands, the wheel build,
  the one-SQLite check run; every other line must name a command and files
  that exist here;
- the ```cron line and the systemd units of docs/scheduling.md run.
"""

import configparser
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
TIMEOUT = 60
BACKUP_NAME = re.compile(r"backups/app-\d{8}T\d{6}\.\d+Z\.db")


def pyproject_list(key):
    """The strings of a one-line `key = [...]` in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (value,) = re.findall(rf"^{key} = \[(.*)\]$", text, re.M)
    return re.findall(r'"([^"]*)"', value)


def extras():
    """The names of [project.optional-dependencies] in pyproject.toml."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", section, re.M))


def blocks_in(page, language):
    text = page.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def blocks(language):
    return blocks_in(README, language)


def run(args, cwd, env=None):
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        env=env,
    )


def examples(language, keep=lambda block: True):
    """pytest params: (page, block) for every page's blocks of a language."""
    found = []
    for page in PAGES:
        for index, block in enumerate(blocks_in(page, language)):
            if not keep(block):
                continue
            heavy = block.startswith("# heavy example")
            found.append(
                pytest.param(
                    page,
                    block,
                    id=f"{page.name}-{index}",
                    marks=[pytest.mark.heavy] if heavy else [],
                )
            )
    return found


@pytest.mark.parametrize(("page", "code"), examples("python"))
def test_python_example_runs(page, code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{page.name}:\n{code}\n{result.stderr}"
    # A print whose comment shows its output prints that, in that order
    # (what follows ": " in the comment explains it).
    lines = iter(result.stdout.splitlines())
    for shown in shown_outputs(code):
        assert any(line == shown for line in lines), (page.name, shown, result.stdout)


def shown_outputs(code):
    """The outputs the comments of a block's print() calls show, in order."""
    return [
        found[1].split(": ")[0]
        for line in code.splitlines()
        if (found := re.search(r"\bprint\(.*\)  # (.+)$", line))
    ]


def test_the_examples_show_their_output():
    shown = [s for param in examples("python") for s in shown_outputs(param.values[1])]
    assert len(shown) >= 10
    assert "[('good',)]" in shown and "True 0" in shown


def test_there_are_python_examples():
    assert len(blocks("python")) >= 3
    assert len(examples("python")) >= 10


def test_readme_is_short_and_its_links_lead_somewhere():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= 8 * 1024
    links = re.findall(r"\]\(([^)#]+)(?:#([^)]*))?\)", text)
    assert len(links) >= 8
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        if anchor:  # a heading of that page, as MyST and GitHub slug it
            headings = re.findall(r"^#+ (.*)$", (ROOT / target).read_text(), re.M)
            slugs = {
                re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                for h in headings
            }
            assert anchor in slugs, (target, anchor)


def test_first_setup_command_runs_the_demo(tmp_path):
    install_and_run = blocks("sh")[0].strip()
    assert install_and_run.endswith("apsw-backup --demo")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "temp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "temp")}
    result = run([sys.executable, "-m", "apsw_backup", "--demo"], tmp_path / "cwd", env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\w+_check ok", result.stdout), result.stdout
    # As the README says: under the system's temporary folder, and it says so.
    (folder,) = os.listdir(tmp_path / "temp")
    assert f"the files are kept in {tmp_path / 'temp' / folder}" in result.stderr
    assert os.listdir(tmp_path / "cwd") == []


def test_test_command_is_the_one_ci_runs():
    test_command = blocks("sh")[1].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci


def test_heavy_tests_have_their_own_command_which_ci_runs():
    assert pyproject_list("addopts")[-2:] == ["-m", "not heavy"]
    heavy = (ROOT / ".ci" / "heavy").read_text(encoding="utf-8")
    assert "-m heavy" in heavy
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash .ci/heavy" in ci and "bash .ci/docs" in ci
    assert "bash .ci/heavy" in README.read_text(encoding="utf-8")


def make_app_db(path):
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t(x)")
    db.executemany("INSERT INTO t VALUES (randomblob(3000))", [()] * 2000)
    db.commit()
    db.close()


def shown_exit_code(shown):
    """The exit code the page's output implies."""
    if '"exit_code": ' in shown:
        return int(shown.split('"exit_code": ')[1].split(",")[0])
    return 2 if "not empty" in shown or "Choose another DEST" in shown else 0


def is_session(block):
    return block.startswith("$ apsw-backup") or block.startswith("$ mkdir")


def newest_backup(folder):
    return f"backups/{max(os.listdir(folder))}"


@pytest.mark.parametrize(("page", "block"), examples("text", is_session))
def test_command_line_session_behaves_as_shown(page, block, tmp_path):
    make_app_db(tmp_path / "app.db")
    session = block.splitlines()
    commands = [i for i, line in enumerate(session) if line.startswith("$ ")]
    if "mkdir backups" not in block and BACKUP_NAME.search(block):
        # A session about a backup made earlier: make one.
        (tmp_path / "backups").mkdir()
        made = run(
            [sys.executable, "-m", "apsw_backup", "app.db", "backups/"], tmp_path
        )
        assert made.returncode == 0, made.stderr
    for n, i in enumerate(commands):
        line = session[i][2:]
        if line.startswith("mkdir backups && "):
            (tmp_path / "backups").mkdir()
            line = line.removeprefix("mkdir backups && ")
        args = line.split()
        assert args[0] == "apsw-backup", line
        # The backup the session made before (its name has the time in it).
        args = [
            newest_backup(tmp_path / "backups") if BACKUP_NAME.fullmatch(a) else a
            for a in args
        ]
        result = run([sys.executable, "-m", "apsw_backup", *args[1:]], tmp_path)
        end = commands[n + 1] if n + 1 < len(commands) else len(session)
        shown = "\n".join(session[i + 1 : end])
        out = (result.stderr + result.stdout).strip()
        # The same kind of answer, line by line: the words before the first
        # figure (timestamps and timings differ from run to run).
        for want, got in zip(shown.splitlines(), out.splitlines(), strict=True):
            prefix = re.split(r"\d", want, maxsplit=1)[0]
            assert got.startswith(prefix), (page.name, want, got)
        assert result.returncode == shown_exit_code(shown), out


def test_the_sessions_are_run():
    pages = {param.values[0].name for param in examples("text", is_session)}
    assert {"README.md", "command-line.md", "restore.md"} <= pages


SCHEDULING = DOCS / "scheduling.md"


def nightly_backup_runs_and_keeps_the_newest(command, tmp_path, capsys):
    """Run a scheduled command (its paths moved into tmp_path) keep + 2 times.

    In this process (apsw_backup.cli.main, what the console script runs), so
    that the sixteen runs take a second, not an interpreter start each.
    """
    from apsw_backup.cli import main

    args = shlex.split(command.removesuffix(">/dev/null"))
    assert args[0] == "/opt/apsw-backup/bin/apsw-backup"  # the venv's path
    source, folder = args[-2], args[-1]
    assert folder.endswith("/") and source.endswith(".db")
    make_app_db(tmp_path / "app.db")
    (tmp_path / "backups").mkdir()
    args[-2:] = [str(tmp_path / "app.db"), f"{tmp_path / 'backups'}/"]
    keep = int(args[args.index("--keep") + 1])
    for _ in range(keep + 2):
        assert main(args[1:]) == 0
        out, err = capsys.readouterr()
        assert re.search(r"\w+_check ok", out), out
        assert err == ""  # cron mails stderr: nothing on success
    assert len(os.listdir(tmp_path / "backups")) == keep


def test_cron_example_runs_and_keeps_the_newest(tmp_path, capsys):
    (line,) = blocks_in(SCHEDULING, "cron")[0].strip().splitlines()
    schedule, command = line[:10], line[10:].strip()
    assert schedule.split() == ["15", "3", "*", "*", "*"]
    nightly_backup_runs_and_keeps_the_newest(command, tmp_path, capsys)


def units():
    found = {}
    for block in blocks_in(SCHEDULING, "ini"):
        first, rest = block.split("\n", 1)
        name = first.removeprefix("# /etc/systemd/system/")
        unit = configparser.ConfigParser(interpolation=None, strict=True)
        unit.optionxform = str
        unit.read_string(rest)
        found[name] = unit
    return found


def test_systemd_timer_starts_the_service_at_the_crons_time():
    found = units()
    assert set(found) == {"app-backup.service", "app-backup.timer"}
    service, timer = found["app-backup.service"], found["app-backup.timer"]
    assert service["Service"]["Type"] == "oneshot"
    assert timer["Timer"]["OnCalendar"] == "*-*-* 03:15:00"
    assert timer["Install"]["WantedBy"] == "timers.target"
    (cron,) = blocks_in(SCHEDULING, "cron")[0].strip().splitlines()
    command = service["Service"]["ExecStart"]
    # The same command as the cron line, which the test above runs.
    assert cron[10:].strip() == f"{command} >/dev/null"


def sh_lines():
    for page in PAGES:
        for block in blocks_in(page, "sh"):
            for line in block.splitlines():
                if line.strip() and not line.startswith("#"):
                    yield page, line.split("#")[0].strip()


def test_every_shell_line_names_a_command_and_files_that_exist():
    names = extras()
    assert {"test", "docs"} <= names
    known = ("python", "python3", "bash", "apsw-backup", "mkdir", "/opt/apsw-backup/")
    for page, line in sh_lines():
        for command in line.split("&&"):
            words = shlex.split(command)
            assert words[0].startswith(known), (page.name, line)
            for word in words[1:]:
                if re.fullmatch(r"(\.ci|benchmarks|tests|docs)/[\w./-]+", word):
                    assert (ROOT / word).exists(), (page.name, word)
                for extra in re.findall(r"^\.\[(\w+)\]$", word):
                    assert extra in names, (page.name, word)


def test_the_one_sqlite_check_prints_one_version_twice(tmp_path):
    (check,) = [
        line for _, line in sh_lines() if line.startswith('python -c "import sqlite3')
    ]
    result = run([sys.executable, *shlex.split(check)[1:]], tmp_path)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.split()
    assert first == second


@pytest.mark.heavy  # builds the extension: about 10 s
def test_the_wheel_is_built_and_installs_as_docs_install_says(tmp_path):
    (block,) = [
        b
        for b in blocks_in(DOCS / "install.md", "sh")
        if b.startswith("python -m pip wheel")
    ]
    build, install = block.strip().splitlines()
    assert build == "python -m pip wheel --no-deps -w dist ."
    args = shlex.split(build)
    args[args.index("dist")] = str(tmp_path / "dist")
    result = subprocess.run(
        [sys.executable, *args[1:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    pattern = shlex.split(install)[-1]
    (wheel,) = (tmp_path / "dist").glob(pattern.removeprefix("dist/"))
    assert wheel.name.startswith("apsw_backup-")
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)], tmp_path).returncode == 0
    python = str(venv / "bin" / "python")
    result = run(
        [python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], tmp_path
    )
    assert result.returncode == 0, result.stderr
    result = run(
        [python, "-c", "import apsw_backup; print(apsw_backup.__file__)"], tmp_path
    )
    assert result.stdout.startswith(str(venv)), result.stdout


def test_every_benchmark_the_docs_name_exists():
    listed = run([sys.executable, "benchmarks/run.py", "--list"], ROOT)
    assert listed.returncode == 0, listed.stderr
    scenarios = {line.split()[0] for line in listed.stdout.splitlines() if line}
    named = {
        name
        for _, line in sh_lines()
        for option in re.findall(r"--only (\S+)", line)
        for name in option.split(",")
    }
    assert len(named) >= 10
    assert named <= scenarios, named - scenarios
