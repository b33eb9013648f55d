"""The `kis` CLI end to end on tiny models in a temp dir: documented files, cache reuse, clear errors."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

from kis_lens.blocks import flat_settings
from kis_lens.classify import ClassifyConfig
from kis_lens.cli import build_parser, main
from kis_lens.config import CacheCovConfig, ModelOptions, RunConfig, parse_bytes
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.simulation import EditSimConfig
from kis_lens.errors import KisError
from kis_lens.flags import config_from_args
from kis_lens.reproduce import ReproduceConfig
from kis_lens.results import load_result
from kis_lens.trace import TraceConfig

MATRIX_DIRS = ("p_matrix", "q_matrix", "whitening_cos_matrix", "activation_cos_matrix")
MATRIX_FILE_ENDS = ("p_matrix", "q_matrix", "cos_matrix", "cos_matrix")  # the original's: both cosines *_cos_matrix
CORPUS_ARGS = ["--max_tokens", "1500", "--no_progress", "--device", "cpu"]
TINY_RUN = ["--knowledge_type", "all", "--record_size", "8", *CORPUS_ARGS]


@pytest.mark.slow
def test_all_writes_the_documented_files(tmp_path, capsys):
    assert main(["all", "--model_name", "tiny-gpt2", "--output_dir", str(tmp_path), *TINY_RUN]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny-gpt2" / "all_sample_size_8" / "subject_last" / "results.safetensors"
    assert str(run) in out
    result = load_result(run)
    assert result.layers == [0, 1] and len(result.facts) == 8
    assert result.settings["config"]["model_name"] == "tiny-gpt2"
    for name, folder, end in zip(
        ("p_matrix", "q_matrix", "whitening_cos", "activation_cos"), MATRIX_DIRS, MATRIX_FILE_ENDS
    ):
        for layer in (0, 1):
            npy = tmp_path / folder / "tiny-gpt2" / "all_sample_size_8" / f"layer_{layer}_subject_last_{end}.npy"
            np.testing.assert_allclose(np.load(npy, allow_pickle=False), result.layer(name, layer).numpy(), rtol=1e-6)
    for layer in (0, 1):
        assert (
            tmp_path / "stats" / "tiny-gpt2" / "wikipedia-offline_stats" / f"layer_{layer}_mom2.safetensors"
        ).is_file()
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_single_matrix_commands_and_cache_reuse(tmp_path):
    args = [
        "--model-name",
        "tiny-llama",
        "--output-dir",
        str(tmp_path),
        "--start_layer",
        "1",
        "--end_layer",
        "1",
        *TINY_RUN,
    ]
    assert main(["cache-cov", *args[: -len(TINY_RUN)], *CORPUS_ARGS]) == 0
    cache = tmp_path / "stats" / "tiny-llama" / "wikipedia-offline_stats" / "layer_1_mom2.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert main(["p-matrix", *args]) == 0
    assert cache.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert main(["q-matrix", *args]) == 0
    folder = tmp_path / "p_matrix" / "tiny-llama" / "all_sample_size_8"
    p = np.load(folder / "layer_1_subject_last_p_matrix.npy")
    np.testing.assert_allclose(np.diag(p), 1.0, rtol=1e-6)
    assert not (
        tmp_path / "p_matrix" / "tiny-llama" / "all_sample_size_8" / "layer_0_subject_last_p_matrix.npy"
    ).exists()


@pytest.mark.slow
def test_cache_from_another_model_is_refused(tmp_path, capsys):
    common = ["--output_dir", str(tmp_path), "--end_layer", "0", *CORPUS_ARGS]
    assert main(["cache-cov", "--model_name", "tiny-gpt2", *common]) == 0
    source = tmp_path / "stats" / "tiny-gpt2" / "wikipedia-offline_stats" / "layer_0_mom2.safetensors"
    target = tmp_path / "stats" / "tiny-llama" / "wikipedia-offline_stats" / "layer_0_mom2.safetensors"
    target.parent.mkdir(parents=True)
    shutil.copy(source, target)
    assert (
        main(["p-matrix", "--model_name", "tiny-llama", *common, "--knowledge_type", "all", "--record_size", "4"]) == 2
    )
    assert "was made for model_name='tiny-gpt2', not 'tiny-llama'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["all", "--model_name", "gpt3-small"], "unknown model 'gpt3-small'"),
        (["all", "--model_name", "tiny-gpt2", "--end_layer", "5"], "out of range: this model has layers 0..1"),
        (
            ["all", "--model_name", "tiny-gpt2", "--knowledge_type", "all", "--record_size", "1000"],
            "larger than the 436 facts",
        ),
        (["all", "--model_name", "tiny-gpt2", "--facts", "/nonexistent.json"], "not found"),
    ],
)
@pytest.mark.slow
def test_bad_input_exits_2_without_traceback(tmp_path, args, message):
    completed = subprocess.run(
        [sys.executable, "-m", "kis_lens.cli", *args, "--output_dir", str(tmp_path), "--no_progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert not list(tmp_path.rglob("*"))  # nothing written


# --- Flags generated from the config dataclasses: one default per setting, both spellings, clear errors. ---

# command -> its config, every field of which is a flag (tests/test_config.py checks that no field is left off)
CONFIG_COMMANDS = {
    **{name: RunConfig for name in ("all", "p-matrix", "q-matrix", "whitening-cos", "activation-cos")},
    "cache-cov": CacheCovConfig,
    "classify-facts": ClassifyConfig,
    "reproduce": ReproduceConfig,
    "edit-sim": EditSimConfig,
    "lifelong": LifelongConfig,
    "trace": TraceConfig,
}
REQUIRED_ARGS = {
    "merge-stats": ["a.safetensors", "--output_dir", "out"],
    "import-stats": ["x.npz", "--model_name", "tiny-gpt2", "--layer", "0"],
    "export-stats": ["c.safetensors", "--output", "x.npz"],
    "report": ["--results", "run"],
}


def subcommands() -> dict:
    """Return {name: subparser} of the `kis` parser."""
    parser = build_parser()
    (action,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(action.choices)


def flag_spellings(item) -> list[str]:
    """Return the spellings users type for a field (bools that default to True are --no_<name>)."""
    name = f"no_{item.name}" if item.default is True else item.name
    return [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]


def non_default_cli_value(item) -> tuple[list[str], object]:
    """Return (value tokens after the flag, the field value they parse to), a value other than the default."""
    if item.default is True:
        return [], False
    if item.default is False:
        return [], True
    if item.name == "max_memory":
        return ["2GB"], 2 * 10**9
    if isinstance(item.default, tuple):
        return [",".join(item.default[:2])], item.default[:2]
    if "choices" in item.metadata:
        choice = next(choice for choice in item.metadata["choices"] if choice != item.default)
        return [choice], choice
    if item.name == "prepend_bos":
        return ["false"], False
    if isinstance(item.default, float):
        return [str(item.default + 0.5)], item.default + 0.5
    if item.default is None and item.name == "covariance_weight":
        return ["2.5"], 2.5
    if isinstance(item.default, int) or (item.default is None and item.name in INT_NONE_FIELDS):
        value = 3 if item.default is None else item.default + 1
        return [str(value)], value
    return ["some/other_value"], "some/other_value"


INT_NONE_FIELDS = {"start_layer", "end_layer", "sample_size", "batch_token", "max_tokens", "n_edits", "value_prompts"}


@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
def test_flag_defaults_are_the_config_defaults(command, monkeypatch, capsys):
    config_class = CONFIG_COMMANDS[command]
    args = build_parser().parse_args([command])
    assert config_from_args(args, config_class) == config_class()  # unset flags leave the dataclass default
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for item in flat_settings(config_class):  # a nested block's settings too: --value_steps (default 20)
        if isinstance(item.default, bool):
            continue
        shown = item.metadata.get("none") if item.default is None else str(item.default)
        shown = (
            ",".join(item.default) if isinstance(item.default, tuple) else shown
        )  # comma-separated on the command line
        assert f"(default {shown}" in help_text or f"(default {item.metadata.get('cli_none')} = {shown}" in help_text, (
            item.name
        )


@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
def test_both_spellings_parse_to_the_same_config(command):
    config_class = CONFIG_COMMANDS[command]
    parser = build_parser()
    for item in flat_settings(config_class):  # a nested block's settings set its block: --value_steps
        tokens, expected = non_default_cli_value(item)
        configs = [
            config_from_args(parser.parse_args([command, spelling, *tokens]), config_class)
            for spelling in flag_spellings(item)
        ]
        assert item.value_of(configs[0]) == expected != item.value_of(config_class()), item.name
        assert all(config == configs[0] for config in configs), item.name
    if "max_tokens" in {item.name for item in fields(config_class)}:
        assert (
            config_from_args(parser.parse_args([command, "--max_tokens", "0"]), config_class).max_tokens is None
        )  # 0 = no limit
    snake = parser.parse_args([command, "--model_name", "tiny-gpt2", "--output_dir", "o", "--no_progress"])
    kebab = parser.parse_args([command, "--model-name", "tiny-gpt2", "--output-dir", "o", "--no-progress"])
    assert config_from_args(snake, config_class) == config_from_args(kebab, config_class)


@pytest.mark.parametrize("command", list(CONFIG_COMMANDS))
def test_help_lists_every_config_field(command, monkeypatch, capsys):
    config_class = CONFIG_COMMANDS[command]
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for item in flat_settings(config_class):
        for spelling in flag_spellings(item):
            assert spelling in help_text, spelling
        assert item.metadata["help"] in help_text, item.name


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["all", "--record_size", "0"], ["record_size must be at least 1", "--record_size 1 or more"]),
        (["p-matrix", "--ridge", "-1"], ["ridge must be zero or positive", "--ridge 1e-6"]),
        (["all", "--max-tokens", "-5"], ["max_tokens must be at least 1", "--max_tokens 1 or more"]),
        (["cache-cov", "--sample_size", "0"], ["sample_size must be at least 1"]),
        (["classify-facts", "--top_k", "0"], ["top_k must be at least 1", "--top_k 1 or more"]),
        (["reproduce", "--n_top_pairs", "-1"], ["n_top_pairs must be at least 0"]),
        (["edit-sim", "--n_edits", "1"], ["n_edits must be at least 2"]),
        (["edit-sim", "--conditions", "rome,fancy"], ["unknown condition(s) ['fancy']", "choose from rome"]),
    ],
)
def test_bad_setting_exits_2_before_the_model_loads(tmp_path, capsys, args, fragments):
    # An unknown model would fail later with another message: the config is checked first.
    code = main([*args, "--model_name", "no-such-model", "--output_dir", str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kis: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    assert not list(tmp_path.rglob("*"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["all", "--record_size", "many"], "invalid int value: 'many'"),
        (["all", "--knowledge-type", "some"], "invalid choice: 'some'"),
        (["cache-cov", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["classify-facts", "--prepend_bos", "yes"], "invalid choice: 'yes'"),
        (["cache-cov", "--record_size", "4"], "unrecognized arguments: --record_size"),
    ],
)
def test_unparsable_flag_exits_2(capsys, args, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_every_subcommand_takes_debug():
    parser = build_parser()
    for name in subcommands():
        required = REQUIRED_ARGS.get(name, [])
        assert parser.parse_args([name, *required, "--debug"]).debug is True, name
        assert parser.parse_args([name, *required]).debug is False, name


def test_configs_validate_and_keep_keyword_construction():
    config = RunConfig(model_name="tiny-gpt2", knowledge_type="all", record_size=16, max_tokens=2000)
    assert isinstance(config, ModelOptions) and config.dtype is None and config.output_dir == "results"
    assert RunConfig(**config.to_dict()) == config
    assert ReproduceConfig().model_name == RunConfig().model_name and ReproduceConfig().top_k == ClassifyConfig().top_k
    for bad, message in [
        (dict(knowledge_type="some"), "unknown knowledge_type 'some': use one of known, unknown, all, mix"),
        (dict(fact_order="random"), "unknown fact_order 'random': use one of sample, first"),
        (dict(layout="rome"), "unknown layout 'rome': use one of kis, original"),
        (dict(stats_dir=""), "stats_dir must be a folder path"),
        (dict(token_position="middle"), "unknown token_position 'middle'"),
        (dict(record_size=0), "record_size must be at least 1"),
        (dict(max_tokens=0), "max_tokens must be at least 1 (or None for no limit)"),
        (dict(sample_size=-1), "sample_size must be at least 1"),
        (dict(ridge=-0.5), "ridge must be zero or positive"),
        (dict(ridge=float("nan")), "ridge must be zero or positive"),
        (dict(dtype="float8"), "unknown dtype 'float8'"),
        (dict(prepend_bos="yes"), "prepend_bos must be True, False or None"),
        (dict(model_name=""), "model_name must be"),
    ]:
        with pytest.raises(KisError, match=re.escape(message)):
            RunConfig(**bad)
    with pytest.raises(KisError, match="top_k must be at least 1"):
        ClassifyConfig(top_k=0)
    with pytest.raises(KisError, match="top_k must be at least 1"):
        ReproduceConfig(top_k=0)
    for borrowing in (ClassifyConfig, TraceConfig):  # BOS borrowed from the corpus block is checked there too
        with pytest.raises(KisError, match="prepend_bos must be True, False or None"):
            borrowing(prepend_bos="yes")
    with pytest.raises(KisError, match="unknown condition"):
        EditSimConfig(conditions=("rome", "fancy"))
    assert EditSimConfig(model_name="tiny-gpt2", layer=0, n_edits=6, batch_size=3).dtype is None


def test_cache_cov_token_budget(monkeypatch):
    import kis_lens.runner

    seen = []

    class Report:
        paths: dict = {}  # no caches written, so no run file beside them

        def summary(self):
            return "ok"

    def fake_job(config):
        seen.append(config)
        return Report()

    monkeypatch.setattr(kis_lens.runner, "cache_covariance_job", fake_job)
    assert main(["cache-cov", "--device", "cpu"]) == 0
    assert (
        main(["cache-cov", "--device", "cpu", "--sample_size", "3"]) == 0
    )  # --sample_size alone: every token of those texts
    assert (
        main(["cache-cov", "--device", "cpu", "--sample-size", "3", "--max_tokens", "500", "--checkpoint_every", "0"])
        == 0
    )
    assert [config.max_tokens for config in seen] == [RunConfig().max_tokens, None, 500]
    assert seen[0].stats_dtype == "float64" and seen[0].checkpoint_every == 5_000_000
    assert seen[2].checkpoint_every is None  # 0 = no checkpoints


def test_parse_bytes():
    assert (
        parse_bytes("30GB") == 30 * 10**9 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("2e9") == 2 * 10**9
    )
    assert parse_bytes(None) is None and parse_bytes(1024) == 1024
    with pytest.raises(KisError, match="cannot read 'lots' as a memory size"):
        parse_bytes("lots")
    with pytest.raises(KisError, match="must be positive"):
        parse_bytes("0GB")


# --- The original scripts' flags: aliases of kis settings, so their commands paste unchanged. ---

MATRIX_COMMANDS = ("all", "p-matrix", "q-matrix", "whitening-cos", "activation-cos")
WITH_CACHE = (*MATRIX_COMMANDS, "cache-cov")
# (the original's tokens, the kis tokens they mean, the commands that take them)
ALIASES = [
    (["--fact_token", "last"], ["--token_position", "last"], MATRIX_COMMANDS),
    (["--fact-token", "subject_first"], ["--token_position", "subject_first"], MATRIX_COMMANDS),
    (["--batch_tokens", "2048"], ["--batch_token", "2048"], WITH_CACHE),
    (["--batch-tokens", "512"], ["--batch_token", "512"], WITH_CACHE),
    (["--precision", "float16"], ["--dtype", "float16"], WITH_CACHE),
    (["--precision", "float64"], ["--dtype", "float64"], WITH_CACHE),
    (["--precision", "bfloat16"], ["--dtype", "bfloat16"], WITH_CACHE),
    (["--download", "1"], ["--corpus", "wikipedia"], WITH_CACHE),
    (["--download"], ["--corpus", "wikipedia"], WITH_CACHE),
    (["--ds_name", "counterfact"], ["--facts", "counterfact-known"], MATRIX_COMMANDS),
    (["--ds-name", "counterfact"], ["--facts", "counterfact-known"], MATRIX_COMMANDS),
]


@pytest.mark.parametrize("alias, meaning, commands", ALIASES, ids=lambda value: " ".join(value)[:40])
def test_original_flag_is_an_alias_of_a_kis_setting(alias, meaning, commands):
    parser = build_parser()
    for command in commands:
        args = parser.parse_args([command, *alias])
        assert meaning[0].removeprefix("--") in vars(args), (command, alias)  # set the kis setting's own dest
        assert config_from_args(args) == config_from_args(parser.parse_args([command, *meaning])), (command, alias)


@pytest.mark.parametrize("command", WITH_CACHE)
def test_help_lists_the_original_flags(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    shared = ["--batch_tokens", "--precision", "--stats_dir", "--download"]
    facts_only = ["--fact_token", "--ds_name", "--fact_order", "--layout"]
    for flag in shared + (facts_only if command != "cache-cov" else []):
        assert flag in help_text, (command, flag)
    if command == "cache-cov":
        assert not any(f"{flag} " in help_text for flag in facts_only)
    else:
        assert "mix = known and unknown together, the same facts as all" in help_text
    assert "streams --corpus wikipedia from the hub when no --corpus is given" in help_text


def test_original_commands_paste_unchanged():
    parser = build_parser()
    pasted = config_from_args(
        parser.parse_args(["p-matrix", "--model_name", "gpt2-small", "--fact_token", "subject_last"])
    )
    assert pasted == RunConfig(model_name="gpt2-small", token_position="subject_last")
    cache = parser.parse_args(
        [
            "cache-cov",
            "--model_name=EleutherAI/pythia-1b",
            "--batch_tokens=2048",
            "--precision=float32",
            "--stats_dir=data/stats",
            "--download=0",
            "--sample_size=100000",
        ]
    )
    assert config_from_args(cache, CacheCovConfig) == CacheCovConfig(
        model_name="EleutherAI/pythia-1b", batch_token=2048, dtype="float32", stats_dir="data/stats", sample_size=100000
    )
    mixed = config_from_args(
        parser.parse_args(["all", "--ds_name=counterfact", "--knowledge_type=mix", "--record_size=64"])
    )
    assert (mixed.facts, mixed.knowledge_type, mixed.record_size) == ("counterfact-known", "mix", 64)


def test_the_kis_flag_wins_over_a_value_alias():
    parser = build_parser()
    for tokens in (["--corpus", "my.txt", "--download", "1"], ["--download", "1", "--corpus", "my.txt"]):
        assert config_from_args(parser.parse_args(["all", *tokens])).corpus == "my.txt"
    assert config_from_args(parser.parse_args(["all", "--download", "0"])).corpus == RunConfig().corpus
    for tokens in (
        ["--facts", "known-1000", "--ds_name", "counterfact"],
        ["--ds_name", "counterfact", "--facts", "known-1000"],
    ):
        assert config_from_args(parser.parse_args(["all", *tokens])).facts == "known-1000"


def test_new_settings_parse_into_the_config():
    parser = build_parser()
    config = config_from_args(
        parser.parse_args(["all", "--fact_order", "first", "--layout", "original", "--stats-dir", "cov"])
    )
    assert (config.fact_order, config.layout, config.stats_dir) == ("first", "original", "cov")
    assert config_from_args(parser.parse_args(["cache-cov", "--stats_dir", "cov"])).stats_dir == "cov"
    assert {"fact_order", "layout", "stats_dir"} <= set(config.to_dict())  # recorded in every run's settings


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            ["all", "--ds_name", "zsre"],
            "--ds_name 'zsre' is not accepted: use counterfact (= --facts counterfact-known)",
        ),
        (
            ["p-matrix", "--download", "2"],
            "--download '2' is not accepted: use 0 (no change), 1 (= --corpus wikipedia)",
        ),
        (["cache-cov", "--download", "yes"], "or give --corpus directly"),
    ],
)
def test_unknown_original_value_is_a_clear_error(tmp_path, capsys, args, fragment):
    code = main([*args, "--model_name", "no-such-model", "--output_dir", str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kis: error: ") and "Traceback" not in err
    assert fragment in err, err
    with pytest.raises(KisError, match="is not accepted"):
        build_parser().parse_args(args)


def test_bare_kis_prints_the_help_and_first_steps_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: kis" in out and "first steps:" in out and "kis all --model_name tiny-gpt2" in out
    assert list(tmp_path.iterdir()) == []  # no results folder: nothing ran


def test_version_prints_the_package_version(capsys):
    from kis_lens import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"kis_lens {__version__}"


@pytest.mark.slow
def test_report_without_results_writes_the_latest_runs_report_and_says_which(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--model_name", "tiny-gpt2", "--knowledge_type", "all", "--max_tokens", "400", "--no_progress"]
    assert main(["all", *tiny, "--record_size", "4"]) == 0
    assert main(["all", *tiny, "--record_size", "6"]) == 0
    capsys.readouterr()
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    newest = tmp_path / "results" / "runs" / "tiny-gpt2" / "all_sample_size_6" / "subject_last"
    assert f"the latest run under results/ is {newest.relative_to(tmp_path)}" in out
    assert (newest / "report.html").is_file()
    assert not (newest.parent.parent / "all_sample_size_4" / "subject_last" / "report.html").exists()


@pytest.mark.slow
def test_known_facts_of_a_random_weight_model_are_refused_naming_knowledge_type_all(tmp_path, capsys):
    """tiny-gpt2 knows one of the 436 facts: a one-fact run has no pair, so the default is refused with the fix."""
    args = ["all", "--model_name", "tiny-gpt2", "--output_dir", str(tmp_path), "--max_tokens", "400", "--no_progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "too few for a pair" in err and "use --knowledge_type all" in err
    assert not (tmp_path / "runs").exists()


def test_help_groups_the_settings_by_block_and_lists_the_original_spellings_last(capsys):
    with pytest.raises(SystemExit):
        main(["all", "--help"])
    out = capsys.readouterr().out
    sections = [line[:-1] for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == [
        "options",
        "model and output",
        "layers",
        "facts",
        "corpus (for C)",
        "settings of this command",
        "the original scripts' spellings (each sets the setting it names)",
    ]
    original = out[out.index("the original scripts' spellings") :]
    for spelling in ("--precision", "--fact_token", "--batch_tokens", "--ds_name", "--download", "--dataset"):
        assert (
            spelling in original
            and spelling not in out[: out.index("the original scripts' spellings")].split("\n\n", 1)[1]
        )
    assert "--no_progress" in out and "turn off: progress bars (on by default)" in out
    with pytest.raises(SystemExit):
        main(["lifelong", "--help"])
    assert "turn off: continue an interrupted run" in capsys.readouterr().out
