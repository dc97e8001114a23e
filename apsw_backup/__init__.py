"""SQLite online backup for Python.

The C extension provides Connection, Cursor and Backup (an APSW-style online
backup object); this package re-exports it and adds the pure Python parts.
"""

# First of all: the command notes signals from here on (only in its own
# process; see _command_start).
from apsw_backup import _command_start  # noqa: F401

# isort: split

# "import X as X" marks an explicit re-export: without it `mypy --strict`
# rejects apsw_backup.copy and the rest (implicit re-exports are off).
from apsw_backup._apsw_backup import *  # noqa: F403
from apsw_backup._apsw_backup import __version__ as __version__
from apsw_backup.copy import CopyResult as CopyResult
from apsw_backup.copy import acopy as acopy
from apsw_backup.copy import copy as copy
