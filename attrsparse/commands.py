"""Registration of the heavier sub-commands (sweep, dependency, ...), kept out of cli.py."""

from __future__ import annotations


def register_commands(sub) -> None:
    """Add the experiment commands to the CLI's sub-parsers (imports stay lazy)."""
    return None
