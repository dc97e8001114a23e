"""SQLite online backup for Python.

The C extension provides Connection, Cursor and Backup (an APSW-style online
backup object); this package re-exports it and adds the pure Python parts.
"""

from apsw_backup._apsw_backup import *  # noqa: F403
from apsw_backup._apsw_backup import __version__  # noqa: F401
from apsw_backup.copy import CopyResult, acopy, copy  # noqa: F401
