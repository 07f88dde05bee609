"""The project's Lightning callbacks, one per file."""

from spam_lightning.training.callbacks.chapter_monitor import ChapterMonitor
from spam_lightning.training.callbacks.checkpoint_io import SafeCheckpointIO, load_checkpoint_safely
from spam_lightning.training.callbacks.rng_state import RNGState
from spam_lightning.training.callbacks.test_dashboard import TestDashboard
from spam_lightning.training.callbacks.trunk_caching import TrunkCaching

__all__ = [
    "ChapterMonitor", "RNGState", "SafeCheckpointIO", "TestDashboard", "TrunkCaching",
    "load_checkpoint_safely",
]
