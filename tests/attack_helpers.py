"""Child-process helpers of the reproducers from an attack review
(tests/test_ownership.py, test_fork.py, test_reentrancy.py,
test_one_database_on_both_sides.py).

Their reproducers run in child processes, and some of them crash on the
code they were written against.  Under .ci/sanitize a child inherits the
ASan/UBSan options, whose log_path points at the folder the sanitizer run
inspects: an expected crash of an xfail test would then fail the whole
run.  child_env() sends a child's sanitizer reports into the test's own
tmp_path instead; the test itself still fails (or xfails) on the crash.
"""

import os
import re


def child_env(tmp_path, **extra):
    env = dict(os.environ, **extra)
    for name, stem in (("ASAN_OPTIONS", "asan"), ("UBSAN_OPTIONS", "ubsan")):
        if name in env:
            options = re.sub(r"(^|:)log_path=[^:]*", "", env[name]).strip(":")
            env[name] = f"{options}:log_path={tmp_path / stem}".lstrip(":")
    return env


def under_asan():
    return "asan" in os.environ.get("LD_PRELOAD", "")
