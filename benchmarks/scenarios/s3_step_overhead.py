"""Scenario 3: file -> :memory:, step(1), every contender against raw C.

Measures the cost of each call (~49,000 steps at 200 MB): binding, GIL
hand-over, Python loop.  Target: apsw_backup / raw C <= 1.05 (paired), and
no slower than the standard library or APSW.  See _speed.py for the method.
"""

from __future__ import annotations

from bench import Context

from scenarios import _speed

KEY = "s3"


def run(ctx: Context) -> dict:
    return _speed.measure(ctx, "file -> :memory:, step(1)", ":memory:", 1)


def table(result: dict) -> list[str]:
    return _speed.table(KEY, result)


def targets(result: dict) -> list[dict]:
    return _speed.targets(KEY, result)
