"""Imported first by apsw_backup.cli: from here on the command notes SIGINT
and SIGTERM (see signals.listen_early), before the rest of it is loaded."""

from apsw_backup.cli.signals import listen_early

listen_early()
