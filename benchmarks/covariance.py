"""Tokens/s of covariance caching: (a) bare forward to the last MLP, (b) kis_lens all layers in one pass,
(c) the original's layer-at-a-time estimate (one early-stopped forward and a dense XᵀX per layer).

Full run (the committed benchmarks/results/covariance.{json,md}), then the README numbers:

    nice -n 10 .venv/bin/python benchmarks/covariance.py --tokens 8192
    .venv/bin/python benchmarks/render.py

(c) runs a few sampled layers and extrapolates linearly in the layer index (a pass to layer L costs
a + b·L), because running every layer would take n_layers/2 forward passes; the JSON records which.
(a), (b) and each sampled layer of (c) run alternately BEST_OF (2) times and keep the fastest of each,
since this machine is shared and noisy.
All three run each batch as the same forwards (on a CPU, row groups of CPU_FORWARD_TOKENS), so the ratios
measure the statistics alone.
"ideal b/a" is the ceiling with these float32 products: a / (a + their multiply-adds at the rate the same
block products reach alone, outside the forward), i.e. what b/a would be if the statistics cost nothing but
arithmetic. Writes benchmarks/results/covariance.json and covariance.md (its Markdown comes from render.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from kis_lens.corpus import open_corpus
from kis_lens.covariance import CPU_FORWARD_TOKENS, accumulate_batches, forward_row_groups
from kis_lens.hooks import run_mlp_hooks
from kis_lens.stats import SecondMoment, triangle_size, upper_gram_blocks
from kis_lens.tokens import token_batches

RESULTS = Path(__file__).parent / "results"
BEST_OF = 2  # (a), (b) and (c) each keep the fastest of this many alternating runs


def gpt2_small_random():
    """Return a random-weight GPT-2-small-sized bridge (12 layers, d_model 768, d_mlp 3072, n_ctx 1024)."""
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    from kis_lens.tiny import tiny_tokenizer

    config = TransformerBridgeConfig(
        n_layers=12,
        d_model=768,
        d_head=64,
        n_heads=12,
        d_mlp=3072,
        n_ctx=1024,
        d_vocab=2048,
        act_fn="gelu_new",
        normalization_type="LN",
        model_name="gpt2-small-random",
        seed=0,
    )
    model = TransformerBridge.boot_native(config, tokenizer=tiny_tokenizer(), device="cpu")
    return model.eval()


def fixed_batches(model, tokens: int, batch_token: int) -> list:
    """Return the first batches of the embedded corpus holding about `tokens` real tokens."""
    batches, seen = [], 0
    for batch in token_batches(
        model.tokenizer, open_corpus("wikipedia-offline").texts(stop=2000), 1024, batch_token, False
    ):
        batches.append(batch)
        seen += batch.n_tokens
        if seen >= tokens:
            break
    return batches


def forward_pieces(batch):
    """Return the (tokens, mask) forwards kis_lens runs for a batch: on a CPU, row groups of CPU_FORWARD_TOKENS."""
    return [(tokens, mask) for _, tokens, mask in forward_row_groups(batch, CPU_FORWARD_TOKENS)]


def bare_forward(model, batches) -> None:
    """Forward to the last MLP input and do nothing with it."""
    last = int(model.cfg.n_layers) - 1
    for batch in batches:
        for tokens, mask in forward_pieces(batch):
            run_mlp_hooks(model, tokens, [last], lambda layer, act: None, attention_mask=mask)


def all_layers(model, batches) -> None:
    """kis_lens: every layer's second moment from one forward per batch."""
    moments = {layer: SecondMoment(int(model.cfg.d_mlp)) for layer in range(int(model.cfg.n_layers))}
    for _ in accumulate_batches(model, batches, moments):
        pass


def one_layer_dense(model, batches, layer: int) -> None:
    """The original: a forward stopped at one layer and a dense float32 XᵀX, per layer."""
    total = torch.zeros(int(model.cfg.d_mlp), int(model.cfg.d_mlp), dtype=torch.float64)
    for batch in batches:
        for tokens, mask in forward_pieces(batch):
            keep = mask.bool()

            def add(_: int, activation: torch.Tensor, keep: torch.Tensor = keep) -> None:
                rows = activation[keep].float()
                total.add_(rows.T @ rows)

            run_mlp_hooks(model, tokens, [layer], add, attention_mask=mask)


def row_group_gain(model, tokens: int) -> dict:
    """Return kis_lens tok/s at the default batch_token (n_ctx) with whole-batch forwards and with CPU row groups."""
    n_ctx, d_mlp, n_layers = int(model.cfg.n_ctx), int(model.cfg.d_mlp), int(model.cfg.n_layers)
    batches = fixed_batches(model, tokens, n_ctx)
    n_tokens = sum(b.n_tokens for b in batches)

    def run(group_tokens) -> None:
        moments = {layer: SecondMoment(d_mlp) for layer in range(n_layers)}
        for _ in accumulate_batches(model, batches, moments, group_tokens=group_tokens):
            pass

    seconds = {"whole_batches": float("inf"), "row_groups": float("inf")}
    for _ in range(2):
        seconds["whole_batches"] = min(seconds["whole_batches"], timed(run, None))
        seconds["row_groups"] = min(seconds["row_groups"], timed(run, CPU_FORWARD_TOKENS))
    return {
        "batch_token": n_ctx,
        "tokens": n_tokens,
        "group_tokens": CPU_FORWARD_TOKENS,
        "tok_s": {name: n_tokens / value for name, value in seconds.items()},
        "speedup": seconds["whole_batches"] / seconds["row_groups"],
    }


def timed(fn, *args) -> float:
    """Return wall seconds of one call."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def product_rate(d_mlp: int, rows: int, repeats: int = 5) -> float:
    """Return the multiply-add rate (per second) of the triangle block products on their own, best of repeats."""
    activations = torch.randn(rows, d_mlp)
    upper_gram_blocks(activations)
    best = min(timed(upper_gram_blocks, activations) for _ in range(repeats))
    return rows * triangle_size(d_mlp) / best


def measure(name: str, model, tokens: int, batch_token: int) -> dict:
    """Return the three throughputs, their ratios and memory for one model."""
    batches = fixed_batches(model, tokens, batch_token)
    n_tokens = sum(b.n_tokens for b in batches)
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    with torch.no_grad():
        bare_forward(model, batches[:1])  # warm-up
        all_layers(model, batches[:1])
        a = b = float("inf")
        sampled = sorted({0, n_layers // 2, n_layers - 1})
        per_layer = {layer: float("inf") for layer in sampled}
        for _ in range(BEST_OF):
            a = min(a, timed(bare_forward, model, batches))
            b = min(b, timed(all_layers, model, batches))
            for layer in sampled:
                per_layer[layer] = min(per_layer[layer], timed(one_layer_dense, model, batches, layer))
    slope, intercept = np.polyfit(sampled, [per_layer[layer] for layer in sampled], 1)
    c = float(sum(intercept + slope * layer for layer in range(n_layers)))
    rows_per_batch = n_tokens // len(batches)
    arithmetic = n_tokens * n_layers * triangle_size(d_mlp) / product_rate(d_mlp, rows_per_batch)
    result = {
        "model": name,
        "n_layers": n_layers,
        "d_mlp": d_mlp,
        "tokens": n_tokens,
        "batches": len(batches),
        "batch_token": batch_token,
        "tok_s": {"a_bare_forward": n_tokens / a, "b_kis_all_layers": n_tokens / b, "c_layer_at_a_time": n_tokens / c},
        "ratio_b_over_a": a / b,
        "ratio_b_over_c": c / b,
        "ideal_b_over_a": a / (a + arithmetic),
        "statistics_seconds_b_minus_a": b - a,
        "statistics_arithmetic_seconds": arithmetic,
        "target_b_over_c": n_layers / 4,
        "c_sampled_layers": {str(k): v for k, v in per_layer.items()},
        "c_extrapolated": True,
        "best_of": BEST_OF,
        "accumulator_bytes_all_layers": n_layers * SecondMoment.bytes_needed(d_mlp),
        "peak_rss_bytes_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    """Run the benchmark on the requested models and write JSON + markdown results."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch_token", default="1024,4096", help="comma-separated token budgets per batch")
    parser.add_argument("--models", default="gpt2-small-random,smollm2-135m")
    args = parser.parse_args()
    results = []
    for name in args.models.split(","):
        if name == "gpt2-small-random":
            model = gpt2_small_random()
        else:
            from kis_lens.models import load_model

            model = load_model(name, device="cpu")
        for batch_token in args.batch_token.split(","):
            results.append(measure(name, model, args.tokens, int(batch_token)))
        if int(model.cfg.n_ctx) > CPU_FORWARD_TOKENS:
            gain = row_group_gain(model, 2 * args.tokens)
            print(json.dumps(gain, indent=2))
            results[-1]["default_batch_row_groups"] = gain
        del model
    environment = {
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment, "results": results}
    (RESULTS / "covariance.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "covariance.md").write_text(_load_render().covariance_markdown(report))
    print(
        f"written: {RESULTS / 'covariance.json'}, {RESULTS / 'covariance.md'}; "
        "now run benchmarks/render.py for the README"
    )


def _load_render():
    """Return benchmarks/render.py, which owns the Markdown (loaded by path: benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "kis_benchmarks_render", Path(__file__).resolve().with_name("render.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
