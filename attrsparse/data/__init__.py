"""Data: evaluation tasks (bundled and packaged), calibration text, prompt templates, text metrics."""
