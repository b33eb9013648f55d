"""benchmarks/lifelong.py --study merges a session's finished runs into the committed study: on a fresh checkout,
results/ holds only what that session finished, and the committed runs must stay."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from study_fixtures import make_run, write_run

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lifelong.py"


@pytest.fixture
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmark_lifelong_copy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", tmp_path / "checkout")
    return module


def log_line(job: str, started: str, returncode: int = 0) -> str:
    return json.dumps({"job": job, "started": started, "wall_seconds": 1.0, "returncode": returncode})


def test_a_session_s_runs_are_added_to_the_committed_study_not_put_in_its_place(bench, tmp_path):
    committed = tmp_path / "checkout" / bench.RESULTS
    old_rome = make_run("rome", 0, 4, collapse=30)
    old_memit, old_rome_1 = make_run("memit", 0, 4), make_run("rome", 1, 4, collapse=20)
    for run in (old_rome, old_memit, old_rome_1):
        write_run(committed, run)
    (committed / "compute.jsonl").write_text(log_line("rome-seed0-layer4", "t0") + "\n")
    session = tmp_path / "results"
    new_rome_1 = make_run("rome", 1, 4, collapse=25)
    new_rome_1["settings"]["run_stem"] += "_rerun"  # another file for the same editor, order and layer
    for run in (new_rome_1, make_run("p-rome", 0, 4), make_run("rome", 0, 8, collapse=40)):
        write_run(session, run)
    queue_log = tmp_path / "queue.jsonl"
    lines = [log_line("rome-seed0-layer4", "t0"), log_line("p-rome-seed0-layer4", "t1", 1)]
    queue_log.write_text("\n".join([*lines, log_line("p-rome-seed0-layer4", "t2")]) + "\n")

    bench.copy_study(session, tmp_path / "no-traces", queue_log)

    names = sorted(path.relative_to(committed).as_posix() for path in committed.glob("layer_*/*.json"))
    stems = [run["settings"]["run_stem"] for run in (old_rome, old_memit, make_run("p-rome", 0, 4))]
    assert names == sorted(
        [f"layer_4/{stem}.json" for stem in [*stems, new_rome_1["settings"]["run_stem"]]]
        + [f"layer_8/{make_run('rome', 0, 8)['settings']['run_stem']}.json"]
    )
    kept = json.loads((committed / "layer_4" / f"{new_rome_1['settings']['run_stem']}.json").read_text())
    assert kept["summary"]["collapse"] == new_rome_1["summary"]["collapse"]  # the session's run replaced order 1
    logged = [(e["job"], e["started"]) for e in map(json.loads, (committed / "compute.jsonl").read_text().splitlines())]
    assert logged == [("rome-seed0-layer4", "t0"), ("p-rome-seed0-layer4", "t2")]  # no repeat, no failed start
