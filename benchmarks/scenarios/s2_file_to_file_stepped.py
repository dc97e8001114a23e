"""Scenario 2: file -> file, step(100), every contender against raw C.

Measures a normal stepped backup (~490 steps at 200 MB).
Target: apsw_backup / raw C <= 1.05 (paired), and no slower than the
standard library or APSW.  See _speed.py for the method.
"""

from __future__ import annotations

from bench import Context

from scenarios import _speed

KEY = "s2"


def run(ctx: Context) -> dict:
    return _speed.measure(ctx, "file -> file, step(100)", ctx.dest, 100)


def table(result: dict) -> list[str]:
    return _speed.table(KEY, result)


def targets(result: dict) -> list[dict]:
    return _speed.targets(KEY, result)
