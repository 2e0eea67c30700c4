"""Selectors: turn scores or live activations into keep-masks at a target ratio."""
