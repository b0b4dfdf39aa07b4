"""Deployable artifacts from training checkpoints: `python -m export`."""
