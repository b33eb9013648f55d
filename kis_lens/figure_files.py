"""Write Plotly figures as files that open offline: interactive HTML loading plotly.min.js from beside it (never a
CDN), and a PNG where Plotly's static export works.

>>> write_figure_files(fig, "figures/p_heatmaps.html")   # figures/p_heatmaps.html, .png and plotly.min.js
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from kis_lens.io import atomic_write

PLOTLY_BUNDLE = "plotly.min.js"  # written once per figures folder: the HTML loads it from beside itself, offline


def write_plotly_bundle(folder: str | Path) -> Path:
    """Write Plotly's JavaScript into folder unless the same bundle is already there; return its path."""
    bundle, script = Path(folder) / PLOTLY_BUNDLE, get_plotlyjs()
    if not bundle.is_file() or bundle.read_text(encoding="utf-8") != script:
        atomic_write(bundle, lambda temp: temp.write_text(script, encoding="utf-8"))
    return bundle


def write_figure_files(figure: go.Figure, html: str | Path, png: bool = True) -> dict[str, str | None]:
    """Write a figure as interactive HTML (Plotly from plotly.min.js beside it, never a CDN) and, when png and
    Plotly's static export (kaleido) works, a PNG beside it; return {"html": path, "png": path or None}."""
    html = Path(html)
    html.parent.mkdir(parents=True, exist_ok=True)
    write_plotly_bundle(html.parent)
    # The file's stem as the div id (Plotly draws a random one): a figure redrawn unchanged is the same bytes.
    text = figure.to_html(include_plotlyjs="directory", full_html=True, div_id=html.stem)
    atomic_write(html, lambda temp: temp.write_text(text, encoding="utf-8"))
    if not png:
        return {"html": str(html), "png": None}
    image: str | None = str(html.with_suffix(".png"))
    try:
        atomic_write(image, lambda temp: figure.write_image(str(temp), format="png", width=1000, scale=1))
    except Exception:  # noqa: BLE001 - kaleido or its browser missing: the HTML is still there
        image = None
    return {"html": str(html), "png": image}


def write_html_figures(figures: Mapping[str, go.Figure], folder: str | Path) -> dict[str, Path]:
    """Write each figure as HTML into folder (write_figure_files, no PNG); return {name: path}."""
    return {
        name: Path(write_figure_files(figure, Path(folder) / f"{name}.html", png=False)["html"])
        for name, figure in figures.items()
    }
