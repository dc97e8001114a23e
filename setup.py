"""Build definition for the C extension; the metadata lives in pyproject.toml.

The extension links the system shared libsqlite3 -- the library the standard
``sqlite3`` module loads -- so a process never holds two copies of SQLite.
"""

import glob
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup

MISSING_HEADERS = """
apsw_backup needs the SQLite development headers (sqlite3.h) to build.
Install them and try again:
    Debian/Ubuntu:  apt-get install libsqlite3-dev
    Fedora/RHEL:    dnf install sqlite-devel
    Alpine:         apk add sqlite-dev
    macOS:          brew install sqlite   (then set CFLAGS/LDFLAGS to its prefix)
"""


def pkg_config(*args):
    try:
        out = subprocess.run(
            ["pkg-config", *args, "sqlite3"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return shlex.split(out)


def sqlite_build_flags():
    include_dirs = [f[2:] for f in pkg_config("--cflags-only-I")]
    library_dirs = [f[2:] for f in pkg_config("--libs-only-L")]
    candidates = include_dirs + [
        d[2:] for d in shlex.split(os.environ.get("CFLAGS", "")) if d.startswith("-I")
    ]
    candidates += ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]
    if not any(os.path.exists(os.path.join(d, "sqlite3.h")) for d in candidates):
        sys.exit(MISSING_HEADERS)
    return include_dirs, library_dirs


include_dirs, library_dirs = sqlite_build_flags()

# APSW_BACKUP_FULL_API=1 builds against the full (non-limited) C API, e.g.
# for the sanitizer build; wheels use the Limited API so one serves 3.10+.
limited = os.environ.get("APSW_BACKUP_FULL_API", "") in ("", "0")
macros = [("Py_LIMITED_API", "0x030A0000")] if limited else []
# APSW_BACKUP_HOOKS=1: the test-only build with a hook at every point where
# foreign code can run or the GIL is released (src/README.md, "Hook points";
# tests/hooks/).  Never for a wheel.
if os.environ.get("APSW_BACKUP_HOOKS", "") not in ("", "0"):
    macros.append(("APSW_BACKUP_HOOKS", "1"))

setup(
    ext_modules=[
        Extension(
            "apsw_backup._apsw_backup",
            sources=sorted(glob.glob("src/*.c")),
            depends=sorted(glob.glob("src/*.h")),
            include_dirs=include_dirs,
            library_dirs=library_dirs,
            libraries=["sqlite3"],
            define_macros=macros,
            py_limited_api=limited,
            # -pthread: pthread_atfork and the mutexes (src/locks.c) live in libpthread
            # before glibc 2.34, as on the manylinux_2_28 image.
            extra_compile_args=["-Wall", "-Wextra", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if limited else {},
)
