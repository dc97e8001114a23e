"""Sub-interpreters: apsw_backup refuses to be imported in one, with a clear
ImportError (src/README.md, "Sub-interpreters").

Its busy handler runs Python in the main interpreter (PyGILState_Ensure):
imported in a sub-interpreter, a handler's exception leaked into the main
one (SystemError) and the waiting call got BusyError instead.  Each case
runs in a child process; the sub-interpreter writes what it saw to a pipe.
CPython 3.10-3.12 have _xxsubinterpreters, 3.13 _interpreters, all of them
_testcapi.run_in_subinterp (a legacy sub-interpreter); 3.12 and later also
refuse on their own in an isolated one (own GIL), before our module runs.
"""

import importlib.util

import pytest
from child_process import run_child

# sys.argv[2] names the way in; RUN(code) runs code in a new
# sub-interpreter, whose os.write(W, ...) lines come back as the report.
RUNNER = """
import importlib
way = sys.argv[2]
R, W = os.pipe()
def RUN(code):
    code = "W = %d\\n" % W + code
    if way == "testcapi":
        import _testcapi
        report("RUN_RESULT", _testcapi.run_in_subinterp(code))
        return
    try:
        mod = importlib.import_module("_interpreters")
        legacy, isolated = ("legacy",), ("isolated",)
        kwargs_legacy = kwargs_isolated = {}
    except ImportError:
        mod = importlib.import_module("_xxsubinterpreters")
        legacy = isolated = ()
        kwargs_legacy, kwargs_isolated = {"isolated": False}, {"isolated": True}
    if way == "interpreters_legacy":
        iid = mod.create(*legacy, **kwargs_legacy)
    else:
        iid = mod.create(*isolated, **kwargs_isolated)
    try:
        run = mod.run_string if hasattr(mod, "run_string") else mod.exec
        report("RUN_RESULT", run(iid, code))
    finally:
        mod.destroy(iid)
def collect():
    os.close(W)
    data = b""
    while True:
        chunk = os.read(R, 65536)
        if not chunk:
            break
        data += chunk
    for line in data.decode().splitlines():
        print(line, flush=True)
"""

IMPORT = """
import os
def say(key, value):
    os.write(W, ("%s %r\\n" % (key, value)).encode())
try:
    import apsw_backup
    say("IMPORT", "imported")
except ImportError as exc:
    say("IMPORT", "ImportError: " + str(exc))
"""


def has(module):
    return importlib.util.find_spec(module) is not None


INTERPRETERS = has("_interpreters") or has("_xxsubinterpreters")
WAYS = [
    pytest.param(
        "testcapi",
        marks=pytest.mark.skipif(
            not has("_testcapi"), reason="this CPython has no _testcapi"
        ),
    ),
    pytest.param(
        "interpreters_legacy",
        marks=pytest.mark.skipif(
            not INTERPRETERS,
            reason="this CPython has neither _interpreters nor _xxsubinterpreters",
        ),
    ),
    pytest.param(
        "interpreters_isolated",
        marks=pytest.mark.skipif(
            not INTERPRETERS,
            reason="this CPython has neither _interpreters nor _xxsubinterpreters",
        ),
    ),
]


@pytest.mark.parametrize("way", WAYS)
def test_import_in_a_subinterpreter_is_refused_with_a_clear_import_error(tmp_path, way):
    """B.11 of the trust review: the module imported in a sub-interpreter,
    and its busy handlers then ran there in the main interpreter."""
    code = RUNNER + f"RUN({IMPORT!r})\ncollect()\n"
    report = run_child(code, tmp_path, way)
    said = report["IMPORT"]
    assert said.startswith("ImportError: "), report
    message = said.lower()
    assert "sub-interpreter" in message or "subinterpreter" in message, said
    if "apsw_backup cannot be imported" in said:
        # Ours (CPython's own refusal comes first in an isolated one):
        # it names the cure.
        assert "main interpreter" in said and "separate process" in said


# The symptom, pinned: in a sub-interpreter, either the import is refused,
# or a busy handler's exception comes out of the waiting call there --
# never a BusyError there and a SystemError in the main interpreter.
BUSY_HANDLER = """
import os, sqlite3
def say(key, value):
    os.write(W, ("%s %r\\n" % (key, value)).encode())
try:
    import apsw_backup as ab
except ImportError:
    say("SUB", "refused")
else:
    path = os.path.join({tmp!r}, "x.db")
    conn = ab.Connection(path)
    conn.execute("CREATE TABLE t(v)")
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    def handler(n):
        raise ValueError("from the handler")
    conn.set_busy_handler(handler)
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        say("SUB", "no error")
    except BaseException as exc:
        say("SUB", type(exc).__name__)
    locker.rollback()
"""


@pytest.mark.skipif(not has("_testcapi"), reason="this CPython has no _testcapi")
def test_busy_handler_in_a_subinterpreter_is_refused_or_raises_there(tmp_path):
    """B.11: the handler's ValueError leaked into the main interpreter
    (SystemError from run_in_subinterp) and the sub-interpreter's call got
    BusyError."""
    code = (
        RUNNER
        + "try:\n"
        + f"    RUN({BUSY_HANDLER.format(tmp=str(tmp_path))!r})\n"
        + "except BaseException as exc:\n"
        + "    report('MAIN_RAISED', type(exc).__name__)\n"
        + "collect()\n"
    )
    report = run_child(code, tmp_path, "testcapi")
    assert "MAIN_RAISED" not in report, report
    assert report["SUB"] in ("refused", "ValueError"), report
