"""Benchmark: the original per-pair algorithm versus kis_lens, same model, facts and covariance.

The original scripts, for every layer and every ordered pair (i, j), ran the model on fact i and on
fact j to read k_i and k_j (one full forward per fact per pair, no batching), then computed
P[i, j] = k_iᵀ C⁻¹ k_j / k_iᵀ C⁻¹ k_i with an explicit inverse of C. ``reference_p_matrix`` below
does exactly that (it even inverts C only once per layer, which favours the original). kis_lens
reads all keys of all layers from one batched, early-stopped forward per batch of facts and gets P
from one Cholesky solve per layer.

Where the original loop would take longer than ``--budget_s`` for an N, it runs the first pairs in
the original's row-major order within the budget, checks those entries, and extrapolates its wall
time from the measured time per pair; the table says which numbers are extrapolated.

    nice -n 10 python benchmarks/matrices.py --sizes 8 16 32 64 128
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from kis_lens.facts import Fact, load_facts
from kis_lens.hooks import gather_positions, layer_range, mlp_in_hook_name
from kis_lens.io import atomic_write, save_json
from kis_lens.keys import compute_keys, locate_subject
from kis_lens.matrices import Whitener, p_matrix
from kis_lens.models import load_model, model_device, model_info, tokenizer_adds_bos

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def reference_key(model: Any, fact: Fact, prepend_bos: bool, captured: dict[str, Tensor]) -> Float[Tensor, " d_mlp"]:
    """Return one fact's key the original way: a full, unbatched forward of that prompt alone (hook already attached)."""
    located = locate_subject(model.tokenizer, fact, prepend_bos)
    captured["position"] = torch.tensor([located.subject_last])
    with torch.no_grad():
        model(torch.tensor([located.ids], device=model_device(model)))  # the whole model runs, logits included
    return captured.pop("key").double().cpu()


def reference_p_entry(k_i: Float[Tensor, " d"], k_j: Float[Tensor, " d"], c_inverse: Float[Tensor, "d d"]) -> float:
    """Return k_iᵀ C⁻¹ k_j / k_iᵀ C⁻¹ k_i with an explicit inverse."""
    return float((k_i @ c_inverse @ k_j) / (k_i @ c_inverse @ k_i))


def reference_p_matrix(
    model: Any,
    facts: Sequence[Fact],
    layer: int,
    covariance: Float[Tensor, "d d"],
    prepend_bos: bool,
    max_pairs: int | None = None,
) -> tuple[Float[Tensor, "fact fact"], int]:
    """Return the original per-pair P of one layer (NaN where not computed) and how many pairs were run."""
    n = len(facts)
    c_inverse = torch.linalg.inv(covariance.double().cpu())
    result = torch.full((n, n), float("nan"), dtype=torch.float64)
    captured: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> Tensor:
        captured["key"] = gather_positions(activation, captured["position"])[0].detach()
        return activation

    pairs = 0
    # The hook stays attached for the whole loop, so the original pays for forwards only, not hook set-up.
    with model.hooks(fwd_hooks=[(mlp_in_hook_name(layer), keep)]):
        for i in range(n):
            for j in range(n):
                if max_pairs is not None and pairs >= max_pairs:
                    return result, pairs
                k_i = reference_key(model, facts[i], prepend_bos, captured)
                k_j = reference_key(model, facts[j], prepend_bos, captured)
                result[i, j] = reference_p_entry(k_i, k_j, c_inverse)
                pairs += 1
    return result, pairs


def kis_lens_p_matrices(
    model: Any, facts: Sequence[Fact], layers: Sequence[int], covariances: dict[int, Tensor], prepend_bos: bool
) -> dict[int, Float[Tensor, "fact fact"]]:
    """Return P for every layer the kis_lens way: keys once for all layers, one Cholesky per layer."""
    keys = compute_keys(model, facts, layers, prepend_bos=prepend_bos)
    return {layer: p_matrix(keys.at_layer(layer).double(), Whitener.from_covariance(covariances[layer])) for layer in layers}


@dataclass
class Row:
    """One N of the benchmark."""

    n_facts: int
    kis_all_layers_s: float
    kis_one_layer_s: float
    original_one_layer_s: float
    original_all_layers_s: float
    original_pairs_run: int
    original_extrapolated: bool
    max_abs_diff: float

    def speedup_all_layers(self) -> float:
        """Return original / kis_lens wall time over all layers."""
        return self.original_all_layers_s / self.kis_all_layers_s

    def speedup_one_layer(self) -> float:
        """Return original / kis_lens wall time for one layer."""
        return self.original_one_layer_s / self.kis_one_layer_s


def timed(function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Return (function(*args), seconds)."""
    started = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - started


def median_timed(repeats: int, function: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Return (function(*args), median seconds over repeats runs)."""
    runs = [timed(function, *args) for _ in range(repeats)]
    seconds = sorted(run[1] for run in runs)
    return runs[-1][0], seconds[len(seconds) // 2]


def covariances_for(model: Any, layers: Sequence[int], output_dir: str, cov_tokens: int) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """Return {layer: C}: the `kis reproduce` caches under output_dir when present, else kis_lens caches on cov_tokens tokens."""
    from kis_lens.reproduce import load_half_moments, merged
    from kis_lens.runner import RunConfig, ensure_covariances
    from kis_lens.storage import read_metadata, stats_path

    halves = load_half_moments(output_dir, model, layers, any_budget=True)
    if halves is not None:
        moments = {layer: merged(halves["half1"][layer], halves["half2"][layer]) for layer in layers}
        tokens = moments[layers[0]].count
        return {layer: moment.compute(torch.float64) for layer, moment in moments.items()}, {"tokens": tokens, "corpus": "wikipedia-offline (kis reproduce cache)"}
    config = RunConfig(model_name=model_info(model).name, output_dir=output_dir, max_tokens=cov_tokens, progress=True)
    covariances = ensure_covariances(config, model, layers)
    metadata = read_metadata(stats_path(output_dir, model_info(model).name, config.corpus, layers[0]))
    return covariances, {"tokens": metadata.get("count"), "corpus": metadata.get("corpus")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Return the benchmark's rows and settings after printing them as they come."""
    torch.manual_seed(0)
    model = load_model(args.model_name, device=args.device, dtype=args.dtype)
    info = model_info(model)
    prepend_bos = tokenizer_adds_bos(model)
    layers = layer_range(model)
    layer = args.layer if args.layer is not None else layers[len(layers) // 2]
    covariances, cov_info = covariances_for(model, layers, args.output_dir, args.cov_tokens)
    facts = load_facts(args.facts)[: max(args.sizes)]
    print(f"{info.name}: {info.n_layers} layers, d_mlp {info.d_mlp}; covariance from {cov_info['tokens']} tokens; "
          f"reference layer {layer}; device {model_device(model)}, dtype {args.dtype}")
    # Warm-up so that neither side pays one-time costs (allocations, kernels) inside its timing.
    kis_lens_p_matrices(model, facts[:4], [layer], covariances, prepend_bos)
    _, warm_seconds = timed(reference_p_matrix, model, facts[:2], layer, covariances[layer], prepend_bos)
    per_pair = warm_seconds / 4
    rows: list[Row] = []
    for n in args.sizes:
        chosen = facts[:n]
        all_p, kis_all = median_timed(args.repeats, kis_lens_p_matrices, model, chosen, layers, covariances, prepend_bos)
        one_p, kis_one = median_timed(args.repeats, kis_lens_p_matrices, model, chosen, [layer], covariances, prepend_bos)
        # Run the original in full when the last measured time per pair says it fits the budget.
        full = per_pair * n * n <= args.budget_s
        max_pairs = None if full else max(4, int(args.budget_s / per_pair))
        (ref_p, pairs), ref_time = timed(reference_p_matrix, model, chosen, layer, covariances[layer], prepend_bos, max_pairs)
        original_one = ref_time if full else ref_time / pairs * n * n
        per_pair = ref_time / pairs
        done = ~torch.isnan(ref_p)
        diff = float((ref_p[done] - one_p[layer][done]).abs().max())
        diff = max(diff, float((one_p[layer] - all_p[layer]).abs().max()))
        row = Row(n, kis_all, kis_one, original_one, original_one * len(layers), pairs, not full, diff)
        rows.append(row)
        print(f"N={n:4d}  kis_lens all {len(layers)} layers {kis_all:8.3f} s | one layer {kis_one:7.3f} s  ||  original one layer "
              f"{original_one:9.1f} s{' (extrapolated from %d pairs)' % pairs if not full else ''}, all layers "
              f"{row.original_all_layers_s:10.1f} s  ||  speed-up {row.speedup_all_layers():9.0f}x (all layers), "
              f"{row.speedup_one_layer():8.0f}x (one layer)  max|ΔP| {diff:.2e}", flush=True)
    return {
        "model": info.name,
        "n_layers": info.n_layers,
        "d_mlp": info.d_mlp,
        "device": str(model_device(model)),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() and "cuda" in str(model_device(model)) else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "reference_layer": layer,
        "covariance": cov_info,
        "facts": args.facts,
        "budget_s": args.budget_s,
        "kis_lens_repeats": args.repeats,
        "rows": [dict(vars(row), speedup_all_layers=row.speedup_all_layers(), speedup_one_layer=row.speedup_one_layer()) for row in rows],
    }


def scaling_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """Return the least-squares slope of log(time) against log(N)."""
    x = torch.log(torch.tensor(sizes, dtype=torch.float64))
    y = torch.log(torch.tensor(seconds, dtype=torch.float64))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x * x).sum())


def markdown(report: dict[str, Any]) -> str:
    """Return the results as a Markdown table with a short reading guide."""
    rows = report["rows"]
    sizes = [row["n_facts"] for row in rows]
    lines = [
        f"# P matrix: original per-pair algorithm vs kis_lens ({report['model']}, {report['device']}, {report['dtype']})",
        "",
        f"Same model, facts (first N of `{report['facts']}`) and covariance ({report['covariance']['tokens']} tokens "
        f"of {report['covariance']['corpus']}); {report['n_layers']} layers, d_mlp {report['d_mlp']}, "
        f"{report['torch_threads']} torch threads on {report['device_name']}.",
        f"The original is timed on layer {report['reference_layer']} and multiplied by {report['n_layers']} for all layers "
        "(its per-pair forward costs the same at every layer). Rows marked * ran only the first pairs of the original "
        f"(within {report['budget_s']} s) and extrapolate its time as N² × measured time per pair. kis_lens times are the "
        f"median of {report.get('kis_lens_repeats', 1)} run(s) and include keys for all N facts, one Cholesky per layer and P; "
        "neither side includes model loading or the covariance estimate.",
        "",
        "| N | kis_lens, all layers (s) | original, all layers (s) | speed-up, all layers | kis_lens, one layer (s) | original, one layer (s) | speed-up, one layer | pairs run | max abs ΔP |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        star = "*" if row["original_extrapolated"] else ""
        lines.append(
            f"| {row['n_facts']} | {row['kis_all_layers_s']:.3f} | {row['original_all_layers_s']:.1f}{star} | "
            f"{row['speedup_all_layers']:.0f}× | {row['kis_one_layer_s']:.3f} | {row['original_one_layer_s']:.1f}{star} | "
            f"{row['speedup_one_layer']:.0f}× | {row['original_pairs_run']} / {row['n_facts'] ** 2} | {row['max_abs_diff']:.1e} |"
        )
    spent = [row["original_one_layer_s"] * row["original_pairs_run"] / row["n_facts"] ** 2 for row in rows]
    pooled = sum(spent) / sum(row["original_pairs_run"] for row in rows)
    lines += ["", f"Pooled over every pair run ({sum(row['original_pairs_run'] for row in rows)} pairs), the original costs "
              f"{pooled:.3f} s per pair (two full forwards). With that one per-pair cost for every N, the original over all "
              f"{report['n_layers']} layers would take: "
              + ", ".join(f"N={row['n_facts']}: {pooled * row['n_facts'] ** 2 * report['n_layers']:,.0f} s "
                          f"({pooled * row['n_facts'] ** 2 * report['n_layers'] / row['kis_all_layers_s']:,.0f}× kis_lens)" for row in rows)
              + "."]
    if len(rows) > 1:
        kis = scaling_exponent(sizes, [row["kis_all_layers_s"] for row in rows])
        original = scaling_exponent(sizes, [row["original_one_layer_s"] for row in rows])
        lines += ["", f"Scaling with N (log-log slope of wall time): original {original:.2f} (2N² forwards per layer; rows marked * are "
                  f"N² × time per pair, quadratic by construction), kis_lens {kis:.2f} (N forwards in batches for all layers at once, "
                  "plus one N×N Gram matrix per layer)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/matrices_{model}_{device}.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--facts", default="counterfact-known")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--layer", type=int, default=None, help="layer the original is timed on (default the middle one)")
    parser.add_argument("--budget_s", type=float, default=60.0, help="most seconds the original loop runs per N")
    parser.add_argument("--repeats", type=int, default=1, help="kis_lens timings are the median of this many runs")
    parser.add_argument("--cov_tokens", type=int, default=20_000, help="tokens for the covariance when no cache exists")
    parser.add_argument("--output_dir", default="results", help="where kis_lens covariance caches are read/written")
    parser.add_argument("--results_dir", default=str(RESULTS_DIR))
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    report = run(args)
    stem = Path(args.results_dir) / f"matrices_{report['model']}_{report['device'].split(':')[0]}"
    save_json(stem.with_suffix(".json"), report)
    text = markdown(report)
    atomic_write(stem.with_suffix(".md"), lambda temp: temp.write_text(text, encoding="utf-8"))
    print(text)
    print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
