"""Run files: every `kis` job writes its full config as YAML, and `kis --config FILE` reruns exactly that config."""

from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kis_lens import __version__
from kis_lens.blocks import field_kind, flat_settings, is_nested
from kis_lens.classify import ClassifyConfig
from kis_lens.cli import build_parser, main
from kis_lens.cli_stats import cache_cov_config
from kis_lens.config import CacheCovConfig, RunConfig
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.simulation import EditSimConfig
from kis_lens.editing.values import ValueSearch
from kis_lens.errors import KisError
from kis_lens.flags import config_from_args
from kis_lens.layout import run_file_beside, run_file_in
from kis_lens.reproduce import ReproduceConfig
from kis_lens.run_file import read_run_file, run_file_command, settings_from_file, write_run_file
from kis_lens.trace import TraceConfig

ROOT = Path(__file__).resolve().parents[2]
# Every job config, by the command that runs it (the same seven tests/test_config.py's JOB_CONFIGS names).
COMMANDS: dict[str, type] = {
    "all": RunConfig,
    "cache-cov": CacheCovConfig,
    "classify-facts": ClassifyConfig,
    "reproduce": ReproduceConfig,
    "trace": TraceConfig,
    "edit-sim": EditSimConfig,
    "lifelong": LifelongConfig,
}
# What a non-default value must respect beyond its type: the simulation needs numbers where lifelong takes None.
# (Settings bounded by each other, batch_size <= n_edits and max_rows > samples, stay in bounds at default + 1.)
NONE_REFUSED = {(EditSimConfig, "n_edits"), (EditSimConfig, "covariance_weight")}
TINY_RUN = ["--knowledge_type", "all", "--record_size", "8", "--max_tokens", "1500", "--no_progress", "--device", "cpu"]


def other_value(config_class: type, item) -> object:
    """Return a valid value of a setting other than its default: a None default gets a value of the field's type,
    and a value default None where the field allows it (so null is written and read back too)."""
    kind, optional = field_kind(typing.get_type_hints(config_class)[item.name])
    default, choices = item.default, item.metadata.get("choices")
    if is_nested(kind):  # a nested block: every one of its settings at another value
        return non_default(kind)
    if optional and default is not None and (config_class, item.name) not in NONE_REFUSED:
        return None
    if kind is bool:
        return True if default is None else not default
    if kind is tuple:
        return tuple(reversed(choices[-3:])) if choices else ("a", "b")
    if choices:
        return next(choice for choice in choices if choice != default)
    if kind is int:
        return 3 if default is None else default + 1
    if kind is float:
        return 2.5 if default is None else default * 1.5 + 0.25
    if kind is str:
        if item.name == "model_name":
            return "tiny-gpt2"
        return "cpu" if item.name == "device" else f"some dir/{item.name}"  # a path with a space, kept as given
    raise AssertionError(f"no non-default value for {config_class.__name__}.{item.name} of type {kind}")


def non_default(config_class: type) -> object:
    """Return the config with every setting at a valid value other than its default."""
    values = {item.name: other_value(config_class, item) for item in fields(config_class)}
    return config_class(**values)


def load_config(command: str, argv: list[str]) -> object:
    """Return the config `kis <command> <argv>` runs with (cache-cov through its own token-budget rule)."""
    args = build_parser().parse_args([command, *argv])
    return (
        cache_cov_config(args) if command == "cache-cov" else config_from_args(args, COMMANDS.get(command, RunConfig))
    )


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run each test in its temp dir, so the relative paths the configs hold land there."""
    monkeypatch.chdir(tmp_path)


def test_every_job_config_has_a_command_here():
    from test_config import JOB_CONFIGS  # tests/ is on the path (its conftest.py)

    assert set(COMMANDS.values()) == set(JOB_CONFIGS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_run_file_reads_back_as_the_same_config(command, tmp_path):
    config_class = COMMANDS[command]
    config = non_default(config_class)
    for item in flat_settings(
        config_class
    ):  # every setting differs, so a setting the writer drops fails the round trip
        assert item.value_of(config) != item.default, item.name
    path = write_run_file(tmp_path / "run.yaml", command, config)
    assert load_config(command, ["--config", str(path)]) == config
    data = read_run_file(path)
    assert data["command"] == command and data["kis_lens_version"] == __version__
    assert list(data["config"]) == [item.name for item in fields(config_class)]  # all of them, in field order
    assert data["config"]["output_dir"] == "some dir/output_dir"  # a path as given, not resolved
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# kis run file") and f"kis --config {path}" in text.replace("'", "")
    assert f"kis {command} --config" in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_and_field_types_read_back(command, tmp_path):
    """The defaults (None, inf-free floats, tuples, bool | None) read back as written, by type."""
    config_class = COMMANDS[command]
    path = write_run_file(tmp_path / "run.yaml", command, config_class())
    assert load_config(command, ["--config", str(path)]) == config_class()
    for name, value in settings_from_file(path, command, config_class).items():
        assert type(value) is type(getattr(config_class(), name)), name  # 1.0 stays a float, a tuple a tuple


def test_flags_given_override_the_file(tmp_path):
    config = RunConfig(model_name="tiny-gpt2", record_size=8, knowledge_type="all", progress=True, corpus="c.txt")
    path = write_run_file(tmp_path / "run.yaml", "all", config)
    argv = ["--config", str(path), "--record-size", "5", "--no_progress", "--prepend_bos", "false", "--download", "1"]
    loaded = load_config("all", argv)
    assert loaded == replace(config, record_size=5, progress=False, prepend_bos=False, corpus="wikipedia")
    assert load_config("all", [*argv[:2], "--max_tokens", "0"]).max_tokens is None  # the flag's word for None
    # A flag given before --config wins too: the order on the command line does not matter.
    assert load_config("all", ["--record_size", "6", "--config", str(path)]).record_size == 6
    lifelong = write_run_file(tmp_path / "lifelong.yaml", "lifelong", LifelongConfig(editors=("rome", "memit")))
    assert load_config("lifelong", ["--config", str(lifelong), "--editors", "none"]).editors == ("none",)
    cache = write_run_file(tmp_path / "cache-cov.yaml", "cache-cov", CacheCovConfig(max_tokens=700))
    # The file states max_tokens, so --sample_size does not lift the token budget as it does alone.
    assert load_config("cache-cov", ["--config", str(cache), "--sample_size", "3"]).max_tokens == 700


def test_a_hand_written_file_may_name_some_settings_and_the_flags_words(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("command: cache-cov\nconfig:\n  sample_size: all\n  max_memory: 2GB\n  ridge_free: 1\n")
    with pytest.raises(KisError, match="unknown setting 'ridge_free'"):
        load_config("cache-cov", ["--config", str(path)])
    path.write_text("config:\n  sample_size: all\n  max_memory: 2GB\n  batch_token: any\n")
    loaded = load_config("cache-cov", ["--config", str(path)])
    assert (loaded.sample_size, loaded.max_memory, loaded.batch_token) == (None, 2 * 10**9, None)
    assert loaded.corpus == CacheCovConfig().corpus  # left out: the default


def kis_error(capsys, argv: list[str]) -> str:
    """Return the one `kis: error:` line of a refused command (exit 2, no traceback)."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kis: error: ") and "Traceback" not in err
    return " ".join(err.split())


def test_an_unknown_key_is_refused_naming_it_and_the_fix(tmp_path, capsys):
    path = write_run_file(tmp_path / "run.yaml", "all", RunConfig())
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("  record_size:", "  record_sise:"), encoding="utf-8")
    err = kis_error(capsys, ["all", "--config", str(path)])
    assert "unknown setting 'record_sise' for `kis all`" in err and "did you mean record_size?" in err
    assert err.count(str(path)) == 1  # the message names the file once, without "(settings read from …)"
    path.write_text(text.replace("  token_position:", "  fact_token:"), encoding="utf-8")
    err = kis_error(capsys, ["--config", str(path)])
    assert "fact_token is the original scripts' name of token_position: write token_position instead" in err
    path.write_text(text.replace("config:", "model_name: x\nconfig:"), encoding="utf-8")
    err = kis_error(capsys, ["all", "--config", str(path)])
    assert "unknown key 'model_name' at the top level" in err and "settings go under config:" in err


def test_a_file_of_another_command_is_refused(tmp_path, capsys):
    path = write_run_file(tmp_path / "trace.yaml", "trace", TraceConfig())
    err = kis_error(capsys, ["all", "--config", str(path)])
    assert f"run file {path} is of `kis trace`, not `kis all`" in err
    assert f"kis --config {path}" in err and f"kis trace --config {path}" in err
    assert not (tmp_path / "results").exists()  # refused before anything ran


@pytest.mark.parametrize(
    "line, replacement, fragments",
    [
        ("  record_size: 128", "  record_size: eight", ["setting record_size is 'eight'", "a whole number"]),
        ("  progress: true", "  progress: maybe", ["setting progress is 'maybe'", "true or false"]),
        ("  ridge: 0.0", "  ridge: [1]", ["setting ridge is [1]", "not a number", "`ridge: 0.0` (its default)"]),
        ("  model_name: smollm2-135m", "  model_name: null", ["setting model_name is None", "not text"]),
        ("  knowledge_type: known", "  knowledge_type: some", ["one of known, unknown, all, mix"]),
        ("  start_layer: null", "  start_layer: first", ["a whole number, or null (0)"]),
        ("  model_name: smollm2-135m", "  model_name: 135", ["setting model_name is 135", "not text"]),
    ],
)
def test_a_value_of_the_wrong_type_is_refused(tmp_path, capsys, line, replacement, fragments):
    path = write_run_file(tmp_path / "run.yaml", "all", RunConfig())
    text = path.read_text(encoding="utf-8")
    assert line in text
    path.write_text(text.replace(line, replacement, 1), encoding="utf-8")
    err = kis_error(capsys, ["--config", str(path)])
    assert all(fragment in err for fragment in fragments), err


def test_a_tuple_setting_takes_a_list_of_its_choices(tmp_path, capsys):
    path = write_run_file(tmp_path / "lifelong.yaml", "lifelong", LifelongConfig())
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("  editors: [rome,", "  editors: rome\n  unused: [rome,"), encoding="utf-8")
    assert "a list of rome, r-rome" in kis_error(capsys, ["--config", str(path)])
    path.write_text(text.replace("  editors: [rome,", "  editors: [fancy, rome,"), encoding="utf-8")
    assert "setting editors is ['fancy'" in kis_error(capsys, ["--config", str(path)])


def test_a_bad_value_the_config_refuses_names_the_file(tmp_path, capsys):
    path = write_run_file(tmp_path / "run.yaml", "all", RunConfig())
    path.write_text(path.read_text().replace("  record_size: 128", "  record_size: 0"), encoding="utf-8")
    err = kis_error(capsys, ["all", "--config", str(path)])
    assert "record_size must be at least 1" in err and f"settings read from {path}" in err


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "no run file at"),
        ("config: [a\n", "is not valid YAML"),
        ("- all\n", "holds list, not the mapping"),
        ("config:\n  model_name: tiny-gpt2\n", "names no command: add `command: all`"),
        ("command: report\nconfig: {}\n", "`kis report`, which takes no run file"),
        ("command: all\nconfig: tiny-gpt2\n", "config must map setting names to values"),
    ],
)
def test_kis_config_alone_needs_a_run_file_naming_its_command(tmp_path, capsys, content, fragment):
    path = tmp_path / "run.yaml"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    assert fragment in kis_error(capsys, ["--config", str(path), "--output_dir", "out"])


def test_kis_config_alone_runs_the_files_command(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("kis_lens.cli._print_result_paths", lambda *args: None)

    def fake_run(config, names):
        seen.append((config, names))
        folder = Path(config.output_dir) / "run"
        folder.mkdir(parents=True)
        return SimpleNamespace(path=folder / "results.safetensors")

    monkeypatch.setattr("kis_lens.cli.run_matrices", fake_run)
    config = RunConfig(model_name="tiny-gpt2", output_dir="first")
    path = write_run_file(tmp_path / "q.yaml", "q-matrix", config)
    assert main(["--config", str(path), "--output-dir", "second"]) == 0
    assert main(["--debug", f"--config={path}"]) == 0
    assert seen[0] == (replace(config, output_dir="second"), ("q_matrix",)) and seen[1][0] == config
    # Each rerun wrote its own run file beside its results: the same command and config.
    assert run_file_command("second/run/run.yaml") == "q-matrix"
    assert load_config("q-matrix", ["--config", "first/run/run.yaml"]) == config


def test_write_config_writes_the_run_file_and_runs_nothing(tmp_path, capsys):
    argv = ["--model_name", "tiny-gpt2", "--layer", "0", "--n_edits", "6", "--batch_size", "3"]
    assert main(["edit-sim", *argv, "--write-config", "sim.yaml"]) == 0
    assert "run file: sim.yaml (run it: kis --config sim.yaml)" in capsys.readouterr().out
    assert load_config("edit-sim", ["--config", "sim.yaml"]) == load_config("edit-sim", argv)
    assert not (tmp_path / "results").exists()
    assert main(["cache-cov", "--sample_size", "3", "--write_config", "cache.yaml"]) == 0
    assert load_config("cache-cov", ["--config", "cache.yaml"]).max_tokens is None  # the flag's rule, then written


def test_every_job_writes_its_run_file_beside_its_results(tmp_path, monkeypatch):
    """Each command's handler writes the run file where kis_lens.layout says, with the config it ran."""
    import kis_lens.classify
    import kis_lens.editing.lifelong
    import kis_lens.editing.simulation
    import kis_lens.models
    import kis_lens.reproduce
    import kis_lens.runner
    import kis_lens.trace

    out = tmp_path / "out"
    seen: dict[str, object] = {}

    def keep(name, result):
        def job(config, *args, **kwargs):
            seen[name] = config
            return result

        return job

    split = SimpleNamespace(model_name="m", known=[1], unknown=[2], n_facts=2, top_k=1)
    monkeypatch.setattr(kis_lens.models, "load_model", lambda *args, **kwargs: None)
    monkeypatch.setattr(kis_lens.classify, "ensure_split", lambda *args, **kwargs: (split, out / "k" / "f_split.json"))
    cache = SimpleNamespace(paths={0: out / "stats" / "layer_0_mom2.safetensors"}, summary=lambda: "ok")
    monkeypatch.setattr(kis_lens.runner, "cache_covariance_job", keep("cache-cov", cache))
    numbers = out / "repro" / "reproduction_m.json"
    report = SimpleNamespace(
        seconds={"total": 1},
        known={"n_known": 1, "n_facts": 2},
        covariance={"tokens_total": 3},
        verdicts=[],
        settings={"doc_path": "d.md", "numbers_path": str(numbers)},
    )
    monkeypatch.setattr(kis_lens.reproduce, "reproduce", keep("reproduce", report))
    ie = torch.zeros(3).numpy()
    trace = SimpleNamespace(
        mean_indirect_effect=ie,
        facts=[],
        layers=[0],
        p_clean=ie,
        p_corrupt=ie,
        peak_layer=0,
        peak_layer_early=0,
        path=out / "trace" / "causal_trace_mlp_w10.json",
    )
    monkeypatch.setattr(kis_lens.trace, "causal_trace", keep("trace", trace))
    drift = {"spearman": None}
    rome = {"final": {"retention": None, "unedited_logprob_drift": 0.0}, "mean_efficacy": 0.0}
    summary = {"rome": {**rome, "predicted_vs_measured_logprob_drift": drift}}
    sim = SimpleNamespace(summary=summary, path=out / "edit_sim" / "layer_0_n6" / "edit_sim.json")
    monkeypatch.setattr(kis_lens.editing.simulation, "run_edit_simulation", keep("edit-sim", sim))
    final = {"score": None, "efficacy": None, "perplexity": 1.0, "n_edits": 1}
    lifelong = SimpleNamespace(
        summary={"final": final, "collapse": {"step": None}, "wall_seconds": 1.0},
        path=out / "lifelong" / "layer_0" / "lifelong_none_x.json",
        settings={"run_stem": "none_x"},
    )
    monkeypatch.setattr(kis_lens.editing.lifelong, "run_lifelong", keep("lifelong", {"none": lifelong}))
    expected = {
        "classify-facts": out / "k" / "f_split.yaml",
        "cache-cov": out / "stats" / "cache-cov.yaml",
        "reproduce": out / "repro" / "reproduction_m.yaml",
        "trace": out / "trace" / "causal_trace_mlp_w10.yaml",
        "edit-sim": out / "edit_sim" / "layer_0_n6" / "run.yaml",
        "lifelong": out / "lifelong" / "layer_0" / "lifelong.yaml",
    }
    extra = {
        "edit-sim": ["--n_edits", "6", "--batch_size", "3", "--conditions", "rome"],
        "lifelong": ["--n_edits", "1"],
    }
    for command, path in expected.items():
        argv = ["--model_name", "tiny-gpt2", "--output_dir", str(out), "--no_progress", *extra.get(command, [])]
        assert main([command, *argv]) == 0, command
        assert run_file_command(path) == command
        config = load_config(command, ["--config", str(path)])
        assert config == load_config(command, argv), command
        if command in seen:
            assert seen[command] == config, command


def test_run_file_names():
    assert run_file_in("a/b") == Path("a/b/run.yaml") and run_file_in("a", "lifelong") == Path("a/lifelong.yaml")
    assert run_file_beside("t/causal_trace_mlp_w10.json") == Path("t/causal_trace_mlp_w10.yaml")
    assert run_file_beside("n/numbers.yaml") == Path("n/numbers.run.yaml")  # never the result itself


@pytest.mark.slow
def test_kis_all_reruns_from_its_run_file_to_the_same_bits(capsys):
    assert main(["all", "--model_name", "tiny-gpt2", *TINY_RUN, "--output_dir", "tmp"]) == 0
    run = Path("runs/tiny-gpt2/all_sample_size_8/subject_last")
    path = "tmp" / run / "run.yaml"
    assert f"run file: {path} (rerun: kis --config {path})" in capsys.readouterr().out
    first = read_run_file(path)
    assert first["command"] == "all" and first["config"]["output_dir"] == "tmp"  # as given, not made absolute
    assert main(["--config", str(path), "--output_dir", "tmp2"]) == 0
    second = read_run_file("tmp2" / run / "run.yaml")
    assert second["config"] == {**first["config"], "output_dir": "tmp2"}
    before, after = load_file("tmp" / run / "results.safetensors"), load_file("tmp2" / run / "results.safetensors")
    assert set(before) == set(after) and "p_matrix" in before
    for name in before:  # the same config gives the same matrices, bit for bit
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize(
    "name, command, documented",
    [
        ("all.yaml", "all", {}),
        ("reproduce.yaml", "reproduce", {"model_name": "smollm2-135m", "max_tokens": 400_000, "docs_dir": "."}),
        ("lifelong.yaml", "lifelong", {"editors": ("rome", "r-rome", "p-rome", "memit", "alphaedit", "none")}),
    ],
)
def test_the_documented_commands_parse_into_their_configs(name, command, documented):
    """docs/commands/ holds the long documented runs as run files; regenerate one with its command plus
    `--write_config docs/commands/<name>` (e.g. kis reproduce --model_name smollm2-135m --max_tokens 400000
    --docs_dir . --write_config docs/commands/reproduce.yaml)."""
    path = ROOT / "docs" / "commands" / name
    assert run_file_command(path) == command
    settings = settings_from_file(path, command, COMMANDS[command])
    assert set(settings) == {item.name for item in fields(COMMANDS[command])}  # every setting, as the writer wrote
    config = COMMANDS[command](**settings)
    assert {key: getattr(config, key) for key in documented} == documented
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["kis_lens_version"]  # says which kis_lens wrote it
    if command == "lifelong":  # the value search as the nested mapping the writer writes
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["config"]["value_search"] == asdict(ValueSearch())


def test_every_field_type_has_a_reader():
    """A job config field of a type the run file reader has no rule for fails here, not in a user's rerun."""
    known = {bool, int, float, str, tuple}
    for config_class in COMMANDS.values():
        for item in flat_settings(config_class):  # a nested block's settings each (ValueSearch's: --value_steps)
            assert item.default is not MISSING
            assert item.kind in known, (config_class.__name__, item.name)


def test_a_nested_block_is_written_as_a_mapping_and_read_back(tmp_path):
    search = ValueSearch(steps=3, lr=0.25, kl_factor=0.0, stop_loss=-1.0, fast=False)
    config = LifelongConfig(value_search=search, n_edits=4)
    path = write_run_file(tmp_path / "lifelong.yaml", "lifelong", config)
    text = path.read_text(encoding="utf-8")
    assert "\n  value_search:  # the value search" in text and "\n    steps: 3  # " in text and "(default 20)" in text
    assert read_run_file(path)["config"]["value_search"] == asdict(search)
    assert load_config("lifelong", ["--config", str(path)]) == config
    # A flag of one of its settings changes that one, the file's others stay.
    loaded = load_config("lifelong", ["--config", str(path), "--value_lr", "0.5", "--kl_factor", "0.125"])
    assert loaded.value_search == replace(search, lr=0.5, kl_factor=0.125)
    # A hand-written file may name some of the block's settings: the others keep the config's defaults.
    path.write_text("command: edit-sim\nconfig:\n  value_search:\n    steps: 7\n", encoding="utf-8")
    assert load_config("edit-sim", ["--config", str(path)]).value_search == ValueSearch(steps=7)


def test_a_run_file_of_the_flat_value_settings_still_reads(tmp_path):
    """Run files written before the value search was nested held its settings flat, under these names."""
    path = tmp_path / "old.yaml"
    old = {"value_steps": 5, "value_lr": 0.25, "kl_factor": 0.0, "value_weight_decay": 0.125, "clamp_norm_factor": 2.0}
    lines = "".join(f"  {key}: {value}\n" for key, value in {**old, "fast_values": False}.items())
    path.write_text(f"command: lifelong\nconfig:\n  n_edits: 4\n{lines}", encoding="utf-8")
    expected = ValueSearch(steps=5, lr=0.25, kl_factor=0.0, weight_decay=0.125, clamp_norm_factor=2.0, fast=False)
    assert load_config("lifelong", ["--config", str(path)]) == LifelongConfig(n_edits=4, value_search=expected)
    path.write_text("command: edit-sim\nconfig:\n  v_steps: 4\n", encoding="utf-8")  # edit-sim's older name
    assert load_config("edit-sim", ["--config", str(path)]).value_search.steps == 4


@pytest.mark.parametrize(
    "block, fragments",
    [
        (
            "  value_search:\n    step: 3\n",
            ["unknown setting 'step' under value_search: for `kis lifelong`", "did you mean steps?"],
        ),
        ("  value_search:\n    v_lr: 3\n", ["v_lr is the original scripts' name of lr: write lr instead"]),
        ("  value_serch:\n    steps: 3\n", ["unknown setting 'value_serch'", "did you mean value_search?"]),
        ("  value_step: 3\n", ["unknown setting 'value_step'", "did you mean value_steps?"]),
        ("  value_search: 3\n", ["value_search must map its settings to values", "`steps: 20` indented"]),
        (
            "  value_search:\n    steps: many\n",
            ["setting value_search.steps is 'many'", "`steps: 20` under `value_search:`"],
        ),
        ("  value_search:\n    fast: maybe\n", ["setting value_search.fast is 'maybe'", "true or false"]),
        ("  value_search:\n    steps: 0\n", ["run file", "value_steps must be at least 1"]),
        ("  value_search:\n    steps: 3\n  value_steps: 4\n", ["value_search.steps is given twice"]),
    ],
)
def test_a_bad_nested_setting_is_refused_naming_it(tmp_path, capsys, block, fragments):
    path = tmp_path / "bad.yaml"
    path.write_text(f"command: lifelong\nconfig:\n{block}", encoding="utf-8")
    err = kis_error(capsys, ["--config", str(path), "--output_dir", "out"])
    assert all(fragment in err for fragment in fragments), err
