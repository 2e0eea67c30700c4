"""User-facing errors.

Anything raised as :class:`UserError` is a mistake in the input (unknown model, bad ratio,
missing file, ...). The CLI prints its message as one line on stderr and exits with code 2,
without a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; the message is shown as-is, on one line."""

    exit_code = 2


class UnsupportedArchitectureError(UserError):
    """The model's architecture has no entry in the unit table."""


class CacheError(UserError):
    """A cache file is missing, partial or corrupt and could not be rebuilt."""


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Return ``ratio`` as a float if it lies in (0, 1], else raise :class:`UserError`."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number in (0, 1], got {ratio!r}") from None
    if not (0.0 < value <= 1.0):
        raise UserError(f"{name} must lie in (0, 1], got {value:g}")
    return value
