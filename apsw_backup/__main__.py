"""python -m apsw_backup: the apsw-backup command."""

from apsw_backup.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
