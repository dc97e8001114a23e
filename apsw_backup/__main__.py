"""python -m apsw_backup: the apsw-backup command."""

from apsw_backup.cli import main

raise SystemExit(main())
