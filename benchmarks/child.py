"""Runs one measurement of a scenario in this (fresh) process.

    python benchmarks/child.py SCENARIO FUNCTION JSON_KWARGS

run.py's scenarios start it through bench.child(); it calls
scenarios.SCENARIO.FUNCTION(**kwargs) and prints the returned dict as JSON
on the last line.  A fresh process per measurement keeps runs independent
(heap, page cache of SQLite, peak RSS) and the parent's imports out of it.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    scenario, function, kwargs = argv
    module = importlib.import_module(f"scenarios.{scenario}")
    out = getattr(module, function)(**json.loads(kwargs))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
