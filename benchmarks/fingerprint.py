"""The full-weight fingerprint's cost beside `kis all` on the cached path, in one process (issue 21).

    .venv/bin/python benchmarks/fingerprint.py     # ~6 min on 2 cores; writes benchmarks/results/fingerprint.json

For SmolLM2-135M and a GPT-2-small-sized model (12 layers, d_model 768, d_mlp 3072; random weights, the tiny
tokenizer's vocabulary): the seconds of model_fingerprint (every byte of every parameter, SHA-256), of the older
sampled fingerprint, and of `kis all` on every layer with C already cached (run_matrices in this process, after
the fingerprint hashed once as load_model hashes it for a user's run; C from 20k tokens, which the cached path
only reads).
The model's load is not counted, so the share of a `kis all` command (which loads the model too) is smaller.
Each timing is the median of three, side by side. Caches go to a temporary folder, never results/.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fingerprint.json"
REPEATS = 3


def _median_seconds(work: Callable[[], Any], before: Callable[[], Any] = lambda: None) -> float:
    """Return the median wall seconds of REPEATS calls of work (before runs untimed ahead of each)."""
    times = []
    for _ in range(REPEATS):
        before()
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(name: str, model: Any, max_tokens: int) -> dict[str, Any]:
    """Return the fingerprint's and the cached `kis all`'s seconds for one model."""
    from kis_lens import fingerprint, models
    from kis_lens.config import RunConfig
    from kis_lens.runner import run_matrices

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        config = RunConfig(
            model_name=name,
            output_dir=folder,
            max_tokens=max_tokens,
            knowledge_type="all",  # a random model knows no fact; the work per fact is the same
            progress=False,
        )
        run_matrices(config, model=model)  # estimates C once: the timed runs below read it from the cache
        # load_model records the fingerprint once per process: each timed run pays it once, as a fresh command does
        kis_all = _median_seconds(lambda: (models._compute_fingerprint(model), run_matrices(config, model=model)))
    full = _median_seconds(lambda: models._compute_fingerprint(model))  # a fresh hash each time, as load_model's
    legacy = _median_seconds(lambda: fingerprint.legacy_fingerprint(model))
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameter_bytes": n_bytes,
        "fingerprint_s": round(full, 3),
        "legacy_fingerprint_s": round(legacy, 4),
        "kis_all_cached_s": round(kis_all, 2),
        "fingerprint_share_of_kis_all": round(full / kis_all, 4),
        "hash_throughput_gb_s": round(n_bytes / full / 1e9, 2),
    }


def main() -> int:
    """Measure both models and write the results file."""
    import torch

    from kis_lens.models import load_model
    from kis_lens.tiny import tiny_model

    torch.manual_seed(0)
    rows = [measure("smollm2-135m", load_model("smollm2-135m", device="cpu"), 20_000)]
    gpt2_small = tiny_model("gpt2", n_layers=12, d_model=768, d_mlp=3072, n_ctx=1024, seed=0)
    rows.append(measure("gpt2-small-sized (random, tiny vocabulary)", gpt2_small, 20_000))
    result = {
        "what": __doc__.splitlines()[0],
        "threads": torch.get_num_threads(),
        "note": "kis all in-process on every layer, the model already loaded: a kis all command also loads it",
        "rows": rows,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for row in rows:
        print(
            f"{row['model']}: fingerprint {row['fingerprint_s']} s ({row['hash_throughput_gb_s']} GB/s), "
            f"kis all cached {row['kis_all_cached_s']} s: {100 * row['fingerprint_share_of_kis_all']:.1f}%"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
