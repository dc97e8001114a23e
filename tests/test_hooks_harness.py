"""The hook harness (src/README.md, "Hook points"; tests/hooks/harness.py).

The full matrix runs under the sanitizers from .ci/hooks; here: the table
of src/README.md names every release of the GIL, every hook point is passed
by some scenario (or says where it is tested instead), and a bounded pass
of the matrix on a hook build made for the test.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKS = os.path.join(ROOT, "tests", "hooks")
sys.path.insert(0, HOOKS)

import harness  # noqa: E402


def test_the_readme_table_names_every_release_of_the_gil():
    releases = set()
    for name in os.listdir(os.path.join(ROOT, "src")):
        if name.endswith(".c"):
            with open(os.path.join(ROOT, "src", name)) as f:
                releases.update(re.findall(r'RELEASE_GIL\("(\w+)"\)', f.read()))
    with open(os.path.join(ROOT, "src", "README.md")) as f:
        readme = f.read()
    table = readme.split("## Every place the GIL is released")[1].split("\n## ")[0]
    named = set(re.findall(r"`(\w+)`", table))
    assert releases, "no RELEASE_GIL found: the pattern is out of date"
    assert sorted(releases - named) == []


@pytest.fixture(scope="module")
def hook_build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hooks")
    try:
        import build

        build.build(str(folder))
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build the hook variant here: {exc}")
    env = dict(os.environ, PYTHONPATH=str(folder))
    return env


def run_harness(env, *args, timeout=600):
    return subprocess.run(
        [sys.executable, os.path.join(HOOKS, "harness.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_hook_point_is_passed_by_a_scenario(hook_build, tmp_path):
    seen = set()
    for scenario in harness.SCENARIOS:
        proc = run_harness(hook_build, "record", scenario, str(tmp_path / scenario))
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen.update(name for name, _ in __import__("json").loads(proc.stdout))
    # Reached only when a hostile action lets go of something while a lock
    # is held (the matrix reaches them: .ci/hooks checks that).
    under_actions = {"close_finalize_orphan", "settle_orphans_finalize"}
    missing = harness.all_points() - seen - harness.NOT_REACHED.keys() - under_actions
    assert sorted(missing) == []


@pytest.mark.heavy
def test_bounded_matrix_finds_no_problem(hook_build):
    proc = run_harness(hook_build, "matrix", "--bounded", "3", timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"hooks: \d+ scenarios, .* 0 problems", proc.stdout)
