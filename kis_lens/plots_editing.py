"""Re-export of kis_lens.editing.simulation_plots, the edit simulation's figures (their old import path)."""

from kis_lens.editing.simulation_plots import (
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
