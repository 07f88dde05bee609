"""spam-lightning: classification fine-tuning of GPT-2 with Lightning and Hydra."""

__version__ = "0.1.0"
