"""What names a lifelong run in a study, and which runs may form one: run keys, identities, the settings check.

A study holds one finished run per editor, seed and layer, all alike in every other part of their identities;
the small readers here (a run's settings, summary, collapse step, edit count) are shared by every study table.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Sequence

from kis_lens.editing.registry import EDITOR_NAMES
from kis_lens.editing.runs import COVARIANCE_HASHES
from kis_lens.errors import KisError

# Settings a study varies on purpose; every other part of the runs' identities must agree.
VARYING_CONFIG_FIELDS: tuple[str, ...] = ("seed", "layer", "n_edits")

# Identity parts that follow the varying settings: the editor itself; the covariance files of the layers the run's
# editors write (compared layer by layer where two runs share a layer, on the corpus slice: file, texts, tokens; their
# hashes are reported by covariance_hash_notes, not compared); the context templates, drawn with the seed (compared
# between runs of the same seed).
FOLLOWING_IDENTITY_PARTS: tuple[str, ...] = ("editor", "covariance", "templates")

MIN_ORDERS = 3  # issue 20: "in every order" rests on at least three edit orders

NO_EDIT_EDITORS: tuple[str, ...] = ("none",)  # moves no weight: nothing to collapse or forget

NOT_JUDGED = "not judged"

NO_WEIGHT_MOVED = "no weight moved: not judged"


def run_settings(run: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's settings ({} where it has none)."""
    return run.get("settings") or {}


def run_summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's summary ({} where it has none)."""
    return run.get("summary") or {}


def run_name(run: Mapping[str, Any]) -> str:
    """Return how a run is named in a message: its file, else its stem, else its key."""
    return str(run.get("_source") or run_settings(run).get("run_stem") or run.get("editor") or "a run")


def run_key(run: Mapping[str, Any]) -> tuple[str, int, int]:
    """Return what names a run in a study: (editor, seed, layer)."""
    identity = run_settings(run).get("identity")
    config = run_settings(run).get("config") or {}
    editor = (identity or {}).get("editor") if isinstance(identity, Mapping) else None
    editor = editor or run.get("editor")
    if editor is None or config.get("seed") is None or config.get("layer") is None:
        raise KisError(
            f"{run_name(run)} lacks its editor, settings.config.seed or settings.config.layer: pass the dict of a "
            "`kis lifelong` results JSON (lifelong_<editor>_seed<S>_n<N>_layer<L>_<hash>.json)"
        )
    return str(editor), int(config["seed"]), int(config["layer"])


def editor_rank(editor: str) -> tuple[int, str]:
    """Return where an editor sorts: registry order, unknown names last."""
    return (EDITOR_NAMES.index(editor) if editor in EDITOR_NAMES else len(EDITOR_NAMES)), editor


def _sort_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    editor, seed, layer = run_key(run)
    return editor_rank(editor), layer, seed


def edits_made(run: Mapping[str, Any]) -> int:
    """Return how many edits a run made (its last step's count where it lists no edits)."""
    edits, steps = run.get("edits") or [], run.get("steps") or []
    return len(edits) if edits else int(steps[-1]["n_edits"]) if steps else 0


def collapse_step(run: Mapping[str, Any]) -> int | None:
    """Return the edit count at which a run's summary records its collapse, or None."""
    step = (run_summary(run).get("collapse") or {}).get("step")
    return None if step is None else int(step)


def moved_weights(run: Mapping[str, Any]) -> bool:
    """Return whether a run's editor moves weights (`none` does not)."""
    return run_key(run)[0] not in NO_EDIT_EDITORS


def identification(run: Mapping[str, Any]) -> dict[str, Any]:
    """Return a run's key as a row's first columns: editor, seed, layer."""
    editor, seed, layer = run_key(run)
    return {"editor": editor, "seed": seed, "layer": layer}


def _shown(texts: Sequence[str], limit: int = 60) -> list[str]:
    """Return values' JSON texts cut to limit, or whole where the cut would make two of them read alike."""
    cut = [text if len(text) <= limit else text[: limit - 1] + "…" for text in texts]
    return cut if len(set(cut)) == len(cut) else list(texts)


def _identity_fields(run: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (fields every run must share, fields compared only between runs that have them) of a run's identity."""
    identity = run_settings(run).get("identity")
    if not isinstance(identity, Mapping):
        raise KisError(
            f"{run_name(run)} has no settings.identity (an older kis wrote it): rerun it with `kis lifelong`"
        )
    shared: dict[str, Any] = {}
    for part, value in identity.items():
        if part in FOLLOWING_IDENTITY_PARTS:
            continue
        if part == "config" and isinstance(value, Mapping):
            shared.update({f"config.{k}": v for k, v in value.items() if k not in VARYING_CONFIG_FIELDS})
        else:
            shared[part] = value
    _, seed, _ = run_key(run)
    # Not the C's hash: an older kis hashed the file, whose bytes differ between equal Cs (safetensors writes its
    # header in a random order), so runs of one corpus slice whose C was recomputed would read as mixed.
    optional = {
        f"covariance.{layer}": {k: v for k, v in entry.items() if k not in COVARIANCE_HASHES}
        for layer, entry in (identity.get("covariance") or {}).items()
    }
    if "templates" in identity:
        optional[f"templates (seed {seed})"] = identity["templates"]
    return shared, optional


def _setting_conflicts(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Return one line per identity field on which the runs disagree, naming each value and a run that has it."""
    seen: dict[str, dict[str, str]] = {}  # field → value's whole JSON (compared whole, not as shown) → first run
    every: list[tuple[dict[str, Any], dict[str, Any]]] = [_identity_fields(run) for run in runs]
    required = sorted({field for shared, _ in every for field in shared})
    absent = object()
    for run, (shared, optional) in zip(runs, every):
        values = {field: shared.get(field, absent) for field in required} | optional
        for field, value in values.items():
            text = "(absent)" if value is absent else json.dumps(value, sort_keys=True, default=str)
            seen.setdefault(field, {}).setdefault(text, run_name(run))
    return [
        f"{field}: " + ", ".join(f"{value} in {source}" for value, source in zip(_shown(list(values)), values.values()))
        for field, values in sorted(seen.items())
        if len(values) > 1
    ]


def _recorded_hash(entry: Mapping[str, Any]) -> tuple[str, str]:
    """Return a C's recorded hash as (kind, hex): kind "content" (this kis) or "file" (an older kis); ("no", "")."""
    kind = next((key for key in COVARIANCE_HASHES if key in entry), None)
    return ("content" if kind == "content_sha256" else "file", str(entry[kind])) if kind else ("no", "")


def covariance_hash_notes(runs: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return a note per C layer whose runs (as check_study accepts them) record other hashes of it; [] where none."""
    found: dict[int, dict[tuple[str, str], list[str]]] = {}  # C layer → (kind, whole hash) → the runs recording it
    slices: dict[int, str] = {}  # C layer → the corpus slice it was read from (check_study: the same in every run)
    for run in sorted(runs, key=_sort_key):
        editor, seed, layer = run_key(run)
        for c_layer, entry in ((run_settings(run).get("identity") or {}).get("covariance") or {}).items():
            found.setdefault(int(c_layer), {}).setdefault(_recorded_hash(entry), []).append(
                f"{editor} seed {seed} layer {layer}"
            )
            described = [f"`{entry.get('file')}`"] + [
                f"{entry[key]} {key}" for key in ("texts", "tokens") if key in entry
            ]
            slices.setdefault(int(c_layer), ", ".join(described))
    notes = []
    for c_layer, hashes in sorted(found.items()):
        if len(hashes) < 2:
            continue
        why = (
            "The safetensors library writes a file's header in a random order, so one C written twice has two file "
            "hashes and a file hash cannot tell whether two Cs are equal; kis now records a content hash "
            "(content_sha256) instead."
            if any(kind == "file" for kind, _ in hashes)
            else "Their contents (values or metadata) differ: the C was recomputed, e.g. on other hardware."
        )
        # grouped by the whole hash; 12 hex digits name it in prose
        listed = "; ".join(
            f"{kind} hash {digest[:12] or '(none)'} in {', '.join(names)}" for (kind, digest), names in hashes.items()
        )
        notes.append(
            f"The runs read layer {c_layer}'s C from the same corpus slice ({slices[c_layer]}) but record other hashes "
            f"of it: {listed}. {why}"
        )
    return notes


def check_study(runs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return the runs sorted by (editor, layer, seed); KisError on two runs with one key or on mixed settings."""
    runs = [dict(run) for run in runs]
    if not runs:
        raise KisError("a study needs at least one finished `kis lifelong` run: pass its folder or its runs")
    owners: dict[tuple[str, int, int], str] = {}
    for run in runs:
        key = run_key(run)
        if key in owners:
            editor, seed, layer = key
            raise KisError(
                f"two runs of {editor} with seed {seed} at layer {layer}: {owners[key]} and {run_name(run)}; a study "
                "holds one run per editor, seed and layer: move or delete one of them"
            )
        owners[key] = run_name(run)
    conflicts = _setting_conflicts(runs)
    if conflicts:
        raise KisError(
            "the runs mix settings other than editor, seed, layer and n_edits: "
            + "; ".join(conflicts)
            + ". A study compares runs that differ only in those: move the others to another folder"
        )
    return sorted(runs, key=_sort_key)
