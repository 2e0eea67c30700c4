"""Where attrsparse keeps its caches (models, kernels, calibration data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of attrsparse's cache: ``$ATTRSPARSE_CACHE``, else ``$XDG_CACHE_HOME/attrsparse``,
    else ``~/.cache/attrsparse``."""
    if env := os.environ.get("ATTRSPARSE_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "attrsparse"
