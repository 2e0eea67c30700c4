"""The foundation every other layer builds on: errors, files, paths, the architecture table,
units and their accounting, hooks, attention, traces, model loading and masked decoding."""

__version__ = "0.1.0"
