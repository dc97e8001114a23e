"""Build the test-only hook variant of the extension into a folder of its own.

    python tests/hooks/build.py FOLDER [extra CFLAGS...]

makes FOLDER/apsw_backup (the Python package with the hook build of
_apsw_backup) and prints FOLDER; put FOLDER first on PYTHONPATH.  It calls
the C compiler directly (no setuptools), with the full C API, -Werror and
APSW_BACKUP_HOOKS, linking the system libsqlite3 as setup.py does.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def build(folder: str, extra: list[str] | None = None) -> str:
    package = os.path.join(folder, "apsw_backup")
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(
        os.path.join(ROOT, "apsw_backup"),
        package,
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    target = os.path.join(
        package, "_apsw_backup" + sysconfig.get_config_var("EXT_SUFFIX")
    )
    command = [
        os.environ.get("CC", "gcc"),
        "-shared",
        "-fPIC",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pthread",
        "-DAPSW_BACKUP_HOOKS=1",
        "-I" + sysconfig.get_paths()["include"],
        *(extra or []),
        *sorted(glob.glob(os.path.join(ROOT, "src", "*.c"))),
        "-o",
        target,
        "-lsqlite3",
    ]
    subprocess.run(command, check=True)
    return folder


if __name__ == "__main__":
    print(build(sys.argv[1], sys.argv[2:]))
