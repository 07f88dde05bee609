"""Training: the LightningModule, its callbacks, pre-run checks and plots."""
