"""The `kis` command: one subcommand per step of the original scripts, each a thin call into kis_lens.runner.

The cache commands are kis_lens.cli_stats'. The flags of a job are generated from its config dataclass
(kis_lens.flags reads each field's type, default and help), so a default lives only on its field. Only command
options that are not settings of a job are declared here. Every job that writes results also writes its run file
(kis_lens.run_file; where: kis_lens.layout), which `kis --config FILE` reruns.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from kis_lens._version import __version__
from kis_lens.cli_stats import add_stats_commands, cache_cov_config
from kis_lens.config import DEFAULT_OUTPUT_DIR, RunConfig, check_outputs
from kis_lens.errors import KisError
from kis_lens.file_errors import file_failure_message
from kis_lens.flags import (
    RUN_FILE_OPTION,
    WRITE_RUN_FILE_DEST,
    add_config_flags,
    add_subcommand,
    config_from_args,
    default_of,
    flag,
)
from kis_lens.layout import latest_results, run_file_beside, run_file_in
from kis_lens.matrices import MATRIX_NAMES
from kis_lens.run_file import announce_run_file, run_file_command
from kis_lens.runner import run_matrices


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
        announce_run_file(run_file_in(result.path.parent), args.command, config)
        if getattr(args, "report", False):
            from kis_lens.editing.results import run_report_sections
            from kis_lens.report import write_report_files

            report, table = write_report_files(result, sections=[run_report_sections])
            print(f"report: {report}\nper-layer table: {table}")

    return command


def _classify_facts_command(args: argparse.Namespace) -> None:
    from kis_lens.classify import ClassifyConfig, ensure_split
    from kis_lens.models import load_model

    config = config_from_args(args, ClassifyConfig)
    started = time.perf_counter()
    model = load_model(config.model_name, device=config.device, dtype=config.dtype)
    split, path = ensure_split(
        model,
        config.facts,
        config.output_dir,
        top_k=config.top_k,
        prepend_bos=config.prepend_bos,
        recompute=True,
        progress=config.progress,
    )
    print(
        f"done in {time.perf_counter() - started:.1f} s: {split.model_name} knows {len(split.known)} of "
        f"{split.n_facts} facts of {config.facts} (target in its top-{split.top_k}); {len(split.unknown)} unknown"
    )
    print(f"split: {path} (used by --knowledge_type known|unknown with the same --output_dir)")
    announce_run_file(run_file_beside(path), args.command, config)


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.classify import ClassifyConfig

    parser = add_subcommand(sub, "classify-facts", "split the facts into known/unknown for a model (top-k next token)")
    add_config_flags(parser, ClassifyConfig)
    parser.set_defaults(handler=_classify_facts_command)


def _report_command(args: argparse.Namespace) -> None:
    from kis_lens.editing.results import run_report_sections
    from kis_lens.report import report_from_results

    check_outputs({"output": args.output})
    results = args.results
    if results is None:
        results = latest_results(DEFAULT_OUTPUT_DIR)
        print(f"kis report: no --results given; the latest run under {DEFAULT_OUTPUT_DIR}/ is {results.parent}")
    report, table = report_from_results(
        results,
        args.output,
        top_k=args.top_k,
        threshold=args.threshold,
        sections=[run_report_sections],
        thin=args.thin,
        self_contained=args.self_contained,
    )
    print(f"report: {report}\nper-layer table: {table}")


def _report_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.report import report_from_results

    parser = add_subcommand(
        sub, "report", "write the HTML report (plotly.min.js beside it) and a per-layer CSV of a saved run"
    )
    top_k, threshold = default_of(report_from_results, "top_k"), default_of(report_from_results, "threshold")
    flag(
        parser,
        "results",
        default=None,
        help=f"run folder, its results.safetensors, or an --output_dir holding one run (default: the latest run "
        f"under {DEFAULT_OUTPUT_DIR}/)",
    )
    flag(parser, "output", default=None, help="the HTML file to write (default <run folder>/report.html)")
    flag(
        parser,
        "top_k",
        type=int,
        default=top_k,
        help=f"most superposed pairs listed per matrix and layer (default {top_k})",
    )
    flag(
        parser,
        "threshold",
        type=float,
        default=threshold,
        help=f"|value| above which a pair counts as overlapping (default {threshold})",
    )
    flag(parser, "thin", action="store_true", help="smaller report: heatmaps at 8 bits a value, no histograms or KDEs")
    flag(
        parser,
        "self_contained",
        action="store_true",
        help="embed Plotly (4.8 MB) in report.html instead of writing plotly.min.js beside it",
    )
    parser.set_defaults(handler=_report_command)


def _reproduce_command(args: argparse.Namespace) -> None:
    from kis_lens.reproduce import ReproduceConfig, reproduce

    config = config_from_args(args, ReproduceConfig)
    report = reproduce(config)
    print(
        f"done in {report.seconds['total']} s: {report.known['n_known']} of {report.known['n_facts']} facts known; "
        f"covariance on {report.covariance['tokens_total']:,} tokens"
    )
    for verdict in report.verdicts:
        print(f"  {verdict.claim}: {verdict.verdict}")
    print(f"document: {report.settings['doc_path']}\nnumbers: {report.settings['numbers_path']}")
    announce_run_file(run_file_beside(report.settings["numbers_path"]), args.command, config)


def _reproduce_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.reproduce import ReproduceConfig

    parser = add_subcommand(
        sub,
        "reproduce",
        "classify facts, cache C on four token quarters, all matrices on every layer, judge each claim of the paper",
    )
    add_config_flags(parser, ReproduceConfig)
    parser.set_defaults(handler=_reproduce_command)


def _edit_sim_command(args: argparse.Namespace) -> None:
    from kis_lens.editing.simulation import EditSimConfig, run_edit_simulation

    config = config_from_args(args, EditSimConfig)
    started = time.perf_counter()
    result = run_edit_simulation(config)
    print(
        f"done in {time.perf_counter() - started:.1f} s: {config.n_edits} edits × {len(config.conditions)} conditions"
    )
    for name in config.conditions:
        final = result.summary[name]["final"]
        retention = "n/a" if final["retention"] is None else f"{final['retention']:.2f}"
        print(
            f"  {name:16s} retention {retention}  efficacy(mean) {result.summary[name]['mean_efficacy']:.2f}  "
            f"unedited |Δlog p| {final['unedited_logprob_drift']:.3f}"
        )
    if "rome" in result.summary:
        corr = result.summary["rome"]["predicted_vs_measured_logprob_drift"]
        print(f"  P-predicted vs measured drift (ROME): Spearman {corr['spearman']}")
    print(f"results: {result.path} (+ edit_retention.html, edit_interference.html)")
    announce_run_file(run_file_in(result.path.parent), args.command, config)


def _edit_sim_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.editing.simulation import EditSimConfig

    parser = add_subcommand(
        sub, "edit-sim", "patched-output edit simulation: real vs whitened-orthogonal keys, P-predicted interference"
    )
    add_config_flags(parser, EditSimConfig)
    parser.set_defaults(handler=_edit_sim_command)


def _lifelong_command(args: argparse.Namespace) -> None:
    from kis_lens.editing.lifelong import run_lifelong
    from kis_lens.editing.lifelong_config import LifelongConfig

    config = config_from_args(args, LifelongConfig)
    results = run_lifelong(config, command=shlex.join(["kis", *args.argv]))
    for editor, result in results.items():
        final, collapse = result.summary["final"], result.summary["collapse"]
        score = "n/a" if final["score"] is None else f"{final['score']:.2f}"
        efficacy = "n/a" if final["efficacy"] is None else f"{final['efficacy']:.2f}"
        collapsed = "no collapse" if collapse["step"] is None else f"collapse at {collapse['step']} edits"
        print(
            f"  {editor:10s} {final['n_edits']} edits in {result.summary['wall_seconds']:.0f} s: score {score}, "
            f"efficacy {efficacy}, perplexity {final['perplexity']:.2f}, {collapsed}"
        )
    folder = next(iter(results.values())).path.parent
    stems = ", ".join(result.settings["run_stem"] for result in results.values())
    print(f"results: {folder} ({stems}; figures lifelong_metrics.html, lifelong_interference.html)")
    announce_run_file(run_file_in(folder, args.command), args.command, config)  # the run the folder's figures show


def _lifelong_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.editing.lifelong_config import LifelongConfig

    parser = add_subcommand(
        sub,
        "lifelong",
        "hundreds of real sequential edits (ROME, r-/p-ROME, MEMIT, AlphaEdit, EMMET, none), CounterFact metrics",
    )
    add_config_flags(parser, LifelongConfig)
    parser.set_defaults(handler=_lifelong_command)


def _trace_command(args: argparse.Namespace) -> None:
    from kis_lens.trace import TraceConfig, causal_trace

    config = config_from_args(args, TraceConfig)
    started = time.perf_counter()
    result = causal_trace(config)
    ie = result.mean_indirect_effect
    print(
        f"done in {time.perf_counter() - started:.1f} s: {len(result.facts)} facts × {len(result.layers)} layers, "
        f"p_clean {result.p_clean.mean():.4f}, p_corrupt {result.p_corrupt.mean():.4f}"
    )
    print(f"peak layer {result.peak_layer} (mean IE {ie[result.peak_layer]:.4f}, last layer left out)")
    print(f"early-to-middle peak layer {result.peak_layer_early} (mean IE {ie[result.peak_layer_early]:.4f})")
    print(f"results: {result.path}")
    announce_run_file(run_file_beside(result.path), args.command, config)


def _trace_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.trace import TraceConfig

    parser = add_subcommand(
        sub, "trace", "ROME's causal trace: indirect effect of restoring each layer's MLP output (to choose the layer)"
    )
    add_config_flags(parser, TraceConfig)
    parser.set_defaults(handler=_trace_command)


def _study_command(args: argparse.Namespace) -> None:
    from kis_lens.docs.lifelong_study import write_study
    from kis_lens.layout import study_folders

    runs, traces = study_folders(args.output_dir, args.model_name)
    folder = Path(args.runs) if args.runs else runs
    traces = Path(args.traces) if args.traces else traces
    started = time.perf_counter()
    written = write_study(folder, traces, n_boot=args.bootstrap)
    numbers = written["study"]
    print(f"done in {time.perf_counter() - started:.1f} s: {len(numbers['runs'])} runs under {folder}")
    for row in numbers["collapse_by_editor"]:
        print(f"  {row['editor']:>9}  layer {row['layer']}  collapse, {row['n_orders']} order(s): {row['verdict']}")
    for row in numbers["prediction_across_orders"]:
        print(f"  {row['editor']:>9}  layer {row['layer']}  P predicts the NLL rise beyond the count: {row['verdict']}")
    print(f"study: {written['markdown']}\nnumbers: {written['numbers']}\nfigures: {written['figures']}")


def _study_parser(sub: argparse._SubParsersAction) -> None:
    from kis_lens.models import DEFAULT_MODEL

    parser = add_subcommand(
        sub, "study", "verdicts across edit orders of finished `kis lifelong` runs: study.md, study.json, figures"
    )
    flag(parser, "model_name", default=DEFAULT_MODEL, help=f"whose runs (default {DEFAULT_MODEL})")
    flag(parser, "output_dir", default=DEFAULT_OUTPUT_DIR, help=f"where kis wrote them (default {DEFAULT_OUTPUT_DIR})")
    flag(
        parser,
        "runs",
        default=None,
        help="the folder of the runs, every layer_<L>/ in it (default <output_dir>/lifelong/<model_name>, or an older "
        "kis's <output_dir>/<model_name>/lifelong)",
    )
    flag(
        parser,
        "traces",
        default=None,
        help="the `kis trace` outputs (default <output_dir>/trace/<model_name>, or <output_dir>/<model_name>/trace)",
    )
    flag(parser, "bootstrap", type=int, default=1000, help="bootstrap resamples of every interval (default 1000)")
    parser.set_defaults(handler=_study_command)


FIRST_STEPS = """first steps:
  kis all --model_name tiny-gpt2 --knowledge_type all    # the main job on a tiny offline model, in seconds
  kis all --report                                       # SmolLM2-135M: 30 layers, 128 facts (~4 min, 2 CPU cores)
  kis report                                             # write report.html of the latest run
  kis --config results/runs/.../run.yaml                 # rerun a job from the run file it wrote
each command's flags: kis <command> --help"""


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `kis` command."""
    parser = argparse.ArgumentParser(
        prog="kis",
        description="Knowledge superposition matrices on TransformerLens models.",
        epilog=FIRST_STEPS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kis_lens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "all": ("keys once, then all four matrices for every layer", MATRIX_NAMES),
        "p-matrix": ("P = k_iᵀC⁻¹k_j / k_iᵀC⁻¹k_i per layer", ("p_matrix",)),
        "q-matrix": ("Q = k_i·k_j per layer", ("q_matrix",)),
        "whitening-cos": ("cosine of keys in the whitened space per layer", ("whitening_cos",)),
        "activation-cos": ("cosine of keys per layer", ("activation_cos",)),
    }
    add_stats_commands(sub)
    for name, (help_text, names) in commands.items():
        command = add_subcommand(sub, name, help_text)
        add_config_flags(command, RunConfig)
        command.set_defaults(handler=_matrices_command(names))
        if name == "all":
            command.add_argument(
                "--report", action="store_true", help="also write report.html and layer_summary.csv beside the results"
            )
    _classify_parser(sub)
    _reproduce_parser(sub)
    _report_parser(sub)
    _edit_sim_parser(sub)
    _lifelong_parser(sub)
    _study_parser(sub)
    _trace_parser(sub)
    return parser


def _write_config_only(args: argparse.Namespace) -> None:
    """Write the run file of the parsed settings to --write_config's path, running nothing (`kis --config` runs it)."""
    config = cache_cov_config(args) if args.command == "cache-cov" else config_from_args(args, args.config_class)
    announce_run_file(Path(getattr(args, WRITE_RUN_FILE_DEST)), args.command, config, "run it")


def _commands_with_run_files(parser: argparse.ArgumentParser) -> list[str]:
    """Return the subcommands that take --config (every job with a config)."""
    (action,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return [
        name
        for name, sub in action.choices.items()
        if any(RUN_FILE_OPTION in option.option_strings for option in sub._actions)
    ]


def with_run_file_command(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Return argv with the run file's command put first when `kis --config FILE [flags]` names no command."""
    if not argv or not argv[0].startswith("-") or argv[0] in ("-h", "--help", "--version"):
        return argv
    # Only --config is read here (as argparse reads it: "--config F" or "--config=F"); the job's parser reads the rest.
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument(RUN_FILE_OPTION, dest="path", default=None)
    path = first.parse_known_args(argv)[0].path
    if path is None:
        return argv
    command = run_file_command(path)
    commands = _commands_with_run_files(parser)
    if command not in commands:
        raise KisError(
            f"run file {path} is of `kis {command}`, which takes no run file: use one of {', '.join(commands)}"
        )
    return [command, *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `kis` command line; return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # `kis` alone shows what there is to run, and runs nothing
        parser.print_help()
        return 0
    try:
        argv = with_run_file_command(argv, parser)
        args = parser.parse_args(argv)  # an original script's flag with a value kis cannot map raises KisError
        args.argv = argv  # the command as typed, recorded by the commands that keep it
    except KisError as error:
        if "--debug" in argv:
            raise
        print(f"kis: error: {error}", file=sys.stderr)
        return 2
    try:
        if getattr(args, WRITE_RUN_FILE_DEST, None) is not None:
            _write_config_only(args)
        else:
            args.handler(args)
    except KisError as error:
        if args.debug:
            raise
        print(f"kis: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # The boundary's narrow net: a file read or write that failed where no KisError was raised at the source.
        # Anything else is a bug and keeps its traceback.
        message = file_failure_message(error)
        if message is None or args.debug:
            raise
        print(f"kis: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
