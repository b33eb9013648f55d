"""Benchmark: the original per-pair algorithm versus kis_lens, same model, facts and covariance.

Full run, from the repository root (the settings of the committed benchmarks/results/matrices_smollm2-135m_cpu.json),
then the README numbers:

    nice -n 10 .venv/bin/python benchmarks/matrices.py --sizes 8 16 32 64 128 --budget_s 20 --repeats 3
    .venv/bin/python benchmarks/render.py

C comes from the `kis reproduce` caches under --output_dir (default ./results) when present (the committed
run's: 24,050 tokens), else from kis_lens caches on --cov_tokens tokens; the JSON records which.

The original (`Compute_PMatrix.py` of ChenhuiHu/knowledge_in_superposition), per layer: C⁻¹ is inverted
once (explicitly, then cached); for every row i it runs the model on fact i twice, once for C⁻¹k_i
(`compute_C_k`) and once for k_i (`compute_k`); for every column j once more on fact j for k_j, and sets
P[i, j] = (C⁻¹k_i)ᵀk_j / (C⁻¹k_i)ᵀk_i. That is N² + 2N full, unbatched forwards per layer, each for one
prompt. ``reference_p_matrix`` below does exactly that work and counts it (forwards, inverses, C⁻¹k
products); the benchmark stops if a count differs from N² + 2N forwards and one inverse per layer, and
records the counts. kis_lens reads all keys of all layers from one batched, early-stopped forward per
batch of facts and gets P from one Cholesky solve per layer.

Where the original loop would take longer than ``--budget_s`` for an N, it runs the first entries in the
original's row-major order within the budget, checks those entries, and extrapolates its wall time as the
inverse's time + (N² + 2N) × the measured time per forward; that row's forward count comes from the same
loop run in full with the model's forward stubbed out. The table says which numbers are extrapolated.
Smoke test (under a minute; exercises full and extrapolated rows, writes only under /tmp/kis-smoke):

    .venv/bin/python benchmarks/matrices.py --model_name tiny-gpt2 --sizes 2 4 8 --budget_s 0.1 --cov_tokens 2000 \
        --output_dir /tmp/kis-smoke/cache --results_dir /tmp/kis-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
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
from kis_lens.models import load_model, model_device, model_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _load_render() -> Any:
    """Return benchmarks/render.py, which owns the Markdown (loaded by path: benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "kis_benchmarks_render", Path(__file__).resolve().with_name("render.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()
scaling_exponent = render.scaling_exponent
markdown = render.matrices_markdown


@dataclass
class OriginalWork:
    """What one run of the original's loop did, counted as it ran."""

    forwards: int = 0  # full, unbatched model forwards, one prompt each
    inversions: int = 0  # explicit inverses of C
    inverse_products: int = 0  # C⁻¹k_i products
    entries: int = 0  # P entries filled
    inverse_s: float = 0.0  # wall seconds of the inversions


def original_loop(
    n: int,
    key_of: Callable[[int], Float[Tensor, " d"]],
    covariance: Float[Tensor, "d d"],
    max_pairs: int | None = None,
) -> tuple[Float[Tensor, "fact fact"], OriginalWork]:
    """Run the original Compute_PMatrix.py loop for one layer: P (NaN where not reached) and the work counted.

    key_of(i) is one forward on fact i; every call is counted as a forward. The loop stops before the entry that
    would exceed max_pairs entries (row-major order).
    """
    work = OriginalWork()

    def forward(index: int) -> Float[Tensor, " d"]:
        work.forwards += 1
        return key_of(index)

    started = time.perf_counter()
    c_inverse = torch.linalg.inv(covariance.double().cpu())  # get_inv_cov: once per layer, then cached
    work.inversions += 1
    work.inverse_s = time.perf_counter() - started
    result = torch.full((n, n), float("nan"), dtype=torch.float64)
    for i in range(n):
        if max_pairs is not None and work.entries >= max_pairs:
            break
        c_k_i = c_inverse @ forward(i)  # compute_C_k: a forward, then C⁻¹k, normalised
        c_k_i = c_k_i / c_k_i.norm()
        work.inverse_products += 1
        k_i = forward(i)  # compute_k: the same fact's key again, from another forward
        for j in range(n):
            if max_pairs is not None and work.entries >= max_pairs:
                break
            k_j = forward(j)  # compute_k for every column
            result[i, j] = float((c_k_i @ k_j) / (c_k_i @ k_i))
            work.entries += 1
    return result, work


def count_original_work(n: int) -> OriginalWork:
    """Return the work of the original's full loop for n facts, counted with the model's forward stubbed out."""
    return original_loop(n, lambda index: torch.ones(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64))[1]


def reference_key(model: Any, fact: Fact, prepend_bos: bool, captured: dict[str, Tensor]) -> Float[Tensor, " d_mlp"]:
    """Return one fact's key the original way: one full, unbatched forward of that prompt alone (hook attached)."""
    located = locate_subject(model.tokenizer, fact, prepend_bos)
    captured["position"] = torch.tensor([located.subject_last])
    with torch.no_grad():
        model(torch.tensor([located.ids], device=model_device(model)))  # the whole model runs, logits included
    return captured.pop("key").double().cpu()


def reference_p_matrix(
    model: Any,
    facts: Sequence[Fact],
    layer: int,
    covariance: Float[Tensor, "d d"],
    prepend_bos: bool,
    max_pairs: int | None = None,
) -> tuple[Float[Tensor, "fact fact"], OriginalWork]:
    """Return the original's P of one layer (NaN where not computed) and the work it did, counted."""
    captured: dict[str, Tensor] = {}

    def keep(activation: Tensor, hook: Any) -> Tensor:
        captured["key"] = gather_positions(activation, captured["position"])[0].detach()
        return activation

    # The hook stays attached for the whole loop, so the original pays for forwards only, not hook set-up.
    with model.hooks(fwd_hooks=[(mlp_in_hook_name(layer), keep)]):
        return original_loop(
            len(facts), lambda index: reference_key(model, facts[index], prepend_bos, captured), covariance, max_pairs
        )


def kis_lens_p_matrices(
    model: Any, facts: Sequence[Fact], layers: Sequence[int], covariances: dict[int, Tensor], prepend_bos: bool
) -> dict[int, Float[Tensor, "fact fact"]]:
    """Return P for every layer the kis_lens way: keys once for all layers, one Cholesky per layer."""
    keys = compute_keys(model, facts, layers, prepend_bos=prepend_bos)
    return {
        layer: p_matrix(keys.at_layer(layer).double(), Whitener.from_covariance(covariances[layer])) for layer in layers
    }


@dataclass
class Row:
    """One N of the benchmark."""

    n_facts: int
    kis_all_layers_s: float
    kis_one_layer_s: float
    original_one_layer_s: float
    original_all_layers_s: float
    original_extrapolated: bool
    original_timed_s: float  # wall seconds of the original's loop as run (the budget's share when extrapolated)
    forwards_per_layer: int  # counted over the full loop: the timed run if complete, else the stubbed one
    inversions_per_layer: int
    inverse_products_per_layer: int
    forwards_run: int  # counted in the timed run
    entries_run: int
    inverse_s: float
    max_abs_diff: float

    def speedup_all_layers(self) -> float:
        """Return original / kis_lens wall time over all layers."""
        return self.original_all_layers_s / self.kis_all_layers_s

    def speedup_one_layer(self) -> float:
        """Return original / kis_lens wall time for one layer."""
        return self.original_one_layer_s / self.kis_one_layer_s


def check_original_work(n: int, work: OriginalWork) -> None:
    """Stop the benchmark unless the counted work is the original's: N² + 2N forwards, one inverse, N C⁻¹k per layer."""
    expected = OriginalWork(forwards=n * n + 2 * n, inversions=1, inverse_products=n, entries=n * n)
    counted = (work.forwards, work.inversions, work.inverse_products, work.entries)
    if counted != (expected.forwards, expected.inversions, expected.inverse_products, expected.entries):
        raise RuntimeError(
            f"the reference's work for N={n} is not the original's: counted (forwards, inverses, "
            f"C⁻¹k, entries) = {counted}, the original does {(n * n + 2 * n, 1, n, n * n)}"
        )


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


def covariances_for(
    model: Any, layers: Sequence[int], output_dir: str, cov_tokens: int
) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """Return {layer: C}: `kis reproduce` caches under output_dir if any, else kis_lens caches on cov_tokens tokens."""
    from kis_lens.config import RunConfig
    from kis_lens.layout import stats_path
    from kis_lens.quarters import QUARTERS, load_quarter_moments, merged
    from kis_lens.runner import ensure_covariances
    from kis_lens.storage import read_metadata

    quarters = load_quarter_moments(output_dir, model, layers)  # `kis reproduce`'s four quarters, no token limit
    if quarters is not None:
        moments = {layer: merged(*(quarters[quarter][layer] for quarter in QUARTERS)) for layer in layers}
        tokens = moments[layers[0]].count
        return {layer: moment.compute(torch.float64) for layer, moment in moments.items()}, {
            "tokens": tokens,
            "corpus": "wikipedia-offline (kis reproduce cache)",
        }
    config = RunConfig(model_name=model_info(model).name, output_dir=output_dir, max_tokens=cov_tokens, progress=True)
    covariances, _ = ensure_covariances(config, model, layers)
    metadata = read_metadata(stats_path(output_dir, model_info(model).name, config.corpus, layers[0]))
    return covariances, {"tokens": metadata.get("count"), "corpus": metadata.get("corpus")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Return the benchmark's rows and settings after printing them as they come."""
    torch.manual_seed(0)
    model = load_model(args.model_name, device=args.device, dtype=args.dtype)
    info = model_info(model)
    prepend_bos = info.adds_bos
    layers = layer_range(model)
    layer = args.layer if args.layer is not None else layers[len(layers) // 2]
    covariances, cov_info = covariances_for(model, layers, args.output_dir, args.cov_tokens)
    facts = load_facts(args.facts)[: max(args.sizes)]
    print(
        f"{info.name}: {info.n_layers} layers, d_mlp {info.d_mlp}; covariance from {cov_info['tokens']} tokens; "
        f"reference layer {layer}; device {model_device(model)}, dtype {args.dtype}"
    )
    # Warm-up so that neither side pays one-time costs (allocations, kernels) inside its timing.
    kis_lens_p_matrices(model, facts[:4], [layer], covariances, prepend_bos)
    (_, warm), warm_seconds = timed(reference_p_matrix, model, facts[:2], layer, covariances[layer], prepend_bos)
    per_forward = (warm_seconds - warm.inverse_s) / warm.forwards
    inverse_s = warm.inverse_s
    rows: list[Row] = []
    for n in args.sizes:
        chosen = facts[:n]
        all_p, kis_all = median_timed(
            args.repeats, kis_lens_p_matrices, model, chosen, layers, covariances, prepend_bos
        )
        one_p, kis_one = median_timed(
            args.repeats, kis_lens_p_matrices, model, chosen, [layer], covariances, prepend_bos
        )
        # Run the original in full when the last measured time per forward says it fits the budget.
        full_work = count_original_work(n)
        full = inverse_s + per_forward * full_work.forwards <= args.budget_s
        max_pairs = None if full else max(4, int((args.budget_s - inverse_s) / per_forward * n / (n + 2)))
        (ref_p, work), ref_time = timed(
            reference_p_matrix, model, chosen, layer, covariances[layer], prepend_bos, max_pairs
        )
        full = work.entries == n * n
        if full:
            full_work = work  # the timed run's own count
        check_original_work(n, full_work)
        per_forward = (ref_time - work.inverse_s) / work.forwards
        inverse_s = work.inverse_s
        original_one = ref_time if full else work.inverse_s + per_forward * full_work.forwards
        done = ~torch.isnan(ref_p)
        diff = float((ref_p[done] - one_p[layer][done]).abs().max())
        diff = max(diff, float((one_p[layer] - all_p[layer]).abs().max()))
        row = Row(
            n,
            kis_all,
            kis_one,
            original_one,
            original_one * len(layers),
            not full,
            ref_time,
            full_work.forwards,
            full_work.inversions,
            full_work.inverse_products,
            work.forwards,
            work.entries,
            work.inverse_s,
            diff,
        )
        rows.append(row)
        print(
            f"N={n:4d}  kis_lens all {len(layers)} layers {kis_all:8.3f} s | one layer {kis_one:7.3f} s  ||  "
            f"original one layer {original_one:9.1f} s"
            f"{f' (extrapolated from {work.forwards} forwards)' if not full else ''}, all layers "
            f"{row.original_all_layers_s:10.1f} s  ||  speed-up {row.speedup_all_layers():9.0f}x (all layers), "
            f"{row.speedup_one_layer():8.0f}x (one layer)  max|ΔP| {diff:.2e}  ||  original forwards per layer "
            f"{full_work.forwards} (counted{'' if full else ' on the stubbed loop'}; N²+2N = {n * n + 2 * n}), "
            f"{full_work.inversions} inverse, {full_work.inverse_products} C⁻¹k",
            flush=True,
        )
    return {
        "model": info.name,
        "n_layers": info.n_layers,
        "d_mlp": info.d_mlp,
        "device": str(model_device(model)),
        "device_name": torch.cuda.get_device_name()
        if torch.cuda.is_available() and "cuda" in str(model_device(model))
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "reference_layer": layer,
        "covariance": cov_info,
        "facts": args.facts,
        "budget_s": args.budget_s,
        "kis_lens_repeats": args.repeats,
        "reference": "Compute_PMatrix.py as written: per layer one explicit inverse of C; per row i one forward for "
        "C⁻¹k_i and one for k_i; per entry one forward for k_j (N² + 2N forwards per layer, counted)",
        "rows": [
            dict(vars(row), speedup_all_layers=row.speedup_all_layers(), speedup_one_layer=row.speedup_one_layer())
            for row in rows
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/matrices_{model}_{device}.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default="smollm2-135m")
    parser.add_argument("--facts", default="counterfact-known")
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument(
        "--layer", type=int, default=None, help="layer the original is timed on (default the middle one)"
    )
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
