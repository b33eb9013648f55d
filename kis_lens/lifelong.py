"""Re-export of kis_lens.editing.simulation, the lifelong-editing simulation (its home since the editing package)."""

from kis_lens.editing.simulation import (
    CONDITIONS,
    EDIT_SIM_FILE,
    EDIT_SIM_FOLDER,
    EditSimConfig,
    EditSimResult,
    belongs_to_run,
    edit_sim_dir,
    edit_sims_of_run,
    find_edit_sims,
    run_edit_simulation,
)

__all__ = [
    "CONDITIONS",
    "EDIT_SIM_FILE",
    "EDIT_SIM_FOLDER",
    "EditSimConfig",
    "EditSimResult",
    "belongs_to_run",
    "edit_sim_dir",
    "edit_sims_of_run",
    "find_edit_sims",
    "run_edit_simulation",
]
