"""Re-export of kis_lens.editing.plots, the lifelong-editing figures (their home since the editing package)."""

from kis_lens.editing.plots import (
    CONDITION_COLORS,
    CONDITION_LABELS,
    editing_figures,
    interference_figure,
    retention_figure,
    write_editing_figures,
)

__all__ = [
    "CONDITION_COLORS",
    "CONDITION_LABELS",
    "editing_figures",
    "interference_figure",
    "retention_figure",
    "write_editing_figures",
]
