"""Lookup by name with a "did you mean" hint: the registries of scores, selectors and tasks."""

from __future__ import annotations

import difflib

from .errors import UserError


def lookup(registry: dict, name: str, what: str):
    """``registry[name]``, else a :class:`UserError` naming the closest match and the choices."""
    if name in registry:
        return registry[name]
    close = difflib.get_close_matches(name, list(registry), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown {what} '{name}'{hint} (available: {', '.join(registry)})")
