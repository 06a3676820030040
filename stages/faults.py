"""Fault injection for the fault tests (tests/test_faults.py), off unless PAIRSEL_FAULT is set.

    PAIRSEL_FAULT=POINT:N[:TARGET]

kills with SIGKILL, once POINT has been passed with N items in all: TARGET `driver` (the default) kills the
job's driver (PAIRSEL_DRIVER_PID) and then this process, so that nothing after the point runs; `self` kills
only this process (a model actor dying mid-run). With PAIRSEL_FAULT_ONCE=PATH, items are counted over all
processes (in PATH.passed) and the fault fires at most once (the process that creates PATH fires), so a
restarted actor or a rerun does not die again; without it, each process counts its own.

Points: read (rows read), generate (requests generated), embed (inputs embedded), write (rows staged),
commit (shards whose files are in place but whose commit record is not yet written).
"""
from __future__ import annotations

import os
import signal

ENV = "PAIRSEL_FAULT"
ONCE_ENV = "PAIRSEL_FAULT_ONCE"
DRIVER_ENV = "PAIRSEL_DRIVER_PID"

_passed: dict[str, int] = {}


def fault_point(point: str, items: int = 1) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    threshold, _, target = rest.partition(":")
    if _passed_so_far(point, items) < int(threshold) or not _claim():
        return
    if (target or "driver") == "driver":
        os.kill(int(os.environ[DRIVER_ENV]), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _passed_so_far(point: str, items: int) -> int:
    once = os.environ.get(ONCE_ENV)
    if not once:
        _passed[point] = _passed.get(point, 0) + items
        return _passed[point]
    with open(f"{once}.passed", "a+") as f:  # one short appended line: atomic between processes
        f.write(f"{items}\n")
        f.flush()
        f.seek(0)
        return sum(int(line) for line in f if line.strip())


def _claim() -> bool:
    path = os.environ.get(ONCE_ENV)
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def forwarded_env() -> dict[str, str]:
    """What Ray workers need to see of the fault settings (empty when no fault is set)."""
    if not os.environ.get(ENV):
        return {}
    keep = {k: os.environ[k] for k in (ENV, ONCE_ENV) if os.environ.get(k)}
    return {**keep, DRIVER_ENV: os.environ.get(DRIVER_ENV, str(os.getpid()))}
