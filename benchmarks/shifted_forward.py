"""Per-step time of ROME's value search forward+backward: the model's whole forward versus the suffix-only one.

    .venv/bin/python benchmarks/shifted_forward.py       # ~1 min on 2 cores; writes results/shifted_forward.json

On SmolLM2-135M, layer 4, site mlp_out, 2 torch threads, a batch shaped like ROME's compute_v: 21 rewrite prompts
("{}" and 20 prefixes of 5 or 10 seeded random words + ". {}", applied to "The Eiffel Tower is located in the city
of", shift at the subject's last token) each followed by a 2-token target read at the positions that predict it,
plus the KL prompt "The Eiffel Tower is a" read at the subject's last token. One step is the shifted forward and
the backward of a scalar loss (target NLL + KL) w.r.t. the shift. Full and fast steps alternate (``--repeats``
each, after one warm-up each) and the median of each is reported, with the one-off construction cost of each and
the largest relative difference of their logits and gradients (max |a - b| / max |a|).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from kis_lens.editing.shifted_forward import ShiftedForward, fast_shifted_forward, full_shifted_forward
from kis_lens.editing.values import edit_prompt, frozen_parameters
from kis_lens.facts import Fact
from kis_lens.io import save_json
from kis_lens.keys import locate_subject
from kis_lens.models import load_model, resolve_prepend_bos
from kis_lens.tokens import pad_batch, pad_token_id

RESULTS = Path(__file__).resolve().parent / "results" / "shifted_forward.json"
MODEL, LAYER, SITE = "smollm2-135m", 4, "mlp_out"
SUBJECT, PROMPT = "The Eiffel Tower", "{} is located in the city of"
# The first of these that the tokenizer splits into exactly two tokens is the target (ROME's targets are 1-3 tokens).
TARGET_CANDIDATES = ("Montevideo", "Ankara", "Kathmandu", "Reykjavik")
WORDS = (
    "river morning stone quiet market winter paper garden city window music ancient silver letter mountain "
    "story engine summer forest yellow history island bridge simple number north evening village road light"
).split()


def prefixes(count: int = 20, seed: int = 0) -> list[str]:
    """Return `count` prefixes of 5 or 10 seeded random words, each ending ". " (ROME's context templates)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(5 if i % 2 else 10)).capitalize() + ". " for i in range(count)]


def two_token_target(model: Any) -> str:
    """Return the first candidate target that the model's tokenizer encodes (after a space) as two tokens."""
    for word in TARGET_CANDIDATES:
        if len(model.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 2:
            return word
    raise SystemExit(f"none of {TARGET_CANDIDATES} is two tokens for this tokenizer")


def rome_batch(
    model: Any, target: str
) -> tuple[
    Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"], Int[Tensor, " read"],
    Int[Tensor, " read"], Int[Tensor, " read"],
]:  # fmt: skip
    """Return tokens, mask, shift positions, read rows, read positions and the token each read should predict."""
    bos = resolve_prepend_bos(model, None)
    rewrites = [
        edit_prompt(model, Fact("bench", SUBJECT, prefix + PROMPT, "Paris"), target, bos)
        for prefix in ["", *prefixes()]
    ]
    essence = locate_subject(model.tokenizer, Fact("bench", SUBJECT, "{} is a", "Paris"), bos)
    tokens, mask = pad_batch([prompt.ids for prompt in rewrites] + [essence.ids], pad_token_id(model.tokenizer))
    shifts = torch.tensor([prompt.subject_last for prompt in rewrites] + [essence.subject_last])
    # (row, position read, token it should predict): each target token, read where it is predicted, then the KL
    # read at the essence prompt's subject (ROME reads its KL prompts at the subject's last token); -1: no label.
    reads = [
        (row, position - 1, prompt.ids[position])
        for row, prompt in enumerate(rewrites)
        for position in range(prompt.target_start, len(prompt.ids))
    ]
    reads.append((len(rewrites), essence.subject_last, -1))
    rows, positions, labels = (torch.tensor(column) for column in zip(*reads))
    return tokens, mask, shifts, rows, positions, labels


def loss_of(logits: Float[Tensor, "read vocab"], labels: Int[Tensor, " read"], kl_reference: Tensor) -> Tensor:
    """Return ROME's loss shape: mean target NLL of the rewrite reads + KL(initial ‖ now) at the KL read."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = labels >= 0
    nll = -logprobs[targets].gather(1, labels[targets, None]).mean()
    kl = torch.sum(kl_reference.exp() * (kl_reference - logprobs[~targets][0]))
    return nll + 0.0625 * kl


def step(forward: ShiftedForward, shift: Tensor, labels: Tensor, kl_reference: Tensor) -> tuple[float, Tensor, Tensor]:
    """Return (seconds, logits, gradient) of one forward+backward at `shift`."""
    shift = shift.detach().clone().requires_grad_(True)
    started = time.perf_counter()
    logits = forward(shift)
    loss_of(logits, labels, kl_reference).backward()
    seconds = time.perf_counter() - started
    return seconds, logits.detach(), shift.grad


def relative(a: Tensor, b: Tensor) -> float:
    """Return max |a - b| / max |a|."""
    return float((a - b).abs().max() / a.abs().max())


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write results/shifted_forward.json and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps of each (after one warm-up each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(MODEL, device="cpu", dtype="float32")
    target = two_token_target(model)
    tokens, mask, shifts, rows, positions, labels = rome_batch(model, target)
    arguments = (model, LAYER, SITE, tokens, mask, shifts, rows, positions)
    with frozen_parameters(model):
        started = time.perf_counter()
        full = full_shifted_forward(*arguments)
        full_build = time.perf_counter() - started
        started = time.perf_counter()
        fast = fast_shifted_forward(*arguments)
        fast_build = time.perf_counter() - started
        if fast is None:
            raise SystemExit(f"fast_shifted_forward does not support {MODEL}")
        with torch.no_grad():
            kl_reference = torch.log_softmax(full(torch.zeros_like(full.initial))[-1].float(), dim=-1)
        # A shift of ROME's typical size (a fraction of the MLP output's norm), fixed by seed.
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(full.initial.shape, generator=generator)
        shift = 0.5 * direction * full.initial.norm(dim=1, keepdim=True) / direction.norm(dim=1, keepdim=True)
        times: dict[str, list[float]] = {"full": [], "fast": []}
        results: dict[str, tuple[Tensor, Tensor]] = {}
        for repeat in range(args.repeats + 1):
            for name, forward in (("full", full), ("fast", fast)):
                seconds, logits, gradient = step(forward, shift, labels, kl_reference)
                if repeat:  # the first of each warms up allocators and caches
                    times[name].append(seconds)
                results[name] = (logits, gradient)
    full_ms, fast_ms = (1000 * statistics.median(times[name]) for name in ("full", "fast"))
    report = {
        "model": MODEL,
        "layer": LAYER,
        "site": SITE,
        "dtype": "float32",
        "torch_threads": args.threads,
        "batch": {
            "rows": int(tokens.shape[0]),
            "max_tokens": int(tokens.shape[1]),
            "real_tokens": int(mask.sum()),
            "reads": len(rows),
            "target": target,
            "shift_positions": shifts.tolist(),
        },
        "repeats": args.repeats,
        "full_step_ms": round(full_ms, 1),
        "fast_step_ms": round(fast_ms, 1),
        "speedup": round(full_ms / fast_ms, 2),
        "full_step_ms_all": [round(1000 * t, 1) for t in times["full"]],
        "fast_step_ms_all": [round(1000 * t, 1) for t in times["fast"]],
        "fast_construction_ms": round(1000 * fast_build, 1),
        "full_construction_ms": round(1000 * full_build, 1),
        "max_relative_logits_difference": relative(results["full"][0], results["fast"][0]),
        "max_relative_gradient_difference": relative(results["full"][1], results["fast"][1]),
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    save_json(args.output, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
