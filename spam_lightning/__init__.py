"""spam-lightning: classification fine-tuning of GPT-2 with Lightning and Hydra."""

import os as _os

# OpenMP threads (torch's intra-op pool, MKL) that wait for work sleep instead of spinning, unless
# OMP_WAIT_POLICY is set: on a CPU shared with other busy processes, spinning threads take the
# cores the working ones need (a gpt2-tiny epoch trained in 179 s instead of 11 s beside one busy
# process; README "Shared CPUs").
# libgomp reads it once, when torch loads: here, before any of the package imports torch.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
