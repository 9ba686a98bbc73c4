"""Crash points, for the tests that kill memory3 at chosen moments of a write and check that
nothing acknowledged is lost (tests/cli/test_faults.py).

A crash point is a name in the code where a crash matters: between writing records and
committing them, between the two renames of an index save, and so on. With the environment
variable `MEMORY3_CRASH_AT=NAME` (or `NAME:N`) the process kills itself with SIGKILL the first
(or N-th) time it reaches point NAME: no clean-up runs, as in a power cut or an OOM kill. Without
the variable, `crash_point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal

ENV = "MEMORY3_CRASH_AT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, n = spec.partition(":")
    return name, int(n or 1)


_target = _parse(os.environ.get(ENV))
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process here if `MEMORY3_CRASH_AT` names this point (and this is its N-th visit)."""
    if _target is None or _target[0] != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)
