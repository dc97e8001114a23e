"""Build and drive tests/faults/faultshim.c (test-only fault injection).

The shim is compiled here, with the system compiler, into a shared object
that links libsqlite3.so.0 -- whichever one the dynamic loader finds, so
under LD_LIBRARY_PATH (.ci/sqlite-versions) it is the SQLite under test --
and loaded with ctypes.  `Shim.check_same_sqlite()` proves that the shim,
ctypes and the extension all use one and the same loaded libsqlite3.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("faultshim.c")

# Index of each counted VFS method in faultshim.c's enum.
OPS = (
    "open",
    "delete",
    "read",
    "write",
    "truncate",
    "sync",
    "filesize",
    "lock",
    "unlock",
    "shmmap",
)

SQLITE_OK = 0
SQLITE_NOMEM = 7
SQLITE_IOERR = 10
SQLITE_FULL = 13
SQLITE_CANTOPEN = 14


def ioerr(n):
    return SQLITE_IOERR | (n << 8)


# One fault per method: the SQLite code the unix VFS itself returns when
# that system call fails, and the errno that system call would leave.
FAULTS = {
    "open": ("open", SQLITE_CANTOPEN, errno.EACCES),
    "delete": ("delete", ioerr(10), errno.EIO),
    "read": ("read", ioerr(1), errno.EIO),
    "write": ("write", ioerr(3), errno.EIO),
    "write-full": ("write", SQLITE_FULL, errno.ENOSPC),
    "truncate": ("truncate", ioerr(6), errno.EIO),
    "sync": ("sync", ioerr(4), errno.EIO),
    "filesize": ("filesize", ioerr(7), errno.EIO),
    "lock": ("lock", ioerr(15), errno.EIO),
    "unlock": ("unlock", ioerr(8), errno.EIO),
    "shmmap": ("shmmap", ioerr(21), errno.EIO),
}


def build(folder: Path) -> Path:
    """Compile the shim into folder (once per source text); its path."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = Path(folder) / f"faultshim-{digest}.so"
    if target.exists():
        return target
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    # CPATH / LIBRARY_PATH (set by .ci/sqlite-versions) pick the headers
    # and library of another SQLite build.
    command = [
        os.environ.get("CC", "gcc"),
        "-shared",
        "-fPIC",
        "-O1",
        "-g",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-o",
        str(partial),
        str(SOURCE),
        "-lsqlite3",
    ]
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # a sanitizer runtime is for Python only
    proc = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the fault shim failed:\n{proc.stderr}")
    os.replace(partial, target)
    return target


_loaded: Shim | None = None


def load(folder: Path) -> Shim:
    """The shim, built into folder and loaded once per process: a second
    copy would register a second "faultvfs" that nobody arms."""
    global _loaded
    if _loaded is None:
        _loaded = Shim(build(folder))
    return _loaded


def loaded_sqlite_libraries() -> set[str]:
    """Paths of every libsqlite3 mapped into this process."""
    with open("/proc/self/maps") as f:
        return {
            line.split()[-1]
            for line in f
            if "libsqlite3" in line and line.split()[-1].startswith("/")
        }


class Shim:
    """The loaded shim: VFS and allocator controls."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self.lib = lib
        lib.faultvfs_register.argtypes = [ctypes.c_int]
        lib.faultvfs_reset.argtypes = [ctypes.c_char_p]
        lib.faultvfs_reset.restype = None
        lib.faultvfs_arm.argtypes = [
            ctypes.c_int,
            ctypes.c_long,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.faultvfs_arm.restype = None
        lib.faultvfs_disarm.restype = None
        lib.faultvfs_calls.argtypes = [ctypes.c_int]
        lib.faultvfs_calls.restype = ctypes.c_long
        lib.faultvfs_injected.restype = ctypes.c_long
        lib.faultshim_libversion_address.restype = ctypes.c_void_p
        lib.faultmem_arm.argtypes = [ctypes.c_long, ctypes.c_int]
        lib.faultmem_arm.restype = None
        lib.faultmem_disarm.restype = None
        lib.faultmem_calls.restype = ctypes.c_long
        lib.faultmem_injected.restype = ctypes.c_long
        self.sqlite = ctypes.CDLL("libsqlite3.so.0")
        self.sqlite.sqlite3_memory_used.restype = ctypes.c_int64
        self.sqlite.sqlite3_libversion.restype = ctypes.c_char_p

    def check_same_sqlite(self) -> str:
        """Fail unless one libsqlite3 is loaded and the shim calls it; the
        version it reports."""
        import apsw_backup

        ours = self.lib.faultshim_libversion_address()
        theirs = ctypes.cast(self.sqlite.sqlite3_libversion, ctypes.c_void_p).value
        libraries = loaded_sqlite_libraries()
        version = self.sqlite.sqlite3_libversion().decode()
        assert ours == theirs, "the shim links another libsqlite3"
        assert len(libraries) == 1, f"several SQLite libraries loaded: {libraries}"
        assert apsw_backup.sqlite_lib_version() == version
        return version

    def memory_used(self) -> int:
        return self.sqlite.sqlite3_memory_used()

    # -- the VFS ----------------------------------------------------------

    def registered(self) -> bool:
        """Whether "faultvfs" is registered with SQLite."""
        find = self.sqlite.sqlite3_vfs_find
        find.restype = ctypes.c_void_p
        find.argtypes = [ctypes.c_char_p]
        return find(b"faultvfs") is not None

    def register_vfs(self, default: bool = True) -> None:
        rc = self.lib.faultvfs_register(int(default))
        if rc != SQLITE_OK:
            raise RuntimeError(f"faultvfs_register: SQLite code {rc}")

    def reset(self, folder: str | os.PathLike[str]) -> None:
        """Zero the counters and count calls on files under folder."""
        prefix = os.path.realpath(folder).rstrip("/") + "/"
        self.lib.faultvfs_reset(os.fsencode(prefix))

    def arm(self, fault: str, nth: int, persistent: bool) -> None:
        op, rc, err = FAULTS[fault]
        self.lib.faultvfs_arm(OPS.index(op), nth, int(persistent), rc, err)

    def arm_dropped_write(self, nth: int) -> None:
        """Make the nth write (of a counted file) report success without
        reaching the file."""
        self.lib.faultvfs_arm(OPS.index("write"), nth, 0, -1, 0)

    def count_only(self) -> None:
        self.lib.faultvfs_arm(-1, 0, 0, 0, 0)

    def disarm(self) -> None:
        self.lib.faultvfs_disarm()

    def calls(self) -> dict[str, int]:
        return {op: self.lib.faultvfs_calls(i) for i, op in enumerate(OPS)}

    def injected(self) -> int:
        return self.lib.faultvfs_injected()

    # -- the allocator ----------------------------------------------------

    def install_allocator(self) -> int:
        """SQLITE_CONFIG_MALLOC with the counting allocator: SQLite's code
        (SQLITE_MISUSE = 21 when SQLite is already initialised)."""
        return self.lib.faultmem_install()

    def mem_arm(self, nth: int, persistent: bool) -> None:
        self.lib.faultmem_arm(nth, int(persistent))

    def mem_disarm(self) -> None:
        self.lib.faultmem_disarm()

    def mem_calls(self) -> int:
        return self.lib.faultmem_calls()

    def mem_injected(self) -> int:
        return self.lib.faultmem_injected()
