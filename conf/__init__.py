"""The Hydra configs (``train.yaml`` and its groups), found as ``pkg://spam_lightning.conf``.

This file makes the folder a package, which Hydra's ``pkg://`` search path requires.
"""
