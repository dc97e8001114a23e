"""The benchmark scenarios, one module each, in the order run.py runs them.

Each module has KEY (its name in results.json and on the command line),
run(ctx) -> dict (measures; the dict goes into results.json), table(result)
-> lines and targets(result) -> [{target, value, verdict}], the last two
working from the saved dict alone (run.py --report).
"""

from __future__ import annotations

import importlib
from types import ModuleType

ORDER = (
    "s1_file_to_file",
    "s2_file_to_file_stepped",
    "s3_step_overhead",
    "s4_writer_latency",
    "s5_rss",
    "s6_copy_under_writes",
    "live_copy",
    "wal_writer_latency",
    "disk_gentle",
    "journal_stall",
    "wal_growth",
    "cli_vs_shell",
)


def load() -> list[ModuleType]:
    return [importlib.import_module(f"scenarios.{name}") for name in ORDER]
