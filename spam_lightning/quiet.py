"""Third-party notices that are not a user's concern, quieted in one place (each by its own
message; every other warning and log line still shows). ``quiet()`` runs when
``spam_lightning.train`` is imported, before the Trainer is built."""

from __future__ import annotations

import logging
import warnings

# Python warnings: (message regex, why it is not the user's concern)
WARNINGS = {
    # Lightning's own _pytree.py asks torch a deprecated question on every run (Lightning's to fix)
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "Lightning internals",
}

# log records: logger -> message prefixes dropped from it
LOG_RECORDS = {
    # advertisements for Lightning's cloud services (litlogger, litmodels), on every run
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),
}


class _Drop(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet() -> None:
    """Install the filters (idempotent)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, prefixes in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(prefixes))
