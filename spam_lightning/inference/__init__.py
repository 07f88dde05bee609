"""Inference without training: the bundle, `spam-classify` and `spam-serve`."""
