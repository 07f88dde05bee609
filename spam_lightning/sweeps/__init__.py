"""Sweeps: the results table of a multirun and DDP inside Hydra multiruns."""
