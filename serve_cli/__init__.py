"""Batch inference over image folders with exported artifacts: `serve_cli predict`."""
