"""The job configs are composed of blocks: every setting is declared once, restated defaults keep the block's help,
and a nested block (the editing jobs' value_search) is one field whose settings are flags of their own."""

from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass, fields, is_dataclass, replace

import pytest

from kis_lens.blocks import (
    Override,
    block_of,
    borrow,
    field_kinds,
    flat_settings,
    help_groups,
    is_nested,
    setting,
    with_defaults,
    with_flat,
)
from kis_lens.classify import ClassifyConfig
from kis_lens.cli import build_parser, main
from kis_lens.config import CacheCovConfig, CacheOptions, CorpusOptions, FactOptions, ModelOptions, RunConfig
from kis_lens.editing.lifelong_config import LifelongConfig
from kis_lens.editing.options import EditorOptions
from kis_lens.editing.simulation import EditSimConfig
from kis_lens.editing.values import ValueSearch
from kis_lens.errors import KisError
from kis_lens.flags import config_from_args
from kis_lens.reproduce import ReproduceConfig
from kis_lens.trace import TraceConfig

JOB_CONFIGS = (RunConfig, CacheCovConfig, ClassifyConfig, ReproduceConfig, TraceConfig, EditSimConfig, LifelongConfig)


def declared(cls: type) -> list[str]:
    """Return the settings a class declares itself (restated ones, from with_defaults or borrow, are not)."""
    restated = cls.__dict__.get("__restated__", ())
    return [name for name in cls.__dict__.get("__annotations__", {}) if name not in restated]


def nested_blocks(configs: tuple[type, ...]) -> set[type]:
    """Return the blocks some config nests whole (ValueSearch)."""
    return {kind for config in configs for kind, _ in field_kinds(config).values() if is_nested(kind)}


def duplicate_settings(configs: tuple[type, ...]) -> dict[str, list[str]]:
    """Return {setting: the classes declaring it} for every setting declared in more than one job config or block.

    A nested block's settings count under their own names and under their flags' (kl_factor, value_kl_factor): a
    config that copied one flat, under either name, declares it twice."""
    classes = {base for config in configs for base in config.__mro__ if is_dataclass(base)}
    owners: dict[str, list[str]] = defaultdict(list)
    for cls in classes:
        for name in declared(cls):
            owners[name].append(cls.__name__)
    for block in nested_blocks(configs):
        for name in declared(block):
            owners[name].append(block.__name__)
            owners[block.FLAG_PREFIX + name].append(block.__name__)
    return {name: sorted(found) for name, found in owners.items() if len(found) > 1}


def test_no_setting_is_declared_twice():
    assert duplicate_settings(JOB_CONFIGS) == {}


def test_a_redeclared_setting_is_found():
    @dataclass(frozen=True)
    class Copying(ModelOptions):
        facts: str = setting("counterfact-known", "a second declaration of FactOptions.facts")

    assert duplicate_settings((*JOB_CONFIGS, Copying)) == {"facts": ["Copying", "FactOptions"]}

    @dataclass(frozen=True)
    class CopyingTheSearch(EditorOptions):  # the value search's settings copied flat, as configs once did
        kl_factor: float = setting(0.0625, "a second declaration of ValueSearch.kl_factor")
        value_lr: float = setting(0.5, "a second declaration of ValueSearch.lr, under its flag")

    found = duplicate_settings((*JOB_CONFIGS, CopyingTheSearch))
    assert found == {"kl_factor": ["CopyingTheSearch", "ValueSearch"], "value_lr": ["CopyingTheSearch", "ValueSearch"]}
    with pytest.raises(TypeError, match=r"settings \['value_lr'\] would share a flag"):
        flat_settings(CopyingTheSearch)


def test_every_restated_setting_comes_from_a_block_with_its_help():
    blocks = {base for config in JOB_CONFIGS for base in config.__mro__ if is_dataclass(base)}
    owners = {name: cls for cls in blocks | {FactOptions, CorpusOptions, RunConfig} for name in declared(cls)}
    for config in JOB_CONFIGS:
        for base in config.__mro__:
            for name in base.__dict__.get("__restated__", ()):
                assert name in owners, (base.__name__, name)
                block_field = owners[name].__dataclass_fields__[name]
                restated = base.__dataclass_fields__[name]
                assert restated.type == block_field.type, (base.__name__, name)
                assert set(restated.metadata) >= set(block_field.metadata) - {"none"}, (base.__name__, name)


def test_restated_defaults_differ_only_where_a_job_says_so():
    assert TraceConfig().facts == "known-1000" and ClassifyConfig().facts == RunConfig().facts
    assert ReproduceConfig().max_tokens is None and RunConfig().max_tokens == 100_000
    assert EditSimConfig().max_tokens == 50_000 and LifelongConfig().max_tokens == 100_000
    assert (EditSimConfig().batch_size, LifelongConfig().batch_size) == (8, 16)
    assert EditSimConfig.__dataclass_fields__["null_threshold"].metadata["help"].endswith("× the largest")
    assert "held-out text" in LifelongConfig.__dataclass_fields__["corpus"].metadata["help"]


def test_the_value_search_is_nested_whole_and_handed_to_the_editors_as_it_is():
    for config_class in (EditSimConfig, LifelongConfig):
        assert config_class().value_search == ValueSearch()  # ROME's GPT-2 XL hparams, declared once on ValueSearch
        names = {item.name for item in fields(config_class)}
        flags = {ValueSearch.FLAG_PREFIX + item.name for item in fields(ValueSearch)}
        assert not names & ({item.name for item in fields(ValueSearch)} | flags), config_class  # no flat copies
    search = ValueSearch(steps=3, lr=0.1, kl_factor=0.0, fast=False)
    config = LifelongConfig(value_search=search, memit_clamp_norm_factor=0.5)
    assert config.editor_settings.rome_search is search
    assert config.editor_settings.memit_search == replace(search, clamp_norm_factor=0.5)  # MEMIT's own clamp
    assert LifelongConfig().editor_settings.memit_search == ValueSearch(clamp_norm_factor=0.75)


def test_flat_keywords_still_construct_every_config():
    run = RunConfig(model_name="tiny-gpt2", corpus="c.txt", max_tokens=500, knowledge_type="all", start_layer=1)
    assert (run.corpus, run.max_tokens, run.knowledge_type, run.start_layer) == ("c.txt", 500, "all", 1)
    sim = EditSimConfig(layer=0, n_edits=6, batch_size=3, value_search=ValueSearch(steps=5))
    assert sim.to_dict()["value_search"]["steps"] == 5  # edit_sim.json records the block as a mapping
    assert LifelongConfig(editors=("rome",), n_edits=3, value_search=ValueSearch(steps=2)).value_search.steps == 2
    with pytest.raises(TypeError, match="value_steps"):  # the block's settings are no fields of the config
        LifelongConfig(value_steps=2)
    assert isinstance(EditSimConfig(), EditorOptions) and isinstance(LifelongConfig(), EditorOptions)


def test_with_flat_lays_flat_settings_into_their_blocks():
    given = with_flat(LifelongConfig, {"layer": 2}, {"value_steps": 3, "value_fast": False, "n_edits": 5})
    assert given == {"layer": 2, "n_edits": 5, "value_search": ValueSearch(steps=3, fast=False)}
    over = with_flat(LifelongConfig, {"value_search": ValueSearch(lr=0.1)}, {"value_steps": 4})
    assert over["value_search"] == ValueSearch(steps=4, lr=0.1)  # the block given keeps its other settings
    with pytest.raises(KisError, match="--value_lr must be positive, not 0: e.g. --value_lr 0.5"):
        with_flat(EditSimConfig, {}, {"value_lr": 0})


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"steps": 0}, "value_steps must be at least 1, not 0: pass --value_steps 1 or more"),
        ({"lr": float("nan")}, "--value_lr must be a finite number, not nan: e.g. --value_lr 0.5 (its default)"),
        ({"kl_factor": -1.0}, "--value_kl_factor must be zero or more, not -1.0: e.g. --value_kl_factor 0.0625"),
        ({"clamp_norm_factor": 0.0}, "--value_clamp_norm_factor must be positive"),
        ({"weight_decay": float("inf")}, "--value_weight_decay must be a finite number"),
    ],
)
def test_the_value_search_refuses_what_it_cannot_run_naming_the_flag(change, fragment):
    with pytest.raises(KisError) as error:
        ValueSearch(**change)
    assert fragment in str(error.value)


def test_block_of_projects_a_config_and_fills_what_it_lacks():
    run = RunConfig(model_name="tiny-gpt2", corpus="c.txt", sample_size=7, output_dir="out")
    request = block_of(run, CacheOptions)
    assert (request.model_name, request.corpus, request.sample_size, request.output_dir) == (
        "tiny-gpt2",
        "c.txt",
        7,
        "out",
    )
    assert request.stats_dtype == CacheOptions().stats_dtype  # a RunConfig has no cache options: the block's
    editing = block_of(LifelongConfig(corpus="d.txt", max_tokens=300), CorpusOptions)
    assert (editing.corpus, editing.max_tokens, editing.corpus_order) == ("d.txt", 300, "first")


def test_cache_cov_takes_no_fact_settings():
    names = {item.name for item in fields(CacheCovConfig)}
    assert names.isdisjoint({"facts", "record_size", "knowledge_type", "token_position", "layout", "ridge"})
    assert {item.name for item in fields(CacheOptions)} <= names


def test_restating_a_setting_no_block_has_is_refused():
    with pytest.raises(TypeError, match="inherits no setting 'nothing'"):

        @dataclass(frozen=True)
        @with_defaults(nothing=1)
        class Broken(ModelOptions):
            pass

    with pytest.raises(TypeError, match="CorpusOptions has no setting 'facts' for AlsoBroken to borrow"):

        @dataclass(frozen=True)
        @borrow(CorpusOptions, "facts")
        class AlsoBroken(ModelOptions):
            pass


def test_override_changes_only_what_it_names():
    @dataclass(frozen=True)
    @borrow(CorpusOptions, max_tokens=Override(help="another help"))
    class Budget(ModelOptions):
        pass

    item = Budget.__dataclass_fields__["max_tokens"]
    assert item.default == CorpusOptions().max_tokens and item.metadata["help"] == "another help"
    assert item.metadata["cli_none"] == 0  # the rest of the block's metadata comes along


def test_editing_configs_refuse_what_only_lifelong_can_run():
    with pytest.raises(KisError, match="n_edits must be at least 2"):
        EditSimConfig(n_edits=None)
    with pytest.raises(KisError, match="covariance_weight must be >= 0"):
        EditSimConfig(covariance_weight=None)


def config_subcommands() -> dict[str, argparse.ArgumentParser]:
    """Return {name: subparser} of every `kis` subcommand whose flags are generated from a job config."""
    (action,) = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return {name: sub for name, sub in action.choices.items() if sub.get_default("config_class") is not None}


def test_every_setting_of_every_job_has_its_flag():
    """No job's parser leaves out a setting of its config, a nested block's included: a setting a job cannot honour is
    no field of its config."""
    commands = config_subcommands()
    assert {sub.get_default("config_class") for sub in commands.values()} == set(JOB_CONFIGS)
    for name, sub in commands.items():
        config_class = sub.get_default("config_class")
        # By the setting's own spelling: an original script's flag (--ds_name) sets the same dest without being it.
        spellings = {spelling for action in sub._actions for spelling in action.option_strings}
        blocks = {item.block for item in flat_settings(config_class) if item.block}
        assert blocks == ({"value_search"} if issubclass(config_class, EditorOptions) else set()), name
        expected = {item.name for item in fields(config_class) if item.name not in blocks}
        for block in blocks:  # each setting of a nested block is a flag under its prefix
            nested = type(getattr(config_class(), block))
            expected |= {nested.FLAG_PREFIX + item.name for item in fields(nested)}
        flat = {item.name for item in flat_settings(config_class)}
        assert flat == expected, (name, expected ^ flat)
        missing = [flag for flag in sorted(flat) if not {f"--{flag}", f"--no_{flag}"} & spellings]
        assert not missing, f"kis {name} has no flag for {config_class.__name__} settings {missing}"


@pytest.mark.parametrize("command, config_class", [("edit-sim", EditSimConfig), ("lifelong", LifelongConfig)])
def test_the_value_search_flags_set_its_block(command, config_class):
    parser = build_parser()
    for flags in (
        ["--value_steps", "3", "--value_lr", "0.25", "--value_kl_factor", "0", "--value_weight_decay", "0.1"],
        ["--v_steps", "3", "--v_lr", "0.25", "--kl_factor", "0", "--value-weight-decay", "0.1"],  # aliases, kebab
    ):
        extra = ["--value_clamp_norm_factor", "2", "--value_stop_loss", "-1", "--no_value_fast"]
        config = config_from_args(parser.parse_args([command, *flags, *extra]), config_class)
        assert config.value_search == ValueSearch(3, 0.25, 0.0, 0.1, 2.0, -1.0, False), flags
    assert config_from_args(parser.parse_args([command, "--no_fast_values"]), config_class).value_search.fast is False
    assert config_from_args(parser.parse_args([command]), config_class).value_search == ValueSearch()


def test_the_value_search_flags_have_their_help_section(capsys):
    with pytest.raises(SystemExit):
        main(["lifelong", "--help"])
    out = capsys.readouterr().out
    section = out[out.index("\nvalue search:\n") : out.index("the original scripts' spellings")]
    for flag in ("--value_steps", "--value_lr", "--value_kl_factor", "--value_clamp_norm_factor", "--no_value_fast"):
        assert flag in section, flag
    assert "--value_stop_loss" in section and "negative: never early" in " ".join(section.split())
    assert "= --value_kl_factor" in out and "= --no_value_fast" in out  # --kl_factor, --no_fast_values


# The settings only some jobs honour: prepend_bos where the job tokenizes with a BOS of the user's choosing (the
# others follow the model's convention), seed where it draws something at random.
HONOURED = {
    RunConfig: {"prepend_bos", "seed"},
    CacheCovConfig: {"prepend_bos"},  # samples nothing (a shuffled corpus has its own corpus_seed)
    ClassifyConfig: {"prepend_bos"},  # classifies every fact
    ReproduceConfig: {"seed"},
    TraceConfig: {"prepend_bos", "seed"},
    EditSimConfig: {"seed"},
    LifelongConfig: {"seed"},
}


def test_a_job_config_holds_only_the_settings_it_honours():
    assert set(HONOURED) == set(JOB_CONFIGS)
    for config_class, honoured in HONOURED.items():
        names = {item.name for item in fields(config_class)}
        assert names & {"prepend_bos", "seed"} == honoured, config_class.__name__
    with pytest.raises(TypeError, match="prepend_bos"):
        LifelongConfig(prepend_bos=True)
    with pytest.raises(TypeError, match="seed"):
        CacheCovConfig(seed=3)


@pytest.mark.parametrize(
    "argv",
    [
        ["lifelong", "--prepend_bos", "true"],
        ["edit-sim", "--prepend-bos", "false"],
        ["reproduce", "--prepend_bos", "true"],
        ["cache-cov", "--seed", "3"],
        ["classify-facts", "--seed", "3"],
    ],
)
def test_a_setting_the_job_does_not_have_is_an_unknown_flag(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {' '.join(argv[1:])}" in capsys.readouterr().err


def test_the_cache_request_keeps_the_bos_the_job_was_given():
    """A covariance cache's identity depends on BOS: the block the cache job receives carries it."""
    assert block_of(CacheCovConfig(prepend_bos=False), CacheOptions).prepend_bos is False
    assert block_of(RunConfig(prepend_bos=True), CacheOptions).prepend_bos is True
    assert block_of(LifelongConfig(), CacheOptions).prepend_bos is None  # the model's own convention


def test_borrowed_bos_stays_in_the_model_section_of_jobs_without_a_corpus():
    assert help_groups(RunConfig)["prepend_bos"] == CorpusOptions.HELP_GROUP
    for config_class in (ClassifyConfig, TraceConfig):
        assert help_groups(config_class)["prepend_bos"] == ModelOptions.HELP_GROUP
        assert help_groups(config_class)["facts"] == FactOptions.HELP_GROUP
