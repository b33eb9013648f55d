"""kis_lens.editing.lifelong_files: loading, naming and ordering lifelong runs, on synthetic run files and on legacy
lifelong_<editor>.json files of an older kis (tests/lifelong_fixtures.py)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
from lifelong_fixtures import (
    MODEL,
    file_name,
    legacy_results,
    loaded,
    make_result,
    standard_results,
    write_results,
)

from kis_lens import layout
from kis_lens.docs import lifelong_verdicts as verdicts
from kis_lens.editing import lifelong_files as files
from kis_lens.editing import lifelong_report as report
from kis_lens.editing.registry import EDITORS as REGISTRY
from kis_lens.errors import KisError

# -------------------------------------------------------------------------------------------------------- loading


def test_labels_colours_and_order_come_from_the_registry():
    for name, editor in REGISTRY.items():
        assert files.editor_label(name) == editor.label and files.editor_colour(name) == editor.colour
    assert files.editor_label("alphaedit-legacy") == "AlphaEdit-legacy"
    assert files.editor_colour("alphaedit-legacy") not in {editor.colour for editor in REGISTRY.values()}
    assert files.editor_label("zeta") == "zeta" and files.editor_colour("zeta") == files.FALLBACK_COLOUR
    assert not any(hasattr(files, name) for name in ("EDITORS", "EDITOR_LABELS", "EDITOR_COLORS"))
    names = ["zeta", "none", "emmet", "alphaedit-legacy", "alphaedit", "p-rome", "memit", "rome", "r-rome", "extra"]
    assert files.editor_order(names) == [
        *("rome", "r-rome", "p-rome", "memit", "alphaedit", "alphaedit-legacy", "emmet", "none"),
        *("extra", "zeta"),
    ]


def test_load_orders_editors_and_names_the_files(tmp_path):
    results = standard_results()
    results["zeta"] = make_result("zeta")
    results["extra"] = make_result("extra")
    folder = write_results(tmp_path / "layer_5", {name: results[name] for name in ("none", "zeta", "memit", "extra")})
    write_results(folder, {"alphaedit": results["alphaedit"], "rome": results["rome"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one set of settings: nothing left out, no warning
        found = files.load_lifelong_results(folder)
    assert list(found) == ["rome", "memit", "alphaedit", "none", "extra", "zeta"]
    assert found["memit"] == {**results["memit"], "_source": file_name(results["memit"]), "_legacy": False}
    assert found["rome"]["_source"].startswith("lifelong_rome_seed7_n9_layer5_")
    assert files.run_names(found)[0] == found["rome"]["_source"]
    assert layout.lifelong_file(folder, "rome") == folder / "lifelong_rome.json"
    assert layout.lifelong_dir("out", MODEL, 5) == Path("out") / "lifelong" / MODEL / "layer_5"


def test_load_empty_folder_names_folder_and_command(tmp_path):
    (tmp_path / "other.json").write_text("{}", encoding="utf-8")
    with pytest.raises(KisError, match=r"kis lifelong") as error:
        files.load_lifelong_results(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_load_broken_file_is_a_kis_error(tmp_path):
    (tmp_path / "lifelong_rome.json").write_text('{"steps": [', encoding="utf-8")
    with pytest.raises(KisError, match="lifelong_rome.json"):
        files.load_lifelong_results(tmp_path)


def two_seeds(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Write seed 7's runs (older) and seed 8's (newer, rome collapsing later) into one folder; return both."""
    old = standard_results()
    new = {name: make_result(name, collapse=r["summary"]["collapse"]["step"], seed=8) for name, r in old.items()}
    new["rome"] = make_result("rome", collapse=8, seed=8)
    write_results(folder, old, mtime=1_000_000)
    write_results(folder, new, mtime=2_000_000)
    return old, new


def test_two_seeds_in_one_folder_are_both_kept_and_picked_by_stem(tmp_path):
    old, new = two_seeds(tmp_path)
    assert len(list(tmp_path.glob("lifelong_*.json"))) == 8  # no run overwrote another
    groups = files.lifelong_run_groups(tmp_path)
    assert [sorted(group) for group in groups] == [
        sorted(r["settings"]["run_stem"] for r in new.values()),  # the newest first
        sorted(r["settings"]["run_stem"] for r in old.values()),
    ]
    for results in (old, new):
        stems = [result["settings"]["run_stem"] for result in results.values()]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # stems given: nothing is left out
            picked = files.load_lifelong_results(tmp_path, stems=stems)
        assert list(picked) == ["rome", "memit", "alphaedit", "none"]
        assert picked == loaded(results)
    only = files.load_lifelong_results(tmp_path, stems=[old["memit"]["settings"]["run_stem"] + ".json"])
    assert list(only) == ["memit"] and only["memit"]["settings"]["config"]["seed"] == 7


def test_without_stems_the_newest_set_is_shown_with_a_warning(tmp_path):
    old, new = two_seeds(tmp_path)
    with pytest.warns(UserWarning, match=r"left out 4 run\(s\) with other settings \(1 other set") as record:
        shown = files.load_lifelong_results(tmp_path)
    assert "stems=" in str(record[0].message) and old["rome"]["settings"]["run_stem"] in str(record[0].message)
    assert shown == loaded(new)
    assert collapse_text(shown) == "after 8 edits"
    os.utime(tmp_path / file_name(old["none"]), (3_000_000, 3_000_000))  # seed 7's set is now the newest written
    with pytest.warns(UserWarning, match="left out 4"):
        assert files.load_lifelong_results(tmp_path) == loaded(old)


def collapse_text(results: dict[str, dict[str, Any]]) -> str:
    return verdicts.collapse_text(results["rome"])


def test_two_runs_of_one_editor_is_an_error_naming_both(tmp_path):
    old, new = two_seeds(tmp_path)
    stems = [old["rome"]["settings"]["run_stem"], new["rome"]["settings"]["run_stem"]]
    with pytest.raises(KisError, match="two runs of rome") as error:
        files.load_lifelong_results(tmp_path, stems=stems)
    assert all(f"{stem}.json" in str(error.value) for stem in stems)
    with pytest.raises(KisError, match="no finished run lifelong_rome_missing.json"):
        files.load_lifelong_results(tmp_path, stems=["lifelong_rome_missing"])
    with pytest.raises(KisError, match="non-empty list"):
        files.load_lifelong_results(tmp_path, stems=stems[0])


def test_partial_checkpoints_are_never_results(tmp_path):
    in_progress = make_result("rome", seed=9)["settings"]["run_stem"]
    (tmp_path / f"{in_progress}.partial.json").write_text('{"format": 1}', encoding="utf-8")
    (tmp_path / f"{in_progress}.partial.safetensors").write_bytes(b"\0" * 8)
    with pytest.raises(KisError, match="partial"):  # only a checkpoint: no results yet
        files.load_lifelong_results(tmp_path)
    assert layout.find_lifelong_folders(tmp_path.parent, tmp_path.name) == []
    write_results(tmp_path, standard_results())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint is no other set of settings
        assert files.load_lifelong_results(tmp_path) == loaded(standard_results())
    stems = sorted(r["settings"]["run_stem"] for r in standard_results().values())
    assert [sorted(group) for group in files.lifelong_run_groups(tmp_path)] == [stems]
    with pytest.raises(KisError, match="in progress"):
        files.load_lifelong_results(tmp_path, stems=[f"{in_progress}.partial"])


def test_legacy_files_are_keyed_by_what_they_ran(tmp_path):
    write_results(tmp_path, legacy_results())
    found = files.load_lifelong_results(tmp_path)  # their configs differ only in `editors`: one set
    assert list(found) == ["p-rome", "alphaedit-legacy", "emmet", "none"]
    assert all(result["_legacy"] for result in found.values()) and files.any_legacy(found)
    assert found["p-rome"]["_source"] == "lifelong_rome.json" and found["emmet"]["_source"] == "lifelong_memit.json"
    assert [files.editor_label(e, r) for e, r in found.items()] == [
        "p-ROME",
        "AlphaEdit-legacy",
        "EMMET-like fit λ=1",
        "no edit",
    ]
    write_results(tmp_path, standard_results(), mtime=1)  # a new set beside them, written earlier
    with pytest.warns(UserWarning, match="left out 4"):
        assert list(files.load_lifelong_results(tmp_path)) == ["p-rome", "alphaedit-legacy", "emmet", "none"]
    assert len(files.lifelong_run_groups(tmp_path)) == 2  # a legacy set never mixes with a new one


# The value search's settings as runs recorded them before the search was nested in the config (value_search).
FLAT_VALUE_SEARCH = {
    "value_steps": 20,
    "value_lr": 0.5,
    "kl_factor": 0.0625,
    "value_weight_decay": 0.5,
    "clamp_norm_factor": 4.0,
    "fast_values": True,
}


@pytest.mark.parametrize("shape", ["nested", "flat"])
def test_runs_recording_the_value_search_nested_or_flat_both_load_and_render(tmp_path, shape):
    """This kis records the value search as a block (settings.config.value_search, as LifelongConfig.to_dict gives
    it); finished runs of an older kis hold its settings flat: a folder of either loads, groups and renders."""
    from kis_lens.docs.lifelong import render_lifelong_markdown
    from kis_lens.editing.lifelong_config import LifelongConfig

    recorded = {"value_search": LifelongConfig().to_dict()["value_search"]} if shape == "nested" else FLAT_VALUE_SEARCH
    results = standard_results()
    for result in results.values():
        result["settings"]["config"].update(recorded)
        result["settings"]["identity"]["config"].update(recorded)
    write_results(tmp_path, results)
    found = files.load_lifelong_results(tmp_path)
    assert found == loaded(results) and len(files.lifelong_run_groups(tmp_path)) == 1
    text = render_lifelong_markdown(found)
    assert ('"value_search": {' in text) == (shape == "nested") and ('"value_steps": 20' in text) == (shape == "flat")


def test_a_cut_value_search_is_named_in_every_table():
    """A run with fewer prompts or steps than the originals' value search says "(cut)"; a full one does not."""
    full = {"settings": {"editor": {"name": "rome", "value_prompts_used": 21, "rome_search": {"steps": 20}}}}
    cut = {"settings": {"editor": {"name": "rome", "value_prompts_used": 7, "rome_search": {"steps": 20}}}}
    memit = {
        "settings": {
            "editor": {"name": "memit", "memit_search": {"steps": 20}},
            "templates": {"memit": [["{}"], ["a. {}", "b. {}", "c. {}", "d. {}", "e. {}"]]},
        }
    }
    legacy = {"settings": {"config": {"n_prefixes": 2, "value_steps": 10}}}
    assert files.value_search_text(full) == "21 prompts × 20 steps"
    assert files.value_search_text(cut) == "7 prompts × 20 steps (cut)"
    assert files.value_search_text(memit) == "6 prompts × 20 steps"
    assert files.value_search_text(legacy) == "3 prompts × 10 steps (cut)"
    assert report.summary_rows({"rome": cut})[0]["value search"] == "7 prompts × 20 steps (cut)"
