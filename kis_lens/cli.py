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
from kis_lens.config import KNOWLEDGE_TYPES, RunConfig
from kis_lens.corpus import EMBEDDED_CORPUS
from kis_lens.runner import run_matrices


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
        if getattr(args, "report", False):
            from kis_lens.report import write_report_files

            report, table = write_report_files(result)
            print(f"report: {report}\nper-layer table: {table}")

    return command


def _cache_cov_command(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from kis_lens.cache_job import parse_bytes
    from kis_lens.distributed import init_from_env, local_device
    from kis_lens.runner import cache_covariance_job

    rank, _ = init_from_env()  # under torchrun: join the group, shard the corpus, all-reduce the sums
    if args.max_tokens == -1:  # unset: --sample_size alone means every token of those texts
        args.max_tokens = 0 if args.sample_size else RunConfig().max_tokens
    config = config_from_args(args)
    if config.device is None and local_device():
        config = replace(config, device=local_device())
    report = cache_covariance_job(
        config,
        stats_dtype=args.stats_dtype,
        checkpoint_every=args.checkpoint_every or None,
        max_memory=parse_bytes(args.max_memory),
        skip_nonfinite=args.skip_nonfinite,
    )
    if rank == 0:
        print(f"done: {report.summary()}")


def _merge_stats_command(args: argparse.Namespace) -> None:
    from kis_lens.storage import merge_caches

    for path in merge_caches(args.inputs, args.output_dir, dtype=args.stats_dtype):
        print(f"merged: {path}")


def _import_stats_command(args: argparse.Namespace) -> None:
    from kis_lens.storage import import_layer_stats

    prepend_bos = None if args.prepend_bos is None else args.prepend_bos == "true"
    path = import_layer_stats(
        args.npz, args.model_name, args.layer, args.output_dir, args.corpus, prepend_bos=prepend_bos, max_length=args.max_length
    )
    print(f"imported {args.npz} as {path} (C = mom2.mom2 / mom2.count; the model's fingerprint is recorded on first use)")


def _export_stats_command(args: argparse.Namespace) -> None:
    import numpy as np

    from kis_lens.storage import export_npz

    path = export_npz(args.cache, args.output, precision=args.precision, sample_size=args.sample_size)
    with np.load(path, allow_pickle=False) as data:
        sample_size = int(data["sample_size"])
    layer_name = args.layer_name or "{layer_name}"
    print(f"exported {args.cache} as {path} (sample_size {sample_size}: ROME loads it only for mom2_n_samples={sample_size})")
    print(f"ROME/MEMIT look it up as {layer_name}_{args.precision}_mom2_{sample_size}.npz in their {{model}}/{{dataset}}_stats folder"
          + ("" if args.layer_name else ", layer_name being hparams.rewrite_module_tmp of the layer (e.g. transformer.h.5.mlp.c_proj)"))


def _stats_parsers(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser("cache-cov", help="estimate and cache C = E[k kᵀ] for every layer in one pass (resumable; torchrun shards it)")
    _common_flags(cache)
    cache.set_defaults(handler=_cache_cov_command, max_tokens=-1)
    _flag(cache, "stats_dtype", default="float64", choices=["float32", "float64"], help="float64 (default) stores the exact sum; float32 rounds C")
    _flag(cache, "checkpoint_every", type=int, default=5_000_000, help="tokens between resumable checkpoints (0 = none; default 5,000,000)")
    _flag(cache, "max_memory", default=None, help="memory for the accumulators, e.g. 24GB: more layers than fit → several passes")
    _flag(cache, "skip_nonfinite", action="store_true", help="leave out and count texts whose activations hold NaN/inf (default: stop and name the text)")
    merge = sub.add_parser("merge-stats", help="merge caches computed on separate machines (sums and counts add)")
    merge.add_argument("inputs", nargs="+", help="cache files, or stats folders whose layer_*_mom2.safetensors are merged by name")
    _flag(merge, "output_dir", required=True, help="folder for the merged caches")
    _flag(merge, "stats_dtype", default="float64", choices=["float32", "float64"], help="dtype of the stored C (default float64)")
    importer = sub.add_parser(
        "import-stats", help="read a ROME/MEMIT/AlphaEdit layer_stats .npz (mom2.mom2 = Σ k kᵀ, mom2.count) as a kis cache"
    )
    importer.add_argument("npz", help="the .npz file")
    _flag(importer, "model_name", required=True, help="the model it was computed on (as you pass it to kis)")
    _flag(importer, "layer", type=int, required=True, help="its layer")
    # Not argparse-required: the handler names the flag and why it is needed in one `kis: error:` line.
    _flag(importer, "prepend_bos", choices=["true", "false"], default=None,
          help="required: whether BOS preceded each text when it was computed (ROME: the HF tokenizer's default)")
    _flag(importer, "max_length", type=int, default=None, help="the token length texts were truncated to (ROME: n_positions), recorded when given")
    _flag(importer, "output_dir", default=RunConfig().output_dir, help="kis output folder (default ./results)")
    _flag(importer, "corpus", default="wikipedia", help="the corpus it was computed on (names the cache folder; default wikipedia)")
    exporter = sub.add_parser("export-stats", help="write a kis cache as the layer_stats .npz ROME/MEMIT/AlphaEdit write and load")
    exporter.add_argument("cache", help="a layer_*_mom2.safetensors cache")
    _flag(exporter, "output", required=True, help="the .npz to write")
    _flag(exporter, "precision", default="float32", choices=["float32", "float64"], help="dtype of the stored sum, ROME's precision (default float32)")
    _flag(exporter, "sample_size", type=int, default=None,
          help="the sample_size ROME matches against mom2_n_samples (default the cache's sample_size, else its number of texts)")
    _flag(exporter, "layer_name", default=None, help="ROME's module name of the layer, only to print the file name ROME looks for")
    for parser in (merge, importer, exporter):
        parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    merge.set_defaults(handler=_merge_stats_command)
    importer.set_defaults(handler=_import_stats_command)
    exporter.set_defaults(handler=_export_stats_command)


def _classify_facts_command(args: argparse.Namespace) -> None:
    from kis_lens.classify import ensure_split
    from kis_lens.models import load_model

    started = time.perf_counter()
    model = load_model(args.model_name, device=args.device, dtype=args.dtype)
    prepend_bos = {"auto": None, "true": True, "false": False}[args.prepend_bos]
    split, path = ensure_split(
        model, args.facts, args.output_dir, top_k=args.top_k, prepend_bos=prepend_bos, recompute=True, progress=not args.no_progress
    )
    print(
        f"done in {time.perf_counter() - started:.1f} s: {split.model_name} knows {len(split.known)} of "
        f"{split.n_facts} facts of {args.facts} (target in its top-{split.top_k}); {len(split.unknown)} unknown"
    )
    print(f"split: {path} (used by --knowledge_type known|unknown with the same --output_dir)")


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("classify-facts", help="split the facts into known/unknown for a model (top-k next token)")
    _flag(parser, "model_name", default=DEFAULT_MODEL, help=f"alias, hub name or local dir (default {DEFAULT_MODEL})")
    _flag(parser, "facts", default=DEFAULT_FACTS, help=f"counterfact-known, known-1000 or a JSON/JSONL path (default {DEFAULT_FACTS})")
    _flag(parser, "top_k", type=int, default=1, help="known when the target's first token is in the top-k next tokens (default 1)")
    _flag(parser, "device", default=None, help="cpu or cuda (default cuda when available)")
    _flag(parser, "dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    _flag(parser, "output_dir", default=RunConfig().output_dir, help="where the split goes (default ./results)")
    _flag(parser, "prepend_bos", choices=["auto", "true", "false"], default="auto", help="BOS before each prompt (auto: what the model's HF tokenizer does)")
    parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.set_defaults(handler=_classify_facts_command)


def _report_command(args: argparse.Namespace) -> None:
    from kis_lens.report import report_from_results

    report, table = report_from_results(args.results, args.output, top_k=args.top_k, threshold=args.threshold)
    print(f"report: {report}\nper-layer table: {table}")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="write one self-contained HTML report (and a per-layer CSV) of a saved run")
    _flag(parser, "results", required=True, help="run folder, its results.safetensors, or an --output_dir holding one run")
    _flag(parser, "output", default=None, help="the HTML file to write (default <run folder>/report.html)")
    _flag(parser, "top_k", type=int, default=10, help="most superposed pairs listed per matrix and layer (default 10)")
    _flag(parser, "threshold", type=float, default=0.1, help="|value| above which a pair counts as overlapping (default 0.1)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.set_defaults(handler=_report_command)


def _reproduce_command(args: argparse.Namespace) -> None:
    from kis_lens.reproduce import ReproduceConfig, reproduce

    config = ReproduceConfig(
        model_name=args.model_name, facts=args.facts, record_size=args.record_size, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens or None, batch_token=args.batch_token, device=args.device, dtype=args.dtype,
        output_dir=args.output_dir, doc_path=args.doc_path, figures_dir=args.figures_dir, progress=not args.no_progress,
    )
    report = reproduce(config)
    print(f"done in {report.seconds['total']} s: {report.known['n_known']} of {report.known['n_facts']} facts known; "
          f"covariance on {report.covariance['tokens_total']:,} tokens")
    for verdict in report.verdicts:
        print(f"  {verdict['claim']}: {verdict['verdict']}")
    print(f"document: {config.doc_path}")


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("reproduce", help="classify facts, cache C on the offline Wikipedia, all matrices on every layer, write docs/reproduction.md")
    _flag(parser, "model_name", default=DEFAULT_MODEL, help=f"alias, hub name or local dir (default {DEFAULT_MODEL})")
    _flag(parser, "facts", default=DEFAULT_FACTS, help=f"facts to classify and sample (default {DEFAULT_FACTS})")
    _flag(parser, "record_size", type=int, default=DEFAULT_RECORD_SIZE, help=f"known facts sampled (default {DEFAULT_RECORD_SIZE})")
    _flag(parser, "top_k", type=int, default=1, help="known when the target is in the top-k next tokens (default 1)")
    _flag(parser, "seed", type=int, default=0, help="fact sampling seed")
    _flag(parser, "max_tokens", type=int, default=0, help="covariance token budget (default 0 = the whole corpus, ~1.2 M tokens)")
    _flag(parser, "batch_token", type=int, default=None, help="tokens per forward batch (default n_ctx)")
    _flag(parser, "device", default=None, help="cpu or cuda (default cuda when available)")
    _flag(parser, "dtype", default="float32", choices=sorted(DTYPES), help="model dtype (statistics stay float32/64)")
    _flag(parser, "output_dir", default=RunConfig().output_dir, help="caches, split and run results (default ./results)")
    _flag(parser, "doc_path", default="docs/reproduction.md", help="the Markdown document written")
    _flag(parser, "figures_dir", default="docs/figures/reproduction", help="where the HTML figures go")
    parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.set_defaults(handler=_reproduce_command)


def _edit_sim_command(args: argparse.Namespace) -> None:
    from kis_lens.lifelong import EditSimConfig, run_edit_simulation

    config = EditSimConfig(
        model_name=args.model_name, layer=args.layer, n_edits=args.n_edits, n_unedited=args.n_unedited,
        batch_size=args.batch_size, covariance_weight=args.covariance_weight, null_threshold=args.null_threshold,
        null_l2=args.null_l2, v_steps=args.v_steps, v_lr=args.v_lr, conditions=tuple(args.conditions.split(",")),
        facts=args.facts, seed=args.seed, device=args.device, dtype=args.dtype, output_dir=args.output_dir,
        max_tokens=args.max_tokens or None, ridge=args.ridge, progress=not args.no_progress,
    )
    started = time.perf_counter()
    result = run_edit_simulation(config)
    print(f"done in {time.perf_counter() - started:.1f} s: {config.n_edits} edits × {len(config.conditions)} conditions")
    for name in config.conditions:
        final = result.summary[name]["final"]
        retention = "n/a" if final["retention"] is None else f"{final['retention']:.2f}"
        print(f"  {name:16s} retention {retention}  efficacy(mean) {result.summary[name]['mean_efficacy']:.2f}  "
              f"unedited |Δlog p| {final['unedited_logprob_drift']:.3f}")
    if "rome" in result.summary:
        corr = result.summary["rome"]["predicted_vs_measured_logprob_drift"]
        print(f"  P-predicted vs measured drift (ROME): Spearman {corr['spearman']}")
    print(f"results: {result.path} (+ edit_retention.html, edit_interference.html)")


def _edit_sim_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.lifelong import CONDITIONS, EditSimConfig

    defaults = EditSimConfig()
    parser = sub.add_parser("edit-sim", help="lifelong editing: sequential ROME/MEMIT/AlphaEdit edits, P-predicted vs measured interference")
    _flag(parser, "model_name", default=DEFAULT_MODEL, help=f"alias, hub name or local dir (default {DEFAULT_MODEL})")
    _flag(parser, "layer", type=int, default=defaults.layer, help=f"layer whose W_out is edited (default {defaults.layer})")
    _flag(parser, "n_edits", type=int, default=defaults.n_edits, help=f"facts edited one after another (default {defaults.n_edits})")
    _flag(parser, "n_unedited", type=int, default=defaults.n_unedited, help=f"facts never edited, watched for drift (default {defaults.n_unedited})")
    _flag(parser, "batch_size", type=int, default=defaults.batch_size, help=f"facts per MEMIT batch (default {defaults.batch_size})")
    _flag(parser, "covariance_weight", type=float, default=defaults.covariance_weight, help="MEMIT's λ on C = E[kkᵀ]")
    _flag(parser, "null_threshold", type=float, default=defaults.null_threshold, help="AlphaEdit null space: eigenvalues of C below this × the largest")
    _flag(parser, "null_l2", type=float, default=defaults.null_l2, help="AlphaEdit's l2 term α")
    _flag(parser, "v_steps", type=int, default=defaults.v_steps, help="optimisation steps for each target value v")
    _flag(parser, "v_lr", type=float, default=defaults.v_lr, help="learning rate of the target value search")
    _flag(parser, "conditions", default=",".join(CONDITIONS), help=f"comma-separated subset of {','.join(CONDITIONS)}")
    _flag(parser, "facts", default=DEFAULT_FACTS, help="CounterFact facts (with target_new): counterfact-known or a path")
    _flag(parser, "seed", type=int, default=0, help="fact sampling seed")
    _flag(parser, "device", default=None, help="cpu or cuda (default cuda when available)")
    _flag(parser, "dtype", default="float32", choices=sorted(DTYPES), help="model dtype (solves are float64)")
    _flag(parser, "output_dir", default=defaults.output_dir, help="covariance caches and edit_sim results (default ./results)")
    _flag(parser, "max_tokens", type=int, default=defaults.max_tokens, help=f"corpus tokens for C (default {defaults.max_tokens})")
    _flag(parser, "ridge", type=float, default=0.0, help="add ridge·mean(diag C)·I to C before solving")
    parser.add_argument("--no_progress", "--no-progress", dest="no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.set_defaults(handler=_edit_sim_command)


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
    _stats_parsers(sub)
    for name, (help_text, names) in commands.items():
        command = sub.add_parser(name, help=help_text)
        _common_flags(command)
        _fact_flags(command)
        command.set_defaults(handler=_matrices_command(names))
        if name == "all":
            command.add_argument("--report", action="store_true", help="also write report.html and layer_summary.csv beside the results")
    _classify_parser(sub)
    _reproduce_parser(sub)
    _report_parser(sub)
    _edit_sim_parser(sub)
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
