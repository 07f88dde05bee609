"""CPU threads on a shared machine (issue 29, item 10): OpenMP's waiting threads sleep instead of
spinning (``OMP_WAIT_POLICY=PASSIVE``, set by the package before torch loads, unless the user set
it), and a run still uses every core it may run on."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, spam_lightning, torch; "
         "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), "
         "len(os.sched_getaffinity(0)))")


def _probe(probe: str = PROBE, **extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    proc = subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.split()


def test_waiting_threads_sleep_and_every_core_is_used() -> None:
    policy, threads, cores = _probe()
    assert policy == "PASSIVE" and threads == cores


def test_the_users_policy_wins() -> None:
    probe = "import os, spam_lightning; print(os.environ['OMP_WAIT_POLICY'])"
    assert _probe(probe, OMP_WAIT_POLICY="ACTIVE") == ["ACTIVE"]
