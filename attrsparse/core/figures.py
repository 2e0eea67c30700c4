"""What every figure of attrsparse shares: matplotlib (Agg, loaded on first use), fixed colours
for the paper's metrics, atomic PNG + SVG saving, and tolerant number reading."""

from __future__ import annotations

import math
from pathlib import Path

from .io import atomic_write

#: Display names; the paper's six metrics first, in the row order of its Table 2.
METRIC_LABELS = {
    "gradient": "Gradient",
    "magnitude": "Magnitude",
    "snip": "SNIP/Fisher",
    "ig": "IG",
    "gxo": "GxO",
    "corrected_gxo": "Corrected GxO",
}
_PAPER_COLORS = {
    "gradient": "#7f7f7f",
    "magnitude": "#1f77b4",
    "snip": "#9467bd",
    "ig": "#2ca02c",
    "gxo": "#ff7f0e",
    "corrected_gxo": "#d62728",
}
_EXTRA_COLORS = ["#17becf", "#e377c2", "#8c564b", "#bcbd22", "#000000", "#aec7e8", "#98df8a"]


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend (imported on first use: it is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_label(name: str) -> str:
    return METRIC_LABELS.get(name, name)


def metric_colors(names) -> dict[str, str]:
    """Fixed colours for the paper's metrics, a cycle for the others (in order of appearance)."""
    colors, extra = {}, 0
    for name in names:
        if name in _PAPER_COLORS:
            colors[name] = _PAPER_COLORS[name]
        elif name not in colors:
            colors[name] = _EXTRA_COLORS[extra % len(_EXTRA_COLORS)]
            extra += 1
    return colors


def num(value) -> float:
    """``float(value)``, with ``None`` and non-numbers as NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """Save PNG and SVG atomically (:func:`~attrsparse.core.io.atomic_write`); close the figure."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out_dir / f"{stem}.{ext}"
        atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=130, bbox_inches="tight"))
        paths.append(path)
    pyplot().close(fig)
    return paths
