"""The run's log file (Hydra's ``train.log``) beside the terminal: lines printed as the chapter
prints them (no log prefix on the terminal) are written to the log files too."""

from __future__ import annotations

import logging


def to_log_files(message: str, level: int = logging.INFO, name: str = "spam_lightning") -> None:
    """``message`` as a record of logger ``name`` into the file handlers only (``train.log``):
    not the console, which shows it another way (printed, or Hydra's own error line)."""
    logger = logging.getLogger(name)
    record = logger.makeRecord(logger.name, level, __file__, 0, message, None, None)
    handled: set[int] = set()
    while logger is not None:
        for handler in logger.handlers:
            if (isinstance(handler, logging.FileHandler) and record.levelno >= handler.level
                    and id(handler) not in handled):
                handled.add(id(handler))
                handler.handle(record)
        logger = logger.parent if logger.propagate else None


def echo(line: str, name: str = "spam_lightning") -> None:
    """``print(line)`` on the terminal, exactly, and the same line in the run's log files."""
    print(line, flush=True)
    to_log_files(line, logging.INFO, name)
