"""Run a reproducer in a child interpreter, bounded in time.

The reproducers of crashes, hangs and fork defects cannot run inside
pytest's own process: a SIGSEGV would take the run with it, a deadlock would
never end, a fork would duplicate pytest.  run_bounded() runs a script in its
own session (so that a grandchild forked by the script is killed with it),
turns a hang into a test failure that says so, and returns the finished
process.  run_child() also fails the test on a crash (saying which signal)
or a non-zero exit, and returns the script's report: each line `KEY value` of its stdout, value read with
ast.literal_eval when it can be.
"""

import ast
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from attack_helpers import child_env

# Printed by every script: report("KEY", value) -> one line the parent reads.
PRELUDE = """
import os, sys, threading
_report_lock = threading.Lock()
def report(key, value):
    with _report_lock:
        sys.stdout.write(f"{key} {value!r}\\n")
        sys.stdout.flush()
"""


def run_bounded(code, *args, timeout=30, env=None):
    """Run `code` (dedented) as ``python -c code args...`` in its own
    session (a grandchild it forks is killed with it), bounded in time.  A
    hang kills the session and fails the test, saying so; any exit status
    is returned, in a subprocess.CompletedProcess with text stdout and
    stderr.  env: the child's environment (default: this process's; pass
    child_env(tmp_path) for a reproducer that may crash on purpose)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    hung = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    finally:
        try:  # a grandchild the script forked and left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if hung:
        pytest.fail(
            f"HANG: no end within {timeout} s\nstdout: {out[-2000:]}\n"
            f"stderr: {err[-3000:]}"
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_child(code, tmp_path, *args, timeout=30):
    """Run `code` (after PRELUDE) with sys.argv[1] = tmp_path, then args.
    Fails the test on a crash, a hang or a non-zero exit; returns the report
    as a dict."""
    proc = run_bounded(
        PRELUDE + textwrap.dedent(code),
        tmp_path,
        *args,
        timeout=timeout,
        env=child_env(tmp_path),
    )
    out, err = proc.stdout, proc.stderr
    if proc.returncode < 0:
        pytest.fail(
            f"CRASH: killed by {signal.Signals(-proc.returncode).name}\n"
            f"stdout: {out[-2000:]}\nstderr: {err[-3000:]}"
        )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
    report = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        try:
            report[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            report[key] = value
    report["_stderr"] = err
    return report


# Makes the next allocation of a GC-tracked object run action(), from the
# finalizer of a collected cycle: with the collector off, the young
# generation is pushed over a threshold of 1 and an unreachable cycle with
# a __del__ is made; the collector is then switched back on, so the first
# tracked allocation after arm() returns collects, before anything else.
# Up to CPython 3.11 that allocation is the one inside the C call that
# follows (3.12 only schedules the collection for the next bytecode).
ARM_COLLECTOR = """
import gc
_kept = []
class _Finalizer:
    def __init__(self, action):
        self.action = action
        self.me = self
    def __del__(self):
        self.action()
def arm(action):
    gc.collect()
    gc.disable()
    gc.set_threshold(1)
    _kept.append([[] for _ in range(10)])
    _Finalizer(action)
    gc.enable()
def disarm():
    gc.set_threshold(700, 10, 10)
"""

COLLECTOR_RUNS_INSIDE_C_CALLS = sys.version_info < (3, 12)
NO_COLLECTION_INSIDE_C_CALLS = (
    "CPython 3.12+ runs a collection between bytecodes, never inside a C "
    "allocation: a finalizer cannot run at that point (the hook build "
    "reaches it)"
)
