"""Thin launcher: `python train.py <hydra overrides>` (same as the `spam-train` command)."""

from spam_lightning.train import main

if __name__ == "__main__":
    main()
