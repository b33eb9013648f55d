"""The editing results of a matrices run: every edit simulation and lifelong run under its output dir that belongs
to it (kis_lens.layout.belongs_to_run), and the report sections that show them (`kis all --report`, `kis report`).

>>> write_report_files(result, sections=[run_report_sections])  # kis_lens.report: the run's report with them
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from kis_lens.editing.lifelong_files import lifelong_run_groups, load_lifelong_results
from kis_lens.editing.lifelong_report import lifelong_sections
from kis_lens.editing.simulation_plots import edit_simulation_sections
from kis_lens.io import load_json_object
from kis_lens.layout import EDIT_SIM_RUN_FIELDS, belongs_to_run, find_edit_sims, find_lifelong_folders
from kis_lens.report import ReportSection
from kis_lens.results import RunResult


@dataclass
class RunEditingResults:
    """Every editing result that belongs to one matrices run, as the report shows them."""

    edit_sims: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)  # (edit_sim.json, its contents)
    lifelong: list[tuple[Path, dict[str, dict[str, Any]]]] = field(default_factory=list)  # (layer_<L>, runs by editor)


def results_of_run(run_settings: Mapping[str, Any]) -> RunEditingResults:
    """Return every edit simulation and set of lifelong runs under a run's output dir that belongs to the run.

    A simulation belongs when it ran on the run's model, facts source and corpus; lifelong runs edit their own facts
    with their own C, so the model alone. A lifelong folder holding runs of several settings gives one entry per
    set, the newest first, so none is left out."""
    model = (run_settings.get("model") or {}).get("name")
    if not model:
        return RunEditingResults()
    output_dir = (run_settings.get("config") or {}).get("output_dir", "")
    found = RunEditingResults()
    for path in find_edit_sims(output_dir, model):
        saved = load_json_object(path, "rerun `kis edit-sim` with the settings that wrote it, or delete it")
        if belongs_to_run(saved.get("settings") or {}, run_settings, EDIT_SIM_RUN_FIELDS):
            found.edit_sims.append((path, saved))
    for folder in find_lifelong_folders(output_dir, model):
        for stems in lifelong_run_groups(folder):
            results = {
                editor: result
                for editor, result in load_lifelong_results(folder, stems=stems).items()
                if belongs_to_run(result.get("settings") or {}, run_settings)
            }
            if results:
                found.lifelong.append((folder, results))
    return found


def run_report_sections(result: RunResult) -> list[ReportSection]:
    """Return the report sections of a run's own editing results: its edit simulations, then its lifelong runs."""
    found = results_of_run(result.settings)
    sections = edit_simulation_sections(found.edit_sims)
    for folder, results in found.lifelong:
        sections.extend(lifelong_sections(results, source=folder))
    return sections
