"""Hand-made lifelong runs for the study tests: identities, probe steps, edits, whole runs and their files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kis_lens.editing.verdicts import PREDICTORS, rho_alarm


def make_identity(editor: str, seed: int, layer: int, n_edits: int, **config: Any) -> dict[str, Any]:
    """Return a run identity shaped like lifelong_identity.identity_of's (config without the presentation fields)."""
    return {
        "editor": editor,
        "config": {"seed": seed, "layer": layer, "n_edits": n_edits, "probe_every": 10, "value_steps": 4, **config},
        "model_fingerprint": "9928420eb6f4262c",
        "facts_sha256": "facts",
        "unedited_facts_sha256": "unedited",
        "covariance": {str(layer): {"file": f"layer_{layer}_mom2.safetensors", "sha256": f"cov{layer}"}},
        "templates": {"rome": ["{}", f"drawn with seed {seed}. {{}}"]},
        "kis_lens_version": "0.2.0",
    }


def make_steps(n_edits: int, every: int = 10, **columns: Any) -> list[dict[str, Any]]:
    """Return steps at 0, every, 2·every, …, n_edits; a column is a constant or a function of n_edits."""
    counts = sorted({*range(0, n_edits + 1, every), n_edits})
    steps = []
    for n in counts:
        step = {
            "n_edits": n,
            "kind": "eval" if n % (2 * every) == 0 else "probe",
            "efficacy": None if n == 0 else 0.9,
            "retention_oldest_quarter": None if n == 0 else 0.8,
            "perplexity": 20.0 + n,
            "weight_change_norm": 0.1 * n,
            "condition_number": 3.0 + 0.01 * n,
            "sigma_max": 1.0,
            "accumulated_p2": 0.01 * n,
        }
        for name, value in columns.items():
            step[name] = value(n) if callable(value) else value
        steps.append(step)
    return steps


def make_edits(n_edits: int, batch: int = 1, norm: Any = 1.0, succeeded: Any = True) -> list[dict[str, Any]]:
    """Return edits; a batch of edits shares one update and repeats its ‖ΔW‖ (norm: constant or f(update))."""
    edits = []
    for index in range(n_edits):
        update = index // batch
        edits.append(
            {
                "case_id": str(1000 + index),
                "update": update,
                "update_delta_norm": norm(update) if callable(norm) else norm,
                "newest_efficacy": succeeded(index) if callable(succeeded) else succeeded,
                "repeats_edit": None,
                "residual_norm": 1.0,
                "edit_perplexity": 20.0,
            }
        )
    return edits


def make_run(
    editor: str = "rome",
    seed: int = 0,
    layer: int = 4,
    n_edits: int = 40,
    collapse: int | None = None,
    steps: list[dict[str, Any]] | None = None,
    edits: list[dict[str, Any]] | None = None,
    pairs: dict[str, list[Any]] | None = None,
    summary: dict[str, Any] | None = None,
    **config: Any,
) -> dict[str, Any]:
    """Return one run's results dict with the schema's top-level keys; the summary's collapse step is `collapse`."""
    base_summary = {
        "collapse": {"step": collapse, "criterion": "efficacy on all edits so far < 0.5"},
        "collapse_sensitivity": {"perplexity > 2× unedited": collapse, "efficacy on all edits < 0.5": None},
        "disabling_edits": [],
        "rho_alarm": {"n_edits": n_edits, "n_disabling": 0, "note": "ρ is recorded for ROME-family edits only"},
        "prediction_controls": None,
        "prediction_verdict": {"verdict": "not judged", "reasons": ["too few"]},
        "repeated_subjects": {"edits": [], "pairs_left_out": 0},
        "correlations": {"predicted_vs_output": {"n": 3, "pearson": 0.99, "spearman": 0.98}},
        "wall_seconds": 7200.0,
    }
    identity = make_identity(editor, seed, layer, n_edits, **config)
    return {
        "editor": editor,
        "steps": steps if steps is not None else make_steps(n_edits),
        "edits": edits if edits is not None else make_edits(n_edits),
        "pairs": pairs if pairs is not None else {},
        "summary": {**base_summary, **(summary or {})},
        "settings": {
            "config": {**identity["config"], "device": "cpu", "output_dir": "/tmp/x"},
            "identity": identity,
            "run_stem": f"lifelong_{editor}_seed{seed}_n{n_edits}_layer{layer}_0000abcd",
        },
    }


def write_run(folder: Path, run: dict[str, Any], name: str | None = None) -> Path:
    """Write a run as <folder>/layer_<L>/<stem>.json (or name) and return the path."""
    path = folder / f"layer_{run['settings']['config']['layer']}" / (name or f"{run['settings']['run_stem']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run), encoding="utf-8")
    return path


def paired_run(editor: str, seed: int, collapse: int | None, efficacy: float = 0.9, n_edits: int = 40, **kw: Any):
    """Return a run whose efficacy is `efficacy` at every probe and whose perplexity is 20 + n_edits + seed."""
    steps = make_steps(n_edits, efficacy=lambda n: None if n == 0 else efficacy, **kw)
    return make_run(editor, seed, 4, n_edits=n_edits, collapse=collapse, steps=steps)


def rho_run(seed: int, residual_reversed: bool, n_edits: int = 60) -> dict[str, Any]:
    """Return a ROME run whose 6 disabling edits have the lowest ρ, and the lowest ‖v* − Wk‖ when residual_reversed
    (else a residual unrelated to them)."""
    rng = np.random.default_rng(seed)
    for_disabling = [{"n_edits": index + 1} for index in RHO_DISABLING]
    edits = make_edits(n_edits)
    for index, edit in enumerate(edits):
        hit = index in RHO_DISABLING
        edit["rho"] = 0.1 * rng.random() if hit else 0.5 + rng.random()
        if residual_reversed:
            edit["residual_norm"] = 0.01 * rng.random() if hit else 1.0 + rng.random()
        else:
            edit["residual_norm"] = float(rng.random())
    summary = {"disabling_edits": for_disabling, "rho_alarm": rho_alarm(edits, for_disabling, make_steps(n_edits))}
    return make_run("rome", seed, 4, n_edits=n_edits, edits=edits, summary=summary)


RHO_DISABLING = (7, 15, 23, 31, 42, 55)  # edit indices of rho_run's disabling edits


def forgetting_pairs(case: str, n_edits: int = 40, seed: int = 0) -> dict[str, list[Any]]:
    """Return pairs at probes 10, 20, 30, 40 where being lost follows P ("P") or only the later count ("count")."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {name: [] for name in PREDICTORS}
    rows |= {"n_edits": [], "case_id": [], "edit_index": [], "later_same_subject": [], "success_now": []}
    for t in range(10, n_edits + 1, 10):
        for u in range(t):
            predicted = float(rng.random())
            later = t - u - 1
            lost = predicted > 0.7 if case == "P" else later > 12
            rows["n_edits"].append(t)
            rows["case_id"].append(str(1000 + u))
            rows["edit_index"].append(u)
            rows["predicted"].append(predicted)
            rows["later_count"].append(later)
            rows["later_residual_norm"].append(float(np.sqrt(later + 1) * (1 + 0.1 * rng.random())))
            rows["predicted_shuffled"].append(float(rng.random()))
            rows["later_same_subject"].append(1 if u == 3 else 0)  # edit 3's subject is edited again
            rows["success_now"].append(not lost)
    return rows


def nll_pairs(collapse: int, n_edits: int = 40, seed: int = 0) -> dict[str, list[Any]]:
    """Return pairs at probes 10, 20, …: each earlier edit's NLL rise follows P before `collapse`, and only the
    number of later edits from the collapse on (a collapsed model forgets everything, the oldest most)."""
    rng = np.random.default_rng(seed)
    rows = forgetting_pairs("P", n_edits, seed)
    rows["measured_logprob"] = []
    for t, later, predicted in zip(rows["n_edits"], rows["later_count"], rows["predicted"]):
        cause = predicted if t < collapse else later / t
        rows["measured_logprob"].append(float(cause + 0.05 * rng.standard_normal()))
    return rows
