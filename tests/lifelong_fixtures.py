"""Synthetic lifelong runs shaped exactly like kis_lens.editing.lifelong writes them (one <stem>.json per run), and
legacy lifelong_<editor>.json files of an older kis: the fixtures of the lifelong files, plots and docs tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.editing.runs import run_stem

MODEL = "smollm2-135m"
LAYER = 5
# (n_edits, kind): step 0, probes every 2 edits, full evaluations every 4, 8 edits in all; the last step is a probe.
SCHEDULE = [(0, "eval"), (2, "probe"), (4, "eval"), (6, "probe"), (8, "eval"), (9, "probe")]
EVAL_ONLY = ("paraphrase", "paraphrase_magnitude", "neighborhood", "neighborhood_magnitude", "score", "fluency")


def make_result(
    editor: str,
    collapse: int | None = None,
    n_pairs: int = 12,
    pearson: float | None = 0.8123,
    spearman: float | None = 0.7456,
    scale: float = 1.0,
    schedule: list[tuple[int, str]] = SCHEDULE,
    seed: int = 7,
    legacy: bool = False,
) -> dict[str, Any]:
    """Return one run's <stem>.json dict per the schema; values depend on the editor via scale.

    legacy: as an older kis wrote it (lifelong_<editor>.json, no identity, run stem or editor settings)."""
    steps = []
    for index, (n, kind) in enumerate(schedule):
        step = {
            "n_edits": n,
            "kind": kind,
            "efficacy": None if n == 0 else round(1.0 - 0.05 * index * scale, 4),
            "efficacy_magnitude": None if n == 0 else 0.5 - 0.01 * index,
            "argmax_efficacy": None if n == 0 else 0.9 - 0.02 * index * scale,
            "paraphrase": 0.6 - 0.03 * index * scale,
            "paraphrase_magnitude": 0.2,
            "neighborhood": 0.95 - 0.01 * index * scale,
            "neighborhood_magnitude": 0.1,
            "score": 0.7 - 0.04 * index * scale,
            "fluency": 6.1 - 0.1 * index * scale,
            "perplexity": 20.0 + 3.0 * index * scale,
            "unedited_nll_drift": 0.01 * index * scale,
            "weight_change_norm": 0.5 * index * scale,
            "sigma_max": 30.0 + index,
            "condition_number": 100.0 * (1 + index * scale),
            "predicted_interference": None if n == 0 else 0.1 * index,
            "measured_interference": None if n == 0 else 0.12 * index,
            "accumulated_p2": 0.3 * n * (n - 1),
            "seconds": 1.5 * index,
        }
        if kind == "probe":
            step.update(dict.fromkeys(EVAL_ONLY))
        steps.append(step)
    n_edits = schedule[-1][0]
    edited = editor != "none"
    pairs = {
        "n_edits": [2 + i % 7 for i in range(n_pairs)] if edited else [],
        "case_id": [100 + i for i in range(n_pairs)] if edited else [],
        "predicted": [0.01 * i for i in range(n_pairs)] if edited else [],
        "measured_output": [0.011 * i + 0.001 for i in range(n_pairs)] if edited else [],
        "measured_logprob": [0.02 * (n_pairs - i) for i in range(n_pairs)] if edited else [],
    }
    p2 = None if collapse is None else 0.3 * collapse * (collapse - 1)
    result = {
        "editor": editor,
        "steps": steps,
        "edits": [
            {
                "case_id": 1000 + i,
                "value_steps": 20,
                "value_nll": 0.05,
                "residual_norm": 3.0,
                "newest_efficacy": True,
                "seconds": 0.4,
            }
            for i in range(n_edits if edited else 0)
        ],
        "pairs": pairs,
        "summary": {
            "collapse": {
                "step": collapse,
                "criterion": "retention < 0.5 or perplexity > 2× step 0",
                "retention_threshold": 0.5,
                "perplexity_ratio": 2.0,
                "accumulated_p2_at_collapse": p2,
            },
            "correlations": {
                "predicted_vs_output": {"pearson": pearson, "spearman": spearman, "n": len(pairs["predicted"])},
                "predicted_vs_logprob": {
                    "pearson": None if pearson is None else pearson - 0.2,
                    "spearman": None if spearman is None else spearman - 0.1,
                    "n": len(pairs["predicted"]),
                },
            },
            "final": steps[-1],
            "wall_seconds": 12.5 * scale,
            "seconds_per_edit": 0.4 if edited else None,
            "seconds_per_probe": 0.25,
            "seconds_per_eval": 2.0,
        },
        "settings": {
            "config": {
                "model_name": MODEL,
                "layer": LAYER,
                "n_edits": n_edits,
                "eval_every": 4,
                "probe_every": 2,
                "batch_size": 1,
                "seed": seed,
                "output_dir": "unused",
                "facts": "counterfact-known",
                "unedited_facts": "known-1000",
                "n_unedited": 64,
                "corpus": "wikipedia-vital",
                "max_tokens": 100000,
                "heldout_texts": 16,
                "heldout_tokens": 128,
            },
            "model": {"name": MODEL, "n_layers": 30},
            "facts": [1000 + i for i in range(n_edits)],
            "kis_lens_version": "9.9.9",
            "device": "cpu",
            "threads": 2,
        },
    }
    if not legacy:
        settings = result["settings"]
        config = {key: value for key, value in settings["config"].items() if key != "output_dir"}
        identity = {"editor": editor, "config": config, "facts_sha256": "f" * 64, "kis_lens_version": "9.9.9"}
        settings["identity"] = identity
        settings["run_stem"] = "lifelong_" + run_stem(editor, identity, {"seed": seed, "n": n_edits, "layer": LAYER})
        settings["editor"] = {"name": editor, "label": REGISTRY[editor].label if editor in REGISTRY else editor}
    return result


def file_name(result: dict[str, Any]) -> str:
    """Return the name the run's file has: <stem>.json, or lifelong_<editor>.json for a legacy one."""
    return f"{result['settings'].get('run_stem') or 'lifelong_' + result['editor']}.json"


def standard_results() -> dict[str, dict[str, Any]]:
    """rome collapses at 6, memit at 8, alphaedit never, plus the unedited reference."""
    return {
        "rome": make_result("rome", collapse=6, scale=2.0),
        "memit": make_result("memit", collapse=8, scale=1.5),
        "alphaedit": make_result("alphaedit", collapse=None, scale=0.5, pearson=0.3012, spearman=0.2011),
        "none": make_result("none", collapse=None, scale=0.0, pearson=None, spearman=None),
    }


def write_results(folder: Path, results: dict[str, dict[str, Any]], mtime: int | None = None) -> Path:
    """Write each result as its run's file (with the given modification time, seconds, when one is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    for result in results.values():
        path = folder / file_name(result)
        path.write_text(json.dumps(result), encoding="utf-8")
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return folder


def loaded(results: dict[str, dict[str, Any]], legacy: bool = False) -> dict[str, dict[str, Any]]:
    """Return results as load_lifelong_results marks them (_source, _legacy)."""
    return {e: {**r, "_source": file_name(r), "_legacy": legacy} for e, r in results.items()}


def legacy_results() -> dict[str, dict[str, Any]]:
    """The committed legacy set's shape: "rome" (really p-ROME) collapsing at 6, "memit", "alphaedit", "none"."""
    results = {
        "rome": make_result("rome", collapse=6, scale=2.0, legacy=True, spearman=0.9),
        "memit": make_result("memit", collapse=8, scale=1.5, legacy=True),
        "alphaedit": make_result("alphaedit", scale=0.5, pearson=0.3012, spearman=0.2011, legacy=True),
        "none": make_result("none", scale=0.0, pearson=None, spearman=None, legacy=True),
    }
    for result in results.values():
        result["settings"]["config"].update(covariance_weight=1.0, null_threshold=0.01, null_l2=1.0, value_steps=10)
        result["settings"]["config"]["editors"] = [result["editor"]]
        result["settings"]["prefixes"] = ["a. ", "b. "]
    return results
