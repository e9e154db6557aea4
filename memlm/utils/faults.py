"""Test-only fault injection, so crash and NaN handling can be tested deterministically.

Set ``MEMLM_FAULT=<point>@<step>`` (comma-separate several) in a test's environment; :func:`should_fail` is true at
that point of that training step. Points used by the code:

- ``kill_in_save``: SIGKILL the process after the checkpoint of global step ``<step>`` is written to its temp file but
  before it is renamed into place (the worst moment for a crash).
- ``nan_grad``: put a NaN into one gradient at step ``<step>`` (1-based, the numbering of ``train_losses.json``).

Unset (the normal case) this costs one environment lookup per call.
"""

from __future__ import annotations

import os
import signal

ENV = "MEMLM_FAULT"


def should_fail(point: str, step: int) -> bool:
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        name, _, at = item.strip().partition("@")
        if name == point and (not at or int(at) == step):
            return True
    return False


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
