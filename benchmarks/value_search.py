"""The value search and the editors on SmolLM2-135M, layer 4: is the fast search exact, how much faster, and what
does one edit of each editor cost?

1. For each of ``--facts`` CounterFact records, ROME's compute_v (21 seeded context templates, 20 steps, ROME's
   stopping rule) runs with the plain hooked forward ("full") and with the exact fast forward
   (kis_lens.editing.shifted_forward), alternately, in one process; reports δ's relative difference and the
   times. To compare like with like, both also run with the stopping rule off (all 20 steps).
2. One update of every registered editor (rome, r-rome, p-rome, emmet and none on one fact each; memit and
   alphaedit on a batch) on the same model with C from ``--max_tokens`` corpus tokens: seconds per edit.

    .venv/bin/python benchmarks/value_search.py            # writes benchmarks/results/value_search.json

Timings are wall-clock on this machine with ``--threads`` torch threads; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from kis_lens.config import CorpusOptions
from kis_lens.editing.counterfact import load_cases
from kis_lens.editing.registry import EDITORS, EditorSettings, EditSession
from kis_lens.editing.templates import rome_context_templates
from kis_lens.editing.values import ValueSearch, compute_target
from kis_lens.models import load_model
from kis_lens.runner import ensure_covariances
from kis_lens.w_out import output_weight

RESULTS = Path(__file__).parent / "results"


def _timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def value_search_comparison(model, layer: int, facts, templates, stop: bool) -> list[dict]:
    """Return per fact: full and fast seconds, steps and δ's relative difference."""
    rows = []
    search = ValueSearch() if stop else ValueSearch(stop_loss=-1.0)  # a negative threshold never stops early
    for fact in facts:
        fast, fast_seconds = _timed(lambda: compute_target(model, layer, fact, templates, search))  # noqa: B023
        full, full_seconds = _timed(
            lambda: compute_target(model, layer, fact, templates, replace(search, fast=False))  # noqa: B023
        )
        difference = float((fast.delta - full.delta).norm() / full.delta.norm())
        rows.append(
            {
                "case_id": fact.case_id,
                "full_seconds": round(full_seconds, 3),
                "fast_seconds": round(fast_seconds, 3),
                "speedup": round(full_seconds / fast_seconds, 2),
                "steps_full": full.steps,
                "steps_fast": fast.steps,
                "delta_relative_difference": difference,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def editor_costs(model, layer: int, covariances, facts, batch: int, templates) -> dict[str, dict]:
    """Return seconds per edit of one update of every registered editor (weights restored after each)."""
    settings = EditorSettings(layer=layer)
    layers = sorted(covariances)
    saved = {each: output_weight(model, each).weight.detach().clone() for each in layers}
    costs = {}
    for name, editor in EDITORS.items():
        session = EditSession.create(model, settings, covariances, editors=[name], rome_templates=templates)
        chosen = facts[:batch] if editor.batches else facts[:1]
        record, seconds = _timed(lambda: editor.update(session, chosen))  # noqa: B023
        costs[name] = {
            "facts": len(chosen),
            "seconds": round(seconds, 2),
            "seconds_per_edit": round(seconds / len(chosen), 2),
            "value_steps": [target.steps for target in record.targets if target is not None],
            "layers": sorted(record.deltas),
        }
        print(name, json.dumps(costs[name]), flush=True)
        with torch.no_grad():
            for each in layers:
                output_weight(model, each).weight.copy_(saved[each])
    return costs


def main() -> None:
    """Run both parts and write benchmarks/results/value_search.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--facts", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="facts per MEMIT/AlphaEdit/emmet update")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max_tokens", type=int, default=20_000, help="corpus tokens for C (cost is unaffected)")
    parser.add_argument("--output_dir", default="results")
    parser.add_argument("--skip_editors", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    facts = [case.fact for case in load_cases("counterfact-known")[: max(args.facts, args.batch)]]
    templates, template_seconds = _timed(lambda: rome_context_templates(model))
    result = {
        "model": args.model,
        "layer": args.layer,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "templates": len(templates),
        "template_generation_seconds": round(template_seconds, 2),
        "with_stopping_rule": value_search_comparison(model, args.layer, facts[: args.facts], templates, True),
        "all_20_steps": value_search_comparison(model, args.layer, facts[: args.facts], templates, False),
    }
    for name in ("with_stopping_rule", "all_20_steps"):
        rows = result[name]
        result[f"{name}_summary"] = {
            "median_full_seconds": statistics.median(row["full_seconds"] for row in rows),
            "median_fast_seconds": statistics.median(row["fast_seconds"] for row in rows),
            "median_speedup": statistics.median(row["speedup"] for row in rows),
            "max_delta_relative_difference": max(row["delta_relative_difference"] for row in rows),
        }
    if not args.skip_editors:
        settings = EditorSettings(layer=args.layer)
        layers = sorted({args.layer, *settings.memit_layers})
        run_config = CorpusOptions(
            model_name=args.model, output_dir=args.output_dir, max_tokens=args.max_tokens, progress=False
        )
        covariances, _ = ensure_covariances(run_config, model, layers)
        result["covariance_tokens"] = args.max_tokens
        result["editors"] = editor_costs(model, args.layer, covariances, facts, args.batch, templates)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "value_search.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k.endswith("summary")}, indent=2))


if __name__ == "__main__":
    main()
