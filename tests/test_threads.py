"""CPU threads on a shared machine (issue 29, item 10): OpenMP's waiting threads spin briefly,
then sleep (``GOMP_SPINCOUNT=3000``, set by the package before torch loads unless the user set it
or ``OMP_WAIT_POLICY``), and a run still uses every core it may run on."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = ("import os, spam_lightning, torch; "
         "print(os.environ.get('GOMP_SPINCOUNT'), torch.get_num_threads(), "
         "len(os.sched_getaffinity(0)))")
ENV_ONLY = "import os, spam_lightning; print(os.environ.get('GOMP_SPINCOUNT'))"


def _probe(probe: str = PROBE, **extra: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_"))}
    proc = subprocess.run([sys.executable, "-c", probe], env={**env, **extra},
                          capture_output=True, text=True, timeout=120, check=True)
    return proc.stdout.split()


def test_waiting_threads_spin_briefly_and_every_core_is_used() -> None:
    spins, threads, cores = _probe()
    assert spins == "3000" and threads == cores


def test_the_users_setting_wins() -> None:
    assert _probe(ENV_ONLY, OMP_WAIT_POLICY="PASSIVE") == ["None"]
    assert _probe(ENV_ONLY, GOMP_SPINCOUNT="300000") == ["300000"]
