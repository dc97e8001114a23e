"""Run a scenario: record its file-system calls, then for each call (or a
sample: bounded) kill the run at it and make it fail, check the invariants
(checks.py), run the command once more without a fault and check that run
removed what the faulted one left."""

import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import checks, strace

TIMEOUT = 60  # seconds a run may take before it counts as a hang
KILL = "signal=KILL"
ERRORS = ("error=ENOSPC", "error=EIO")
EACCES = "error=EACCES"


# Defects found and not fixed here, each pinned by an xfail(strict=True)
# case in tests/test_fs_faults.py: (scenario, fault, the problem's start).
# A problem that matches is counted as known, not failed on.
KNOWN: list[tuple[str, str, str]] = []


def known(scenario, fault, problem):
    return any(
        scenario.name == name and fault == kind and problem.startswith(start)
        for name, kind, start in KNOWN
    )


def faults_of(call):
    """Every fault the full matrix injects at a call."""
    faults = [KILL, *ERRORS]
    if call.name in strace.OPENS:
        faults.append(EACCES)
    return faults


def sample(calls, per_scenario):
    """Bounded pass: about per_scenario evenly spaced calls (the first and
    the last among them), each with the kill and one error, the errors
    taken in turn (EACCES at opens)."""
    if len(calls) <= per_scenario:
        chosen = list(calls)
    else:
        step = (len(calls) - 1) / (per_scenario - 1)
        chosen = [calls[round(i * step)] for i in range(per_scenario)]
        chosen = list({c.index: c for c in chosen}.values())
    plan = []
    for n, call in enumerate(chosen):
        errors = faults_of(call)[1:]
        plan.append((call, [KILL, errors[n % len(errors)]]))
    return plan


class Result:
    def __init__(self, scenario):
        self.scenario = scenario
        self.calls = 0  # calls on the scenario's files, recorded
        self.thread_calls = 0  # of them, made by another thread: not injected
        self.runs = 0  # faulted runs
        self.drift = 0  # runs whose faulted call was not the recorded one
        self.problems = []  # (call, fault, sentence)
        self.known = []  # the same, for the defects in KNOWN
        self.seconds = 0.0

    def line(self):
        return (
            f"{self.scenario.name}: {self.calls} calls ({self.thread_calls} in "
            f"another thread, not injected), {self.runs} runs, {self.drift} "
            f"landed elsewhere, {len(self.problems)} problems, {len(self.known)} "
            f"known ({self.seconds:.0f} s)"
        )


class Harness:
    def __init__(self, scenario, workdir):
        self.scenario = scenario
        self.work = Path(workdir) / scenario.name
        if self.work.exists():
            shutil.rmtree(self.work)
        self.template = self.work / "template"
        self.root = self.work / "run"  # where every run happens
        self.snapshot = self.work / "snapshot"
        (self.root / "cwd").mkdir(parents=True)
        # Built where the runs happen (marks name SOURCE's real path), then
        # kept as the template every run starts from.
        scenario.build(self.root)
        shutil.copytree(self.scenario.data(self.root), self.template / "data")
        self.expected = checks.Expected(scenario, self.root)

    def reset(self):
        data = self.scenario.data(self.root)
        shutil.rmtree(data)
        shutil.copytree(self.template / "data", data)  # copy2: marks too

    def run(self, argv, env=None):
        try:
            proc = subprocess.run(
                argv,
                cwd=self.root / "cwd",
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return None, exc.stdout or "", exc.stderr or ""
        return proc.returncode, proc.stdout, proc.stderr

    def record(self):
        """The calls of a clean run (after one untraced run, so that every
        module's bytecode is cached and start-up does the same each time)."""
        self.reset()
        code, _out, err = self.run(self.scenario.argv(self.root))
        assert code == 0, f"{self.scenario}: the clean run failed: {err}"
        self.reset()
        trace = self.work / "record.trace"
        code, out, err = self.run(strace.command(self.scenario.argv(self.root), trace))
        assert code == 0, f"{self.scenario}: the traced run failed: {err}"
        assert not checks.check_run(
            self.scenario, self.expected, self.root, code, out, err, False
        ), "the clean run breaks an invariant"
        problems = checks.check_leftovers(
            self.scenario, self.expected, self.scenario.data(self.root)
        )
        assert not problems, f"the clean run: {problems}"
        return strace.parse(
            trace.read_text(errors="replace"), self.root, self.scenario.data(self.root)
        )

    def inject(self, call, fault):
        """One faulted run, its checks, the next run and its checks:
        (problems, whether the fault landed on the recorded call)."""
        self.reset()
        trace = self.work / "inject.trace"
        argv = strace.command(
            self.scenario.argv(self.root), trace, (fault, call.when), call.name
        )
        code, out, err = self.run(argv)
        if code is None:
            return [f"hung (more than {TIMEOUT} s)"], True
        killed = code == -signal.SIGKILL
        landed = (
            strace.injected_key(
                trace.read_text(errors="replace"), self.root, call.name, fault
            )
            == call.key
        )
        # A snapshot of the files as the run left them, for the checks.
        if self.snapshot.exists():
            shutil.rmtree(self.snapshot)
        shutil.copytree(
            self.scenario.data(self.root), self.scenario.data(self.snapshot)
        )
        problems = checks.check_run(
            self.scenario, self.expected, self.snapshot, code, out, err, killed
        )
        # The next run, on the files as the faulted run left them.
        next_code, next_out, next_err = self.run(self.scenario.argv(self.root, True))
        if next_code != 0:
            problems.append(
                f"the next run failed (exit {next_code}): {next_err[-300:]!r}"
            )
        else:
            problems += checks.check_leftovers(
                self.scenario, self.expected, self.scenario.data(self.root)
            )
            problems += checks.check_rollback_mode(self.scenario, self.root)
        return problems, landed


def run_scenario(scenario, workdir, bounded=None, log=print):
    """Run one scenario; bounded: calls sampled per scenario (None: every
    call and every fault). Result."""
    started = time.monotonic()
    result = Result(scenario)
    harness = Harness(scenario, workdir)
    calls = harness.record()
    result.calls = len(calls)
    injectable = [c for c in calls if not c.thread]
    result.thread_calls = len(calls) - len(injectable)
    if bounded:
        plan = sample(injectable, bounded)
    else:
        plan = [(call, faults_of(call)) for call in injectable]
    for call, faults in plan:
        for fault in faults:
            problems, landed = harness.inject(call, fault)
            result.runs += 1
            result.drift += not landed
            for problem in problems:
                if known(scenario, fault, problem):
                    result.known.append((call, fault, problem))
                    log(f"known {scenario.name} {call!r} {fault}: {problem}")
                else:
                    result.problems.append((call, fault, problem))
                    log(f"PROBLEM {scenario.name} {call!r} {fault}: {problem}")
    result.seconds = time.monotonic() - started
    shutil.rmtree(harness.work, ignore_errors=True)
    return result


def summary(results, seconds):
    calls = sum(r.calls for r in results)
    runs = sum(r.runs for r in results)
    problems = sum(len(r.problems) for r in results)
    known_ = sum(len(r.known) for r in results)
    return (
        f"fsfaults: {len(results)} scenarios, {calls} calls, {runs} runs, "
        f"{problems} problems ({seconds:.0f} s); {known_} hits of known "
        "defects (xfail)"
    )
