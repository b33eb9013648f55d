"""The `kis` command: one subcommand per step of the original scripts, each a thin call into kis_lens.runner."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from typing import Callable, Sequence

from kis_lens.errors import KisError
from kis_lens.facts import DEFAULT_FACTS, DEFAULT_RECORD_SIZE
from kis_lens.keys import TOKEN_POSITIONS
from kis_lens.matrices import MATRIX_NAMES
from kis_lens.models import DEFAULT_MODEL, DTYPES
from kis_lens.runner import EMBEDDED_CORPUS, KNOWLEDGE_TYPES, RunConfig, cache_covariance, run_matrices


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add --snake_case (the original scripts' spelling) and --kebab-case for the same option."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def _common_flags(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    _flag(parser, "model_name", default=DEFAULT_MODEL, help=f"alias, hub name or local dir (default {DEFAULT_MODEL})")
    _flag(parser, "start_layer", type=int, default=None, help="first layer (default 0)")
    _flag(parser, "end_layer", type=int, default=None, help="last layer, inclusive (default the last)")
    _flag(parser, "batch_token", type=int, default=None, help="tokens per forward batch, padding included (default n_ctx)")
    _flag(parser, "device", default=None, help="cpu or cuda (default cuda when available)")
    _flag(parser, "dtype", default="float32", choices=sorted(DTYPES), help="model dtype (statistics stay float32/64)")
    _flag(parser, "output_dir", default=defaults.output_dir, help="where caches and results go (default ./results)")
    _flag(parser, "corpus", default=EMBEDDED_CORPUS, help=f"{EMBEDDED_CORPUS} or a .txt/.jsonl file")
    _flag(parser, "sample_size", type=int, default=None, help="number of corpus texts (default all)")
    _flag(parser, "max_tokens", type=int, default=defaults.max_tokens, help=f"corpus token budget (default {defaults.max_tokens}; 0 = no limit)")
    _flag(parser, "prepend_bos", choices=["auto", "true", "false"], default="auto", help="BOS before each text (auto: what the model's HF tokenizer does)")
    parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _fact_flags(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "facts", default=DEFAULT_FACTS, help=f"counterfact-known, known-1000 or a JSON/JSONL path (default {DEFAULT_FACTS})")
    _flag(parser, "record_size", type=int, default=DEFAULT_RECORD_SIZE, help=f"number of facts sampled (default {DEFAULT_RECORD_SIZE})")
    _flag(parser, "knowledge_type", default="known", choices=KNOWLEDGE_TYPES, help="which facts (default known)")
    _flag(parser, "token_position", default="subject_last", choices=TOKEN_POSITIONS, help="where keys are read")
    _flag(parser, "seed", type=int, default=0, help="fact sampling seed")
    _flag(parser, "ridge", type=float, default=0.0, help="add ridge·mean(diag C)·I to C before solving")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Return the RunConfig described by parsed CLI arguments."""
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    values["prepend_bos"] = {"auto": None, "true": True, "false": False}[args.prepend_bos]
    values["max_tokens"] = args.max_tokens or None
    values["progress"] = not args.no_progress
    return RunConfig(**values)


def _print_result_paths(config: RunConfig, started: float, result) -> None:
    print(f"done in {time.perf_counter() - started:.1f} s: {len(result.layers)} layers × {len(result.facts)} facts")
    print(f"results: {result.path}")
    print(f"per-layer .npy files under {config.output_dir}/ ({', '.join(result.matrices)})")


def _matrices_command(names: Sequence[str]) -> Callable[[argparse.Namespace], None]:
    def command(args: argparse.Namespace) -> None:
        config = config_from_args(args)
        started = time.perf_counter()
        result = run_matrices(config, names=names)
        _print_result_paths(config, started, result)

    return command


def _cache_cov_command(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    started = time.perf_counter()
    paths = cache_covariance(config)
    print(f"done in {time.perf_counter() - started:.1f} s: covariance of {len(paths)} layers")
    print(f"caches: {next(iter(paths.values())).parent}")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `kis` command."""
    parser = argparse.ArgumentParser(prog="kis", description="Knowledge superposition matrices on TransformerLens models.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "all": ("keys once, then all four matrices for every layer", MATRIX_NAMES),
        "p-matrix": ("P = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i per layer", ("p_matrix",)),
        "q-matrix": ("Q = k_i·k_j per layer", ("q_matrix",)),
        "whitening-cos": ("cosine of keys in the whitened space per layer", ("whitening_cos",)),
        "activation-cos": ("cosine of keys per layer", ("activation_cos",)),
    }
    cache = sub.add_parser("cache-cov", help="estimate and cache C = E[k kᵀ] for every layer in one pass")
    _common_flags(cache)
    cache.set_defaults(handler=_cache_cov_command)
    for name, (help_text, names) in commands.items():
        command = sub.add_parser(name, help=help_text)
        _common_flags(command)
        _fact_flags(command)
        command.set_defaults(handler=_matrices_command(names))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `kis` command line; return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["all"]  # `kis` alone runs the main job on the embedded defaults
    args = parser.parse_args(argv)
    try:
        args.handler(args)
    except KisError as error:
        if args.debug:
            raise
        print(f"kis: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
