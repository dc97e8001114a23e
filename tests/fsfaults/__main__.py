"""python -m fsfaults [--bounded N] [--scenarios a,b] [--workdir DIR]:
run the scenarios, print a line per scenario, every problem and the
summary; exit 1 on any problem."""

import argparse
import sys
import tempfile
import time

from . import incremental, runner, scenarios, strace

SCENARIOS = {**scenarios.SCENARIOS, **incremental.SCENARIOS}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fsfaults")
    parser.add_argument(
        "--bounded",
        type=int,
        metavar="N",
        default=None,
        help="N calls per scenario, each killed and failed once",
    )
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    why = strace.available()
    if why:
        print(f"fsfaults: cannot run: {why}")
        return 1
    started = time.monotonic()
    results = []
    with tempfile.TemporaryDirectory(prefix="fsfaults-", dir=args.workdir) as work:
        for name in args.scenarios.split(","):
            result = runner.run_scenario(SCENARIOS[name], work, args.bounded)
            print(result.line(), flush=True)
            results.append(result)
    print(runner.summary(results, time.monotonic() - started))
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
