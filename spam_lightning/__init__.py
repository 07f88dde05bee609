"""spam-lightning: classification fine-tuning of GPT-2 with Lightning and Hydra."""

import os as _os

# OpenMP threads (torch's intra-op pool and MKL, libgomp) that wait for work spin 3,000 times and
# then sleep, instead of libgomp's 300,000: on a CPU shared with a busy process, spinning threads
# take the cores the working ones need (a gpt2-tiny epoch beside one busy process: 28.6 s, now
# 9.5 s; idle: unchanged). Not when OMP_WAIT_POLICY or GOMP_SPINCOUNT is set (README "Shared
# CPUs"). libgomp reads it once, when torch loads: here, before the package imports torch.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__version__ = "0.1.0"
