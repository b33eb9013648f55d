"""Which lifelong run this is, and what of it is on disk already: its identity, file stem, legacy keys, finished run.

A run is keyed on everything it computes from (editor, settings, model fingerprint, facts' and C's content, context
templates, version); a run or checkpoint an older kis keyed on its sampled fingerprint is re-keyed, not recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kis_lens._version import __version__
from kis_lens.editing.lifelong_bench import Bench
from kis_lens.editing.lifelong_result import LifelongResult
from kis_lens.editing.runs import (
    COVARIANCE_HASHES,
    checkpoint_paths,
    load_checkpoint,
    remove_checkpoint,
    run_identity,
    run_stem,
    save_checkpoint,
)
from kis_lens.errors import KisError
from kis_lens.fingerprint import is_legacy_fingerprint
from kis_lens.io import load_json_object, save_json

# Settings that change how a run is shown or where it runs, not what it computes: left out of its identity.
PRESENTATION_FIELDS: tuple[str, ...] = ("editors", "progress", "resume", "device", "output_dir")


def identity_of(bench: Bench, editor: str) -> dict[str, Any]:
    """Return the identity of an editor's run on this bench: everything its numbers depend on."""
    config = {k: v for k, v in bench.config.to_dict().items() if k not in PRESENTATION_FIELDS}
    return run_identity(
        {
            "editor": editor,
            "config": config,
            "model_fingerprint": bench.info.fingerprint,
            "facts_sha256": bench.facts_sha256,
            "unedited_facts_sha256": bench.unedited_facts_sha256,
            "covariance": bench.covariance_identity,
            "templates": {"rome": bench.rome_templates, "memit": bench.memit_templates},
            "kis_lens_version": __version__,
        }
    )


def stem_of(bench: Bench, editor: str, identity: dict[str, Any]) -> str:
    """Return the run's file stem, like "lifelong_rome_seed0_n436_layer4_3fa9c2d1" (the hash: its identity's)."""
    config = bench.config
    readable = {"seed": config.seed, "n": len(bench.cases), "layer": config.layer}
    return "lifelong_" + run_stem(editor, identity, readable)


def _same_run_under_legacy_keys(bench: Bench, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Return whether a run's identity differs from new only by keys an older kis used for the same model and C.

    The model: the older sampled W_out fingerprint, which this model matches. Each C: the file hash changed only
    because its cache was re-keyed from that fingerprint (its metadata says so); file, tokens and texts agree."""
    if old == new or set(old) != set(new) or old["model_fingerprint"] == new["model_fingerprint"]:
        return False
    recorded = old["model_fingerprint"]
    if not (is_legacy_fingerprint(recorded) and recorded == bench.legacy_fingerprint):
        return False
    for name in old:
        if name == "covariance":
            if set(old[name]) != set(new[name]):
                return False
            for layer, entry in old[name].items():
                now = new[name][layer]
                if _without_hashes(entry) != _without_hashes(now):
                    return False
                # The same hash, or the file hash an older kis took before this cache was re-keyed from `recorded`.
                if entry != now and bench.covariance_rekeyed_from.get(layer) != (recorded, entry.get("sha256")):
                    return False
        elif name != "model_fingerprint" and old[name] != new[name]:
            return False
    return True


def _without_hashes(entry: dict[str, Any]) -> dict[str, Any]:
    """Return a C's identity entry without its hash (file, tokens, texts: the corpus slice it was computed from)."""
    return {key: value for key, value in entry.items() if key not in COVARIANCE_HASHES}


def rekey_legacy_runs(bench: Bench, editor: str, folder: Path, identity: dict[str, Any], stem: str) -> list[str]:
    """Move a finished run or a checkpoint keyed on an older kis's fingerprint to this stem; return what was done.

    Hours of a run are kept rather than recomputed when only the keys changed, never when anything it computed
    from did (see _same_run_under_legacy_keys)."""
    notes: list[str] = []
    readable = stem.rsplit("_", 1)[0]
    wanted = run_identity(identity)
    for path in sorted(folder.glob(f"{readable}_*.json")):
        other = path.name.removesuffix(".partial.json").removesuffix(".json")
        if other == stem or other.rsplit("_", 1)[0] != readable:
            continue
        partial = path.name.endswith(".partial.json")
        try:
            saved = json.loads(path.read_text())
            old = run_identity(saved["identity"] if partial else saved["settings"]["identity"])
        except (OSError, ValueError, KeyError, TypeError, KisError):
            continue  # not a run of this kind, or unreadable: left for stale_checkpoints to name
        if not _same_run_under_legacy_keys(bench, old, wanted):
            continue
        if partial:
            loaded = load_checkpoint(folder, other, old)
            if loaded is None or checkpoint_paths(folder, stem)[1].exists():
                continue
            save_checkpoint(folder, stem, wanted, *loaded)
            remove_checkpoint(folder, other)
        elif not (folder / f"{stem}.json").exists():
            saved["settings"]["identity"], saved["settings"]["run_stem"] = wanted, stem
            saved["settings"]["rekeyed_from"] = {"run_stem": other, "model_fingerprint": old["model_fingerprint"]}
            save_json(folder / f"{stem}.json", saved)
            path.unlink()
        else:
            continue
        notes.append(
            f"{path.name} was keyed on the older sampled fingerprint {old['model_fingerprint']}, which this model "
            f"matches: re-keyed as {stem} ({'checkpoint' if partial else 'finished run'}, nothing recomputed)"
        )
    return notes


def finished_run(folder: Path, stem: str, identity: dict[str, Any]) -> LifelongResult | None:
    """Return the run already finished under this identity (a rerun of a queue skips it), else None."""
    path = folder / f"{stem}.json"
    if not path.is_file():
        return None
    saved = load_json_object(path, "delete it to rerun the run, or pass --no_resume")
    if run_identity(saved.get("settings", {}).get("identity", {})) != run_identity(identity):
        return None  # same hash prefix, other identity: rerun (its write replaces the file)
    print(f"kis lifelong: {path.name} is finished already (delete it, or pass --no_resume, to run it again)")
    fields = ("editor", "steps", "edits", "pairs", "summary", "settings")
    return LifelongResult(**{name: saved[name] for name in fields}, path=path)
