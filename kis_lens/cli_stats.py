"""The `kis` commands of the covariance caches: cache-cov estimates them, merge-stats, import-stats and export-stats
move them between machines and to and from ROME/MEMIT/AlphaEdit's layer_stats .npz files.

kis_lens.cli adds them to its parser (``add_stats_commands``); each handler is a thin call into cache_job or storage.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from kis_lens.config import CacheCovConfig, ModelOptions, check_outputs
from kis_lens.flags import add_config_flags, add_subcommand, config_from_args, default_of, flag, given_settings
from kis_lens.layout import run_file_in
from kis_lens.run_file import announce_run_file


def cache_cov_config(args: argparse.Namespace) -> CacheCovConfig:
    """Return the CacheCovConfig of parsed `kis cache-cov` flags.

    --sample_size without --max_tokens lifts the token budget: every token of those texts, or of the whole corpus
    for --sample_size all (what the original Cache_Cov.py's --sample_size all read).
    """
    given = given_settings(args, CacheCovConfig)  # a run file's settings count as given
    unlimited = "sample_size" in given and "max_tokens" not in given
    return config_from_args(args, CacheCovConfig, **({"max_tokens": None} if unlimited else {}))


def _cache_cov_command(args: argparse.Namespace) -> None:
    from kis_lens.distributed import init_from_env, local_device
    from kis_lens.runner import cache_covariance_job

    rank, _ = init_from_env()  # under torchrun: join the group, shard the corpus, all-reduce the sums
    requested = cache_cov_config(args)
    config = requested
    if config.device is None and local_device():
        config = replace(config, device=local_device())
    report = cache_covariance_job(config)
    if rank == 0:
        print(f"done: {report.summary()}")
        if report.paths:  # the requested config: each rank of a rerun under torchrun picks its own device again
            folder = next(iter(report.paths.values())).parent
            announce_run_file(run_file_in(folder, args.command), args.command, requested)


def _merge_stats_command(args: argparse.Namespace) -> None:
    from kis_lens.storage import merge_caches

    check_outputs({"output_dir": args.output_dir})
    for path in merge_caches(args.inputs, args.output_dir, dtype=args.stats_dtype):
        print(f"merged: {path}")


def _import_stats_command(args: argparse.Namespace) -> None:
    from kis_lens.storage import import_layer_stats

    check_outputs({"output_dir": args.output_dir})
    prepend_bos = None if args.prepend_bos is None else args.prepend_bos == "true"
    path = import_layer_stats(
        args.npz,
        args.model_name,
        args.layer,
        args.output_dir,
        args.corpus,
        prepend_bos=prepend_bos,
        max_length=args.max_length,
    )
    print(
        f"imported {args.npz} as {path} (C = mom2.mom2 / mom2.count; the model's fingerprint is recorded on first use)"
    )


def _export_stats_command(args: argparse.Namespace) -> None:
    import numpy as np

    from kis_lens.storage import export_npz

    check_outputs({"output": args.output})
    path = export_npz(args.cache, args.output, precision=args.precision, sample_size=args.sample_size)
    with np.load(path, allow_pickle=False) as data:
        sample_size = int(data["sample_size"])
    layer_name = args.layer_name or "{layer_name}"
    print(
        f"exported {args.cache} as {path} "
        f"(sample_size {sample_size}: ROME loads it only for mom2_n_samples={sample_size})"
    )
    print(
        f"ROME/MEMIT look it up as {layer_name}_{args.precision}_mom2_{sample_size}.npz "
        f"in their {{model}}/{{dataset}}_stats folder"
        + (
            ""
            if args.layer_name
            else ", layer_name being hparams.rewrite_module_tmp of the layer (e.g. transformer.h.5.mlp.c_proj)"
        )
    )


def add_stats_commands(sub: argparse._SubParsersAction) -> None:
    from kis_lens.storage import STATS_DTYPES, export_npz, import_layer_stats, merge_caches

    stats_dtypes = sorted(STATS_DTYPES)
    cache = add_subcommand(
        sub, "cache-cov", "estimate and cache C = E[k kᵀ] for every layer in one pass (resumable; torchrun shards it)"
    )
    add_config_flags(cache, CacheCovConfig)
    cache.set_defaults(handler=_cache_cov_command)
    merge = add_subcommand(sub, "merge-stats", "merge caches computed on separate machines (sums and counts add)")
    merge.add_argument(
        "inputs", nargs="+", help="cache files, or stats folders whose layer_*_mom2.safetensors are merged by name"
    )
    flag(merge, "output_dir", required=True, help="folder for the merged caches")
    merged_dtype = default_of(merge_caches, "dtype")
    flag(
        merge,
        "stats_dtype",
        default=merged_dtype,
        choices=stats_dtypes,
        help=f"dtype of the stored C (default {merged_dtype})",
    )
    importer = add_subcommand(
        sub,
        "import-stats",
        "read a ROME/MEMIT/AlphaEdit layer_stats .npz (mom2.mom2 = Σ k kᵀ, mom2.count) as a kis cache",
    )
    importer.add_argument("npz", help="the .npz file")
    flag(importer, "model_name", required=True, help="the model it was computed on (as you pass it to kis)")
    flag(importer, "layer", type=int, required=True, help="its layer")
    # Not argparse-required: the handler names the flag and why it is needed in one `kis: error:` line.
    flag(
        importer,
        "prepend_bos",
        choices=["true", "false"],
        default=None,
        help="required: whether BOS preceded each text when it was computed (ROME: the HF tokenizer's default)",
    )
    flag(
        importer,
        "max_length",
        type=int,
        default=None,
        help="the token length texts were truncated to (ROME: n_positions), recorded when given",
    )
    output_dir, corpus = default_of(ModelOptions, "output_dir"), default_of(import_layer_stats, "corpus")
    flag(importer, "output_dir", default=output_dir, help=f"kis output folder (default {output_dir})")
    flag(
        importer,
        "corpus",
        default=corpus,
        help=f"the corpus it was computed on (names the cache folder; default {corpus})",
    )
    exporter = add_subcommand(
        sub, "export-stats", "write a kis cache as the layer_stats .npz ROME/MEMIT/AlphaEdit write and load"
    )
    exporter.add_argument("cache", help="a layer_*_mom2.safetensors cache")
    flag(exporter, "output", required=True, help="the .npz to write")
    precision = default_of(export_npz, "precision")
    flag(
        exporter,
        "precision",
        default=precision,
        choices=stats_dtypes,
        help=f"dtype of the stored sum, ROME's precision (default {precision})",
    )
    flag(
        exporter,
        "sample_size",
        type=int,
        default=None,
        help=(
            "the sample_size ROME matches against mom2_n_samples "
            "(default the cache's sample_size, else its number of texts)"
        ),
    )
    flag(
        exporter,
        "layer_name",
        default=None,
        help="ROME's module name of the layer, only to print the file name ROME looks for",
    )
    merge.set_defaults(handler=_merge_stats_command)
    importer.set_defaults(handler=_import_stats_command)
    exporter.set_defaults(handler=_export_stats_command)
