"""Out of memory at every allocation of backup(), step() and finish()
(docs/testing.md).

Each case runs tests/faults/oom_child.py in a fresh interpreter, which
installs a counting allocator (SQLITE_CONFIG_MALLOC, through the ctypes-
loaded tests/faults/faultshim.c) before SQLite initialises and then fails
the Nth allocation for every N, once and from then on; what each run must
show is in its docstring.  The figures are printed (pytest -s).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from faults import shim

pytestmark = pytest.mark.heavy  # hundreds of backups: not for valgrind

CHILD = Path(__file__).with_name("faults") / "oom_child.py"
SQLITE_MISUSE = 21

# Whether the allocator can still be installed: after `import apsw_backup`
# (its module init must not initialise SQLite) and after a Connection (it
# must not: the check is real).
PROBE = r"""
import sys
sys.path.insert(0, sys.argv[2])
from faults.shim import Shim
from pathlib import Path
shim = Shim(Path(sys.argv[1]))
import apsw_backup
if sys.argv[3] == "connection":
    apsw_backup.Connection(":memory:").close()
print(shim.install_allocator())
"""


@pytest.fixture(scope="module")
def shim_path(tmp_path_factory):
    return shim.build(tmp_path_factory.mktemp("faultshim"))


def run_child(args, timeout=600):
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def probe(shim_path, when):
    tests = str(Path(__file__).parent)
    return run_child(["-c", PROBE, str(shim_path), tests, when]).strip()


def test_importing_apsw_backup_does_not_initialise_sqlite(shim_path):
    assert probe(shim_path, "import") == "0"


def test_the_allocator_cannot_be_installed_once_sqlite_is_in_use(shim_path):
    # What makes the probe above mean something: SQLITE_MISUSE once a
    # connection has initialised SQLite.
    assert probe(shim_path, "connection") == str(SQLITE_MISUSE)


@pytest.mark.parametrize("case", ["existing", "new", "memory"])
def test_every_allocation_failure_raises_nomem_and_leaves_the_destination(
    shim_path, tmp_path, case
):
    out = run_child([str(CHILD), str(shim_path), case, str(tmp_path / "oom")])
    report = json.loads(out)
    print(
        f"\noom: SQLite {report['sqlite']}, {case} destination: "
        f"{report['points']} allocation points, {report['runs']} runs, "
        f"outcomes {report['outcomes']}"
    )
    assert report["problems"] == []
    assert report["points"] > 10
    assert report["runs"] == 2 * report["points"]
    assert report["outcomes"].get("NoMemError", 0) > 0
