"""The queue of `kis lifelong` runs behind docs/lifelong.md (issue 20), in lanes of one thread each.

    .venv/bin/python benchmarks/lifelong_runs.py --lane a &   # ROME, at layer 4 and 8
    .venv/bin/python benchmarks/lifelong_runs.py --lane b &   # none, the causal traces, MEMIT, AlphaEdit, p-ROME
    .venv/bin/python benchmarks/lifelong_runs.py --lane c &   # r-ROME
    .venv/bin/python benchmarks/lifelong_runs.py --plan       # every job and whether it has finished
    .venv/bin/python benchmarks/lifelong_runs.py --park       # before a session ends; then commit PARKED

    git worktree add results/code <commit>; add --code results/code to each lane to run that commit's kis while
    this tree is edited (PYTHONPATH puts the checkout first).

Two 1-thread lanes are what two cores hold; the last three runs share them in three lanes. Each job is one
`kis lifelong` (or `kis trace`) process; a job that finished is skipped (kis lifelong returns the finished run), one
that was cut off resumes from its checkpoint, so rerunning a lane after a session ends picks up where it stopped.
Every job appends a line to results/lifelong_runs.jsonl: its command, wall seconds, exit status and how many lanes ran
beside it, so the closing note can say what each run took (timings of lanes side by side are labelled concurrent).

A session may start on a fresh checkout, without results/: finished jobs are then read from the committed study's
compute log and traces, and a lane first puts back the checkpoints `--park` committed (benchmarks/lifelong_parking.py).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from lifelong_parking import covariance_name, park, unpark

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path("results")  # relative to the checkout: commands in the log carry no machine path
LAYER = 4  # the 20-fact causal trace's peak among the early-to-middle layers (the full trace is job "trace-w10")
SECOND_LAYER = 8  # the check at a second layer: past the trace's early peak (4–5), where its effect has halved
SEEDS = (0, 1, 2)
MODEL = "smollm2-135m"
RUNS = OUTPUT / MODEL / "lifelong"  # where the frozen code writes runs (model-first, see frozen_trace_path)
COVARIANCE = OUTPUT / "stats" / MODEL / "wikipedia-offline_stats"  # and the Cs they use
STUDY = Path("benchmarks/results/lifelong")  # the committed study: finished runs, traces, compute log
PARKED = Path("benchmarks/results/lifelong_in_progress")  # committed checkpoints of runs that outlast a session
LOCK_BUSY = "is being written by another kis process"  # kis, when the other lane computes the same C right now
LOCK_WAIT_SECONDS = 60


def _lifelong(editor: str, seed: int, layer: int = LAYER) -> tuple[str, list[str]]:
    name = f"{editor}-seed{seed}-layer{layer}"
    return name, ["lifelong", "--editors", editor, "--seed", str(seed), "--layer", str(layer)]


def _trace(window: int, n_facts: int = 100) -> tuple[str, list[str]]:
    return f"trace-w{window}", ["trace", "--n_facts", str(n_facts), "--window", str(window)]


def frozen_trace_path(window: int) -> Path:
    """Return where the frozen code (--code results/code) writes a trace job's JSON: <output>/<model>/trace/.

    Spelled out here, not asked of kis_lens.layout: that is this tree's layout, which puts traces kind-first
    (trace/<model>/) since issue 22, while the lanes run a commit from before it, model-first. Asking this tree
    would miss a finished trace and run it again (a trace is not resumable)."""
    return OUTPUT / "smollm2-135m" / "trace" / f"causal_trace_mlp_w{window}.json"


def _written(name: str, code: Path | None) -> bool:
    """Return whether a job's result is on disk already (a trace is not resumable: never run it twice)."""
    if name.startswith("trace-w"):
        window = int(name.removeprefix("trace-w"))
        if (ROOT / frozen_trace_path(window)).is_file() or (
            ROOT / STUDY / "trace" / frozen_trace_path(window).name
        ).is_file():
            return True
        if code is None:  # this tree's kis writes the job: its own layout says where
            from kis_lens.layout import trace_path

            return (ROOT / trace_path(OUTPUT, "smollm2-135m", "mlp", window)).is_file()
    return False


def _running(name: str, arguments: list[str]) -> list[int]:
    """Return the pids of `kis` processes running this job already (e.g. left by a lane driver that was stopped)."""
    wanted = " ".join(arguments)
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "kis_lens.cli" in command and wanted in command:
                found.append(int(proc.name))
    return found


def _commit(code: Path) -> str:
    """Return the commit a checkout is at (the runs record which committed code made them)."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=code, capture_output=True, text=True).stdout.strip()


LANES: dict[str, list[tuple[str, list[str]]]] = {
    "a": [
        _lifelong("rome", 0),
        _lifelong("rome", 1),
        _lifelong("rome", 2),
        # a fourth ROME run that collapses lets the collapse predictors be judged
        _lifelong("rome", 0, SECOND_LAYER),
    ],
    "b": [
        _lifelong("none", 0),
        _trace(10),
        _lifelong("memit", 0),
        _lifelong("alphaedit", 0),
        _lifelong("memit", 1),
        _lifelong("memit", 2),
        _lifelong("alphaedit", 1),
        _lifelong("alphaedit", 2),
        _trace(1),
        _lifelong("none", 1),
        _lifelong("none", 2),
        _lifelong("p-rome", 0),  # in lane b: ROME-family runs take about 4 h of compute each at one thread
    ],
    # The last three runs, about 9 h of one-thread compute, in three lanes on two cores: the same work done, but the
    # last run ends a session sooner than after a lane frees up. Their timings say 2 lanes ran beside them.
    "c": [_lifelong("r-rome", 0)],
}
LOG = OUTPUT / "lifelong_runs.jsonl"


def finished_jobs() -> dict[str, dict]:
    """Return the last successful log line of each job (name → entry), the committed study's log read first."""
    done: dict[str, dict] = {}
    for path in (ROOT / STUDY / "compute.jsonl", ROOT / LOG):
        if path.is_file():
            for line in path.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("returncode") == 0:
                    done[entry["job"]] = entry
    return done


def _run_finished(stem: str, layer_folder: str) -> bool:
    """Return whether a run's result is written, in results/ or in the committed study."""
    return any((ROOT / base / layer_folder / f"{stem}.json").is_file() for base in (RUNS, STUDY))


def _lane_runs(lane: str) -> Callable[[str, str], bool]:
    """Return a test of whether a checkpoint (stem, layer folder) belongs to one of the lane's lifelong jobs."""
    prefixes = {
        (f"lifelong_{arguments[2]}_seed{arguments[4]}_", f"layer_{arguments[6]}")
        for _, arguments in LANES[lane]
        if arguments[0] == "lifelong"
    }
    return lambda stem, layer_folder: any(stem.startswith(p) and layer_folder == f for p, f in prefixes)


def _kis(arguments: list[str], env: dict[str, str], log: Path) -> int:
    """Run one kis command with the lane's environment, output appended to log; wait while the other lane holds a
    lock on a C this command needs (on a fresh checkout both lanes compute C at once)."""
    while True:
        start = log.stat().st_size if log.is_file() else 0
        with open(log, "a") as out:
            returncode = subprocess.call(
                [sys.executable, "-m", "kis_lens.cli", *arguments], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        with open(log, "rb") as written:
            written.seek(start)
            if returncode == 0 or LOCK_BUSY not in written.read().decode(errors="replace"):
                return returncode
        time.sleep(LOCK_WAIT_SECONDS)


def _other_lanes_running(lane: str) -> int:
    """Return how many other lanes hold their lock file now (a concurrency label for the timings)."""
    return sum((ROOT / OUTPUT / f"lane_{other}.running").exists() for other in LANES if other != lane)


def run_lane(lane: str, code: Path | None = None) -> int:
    """Run the lane's jobs in order, one thread each; a failed job is logged and the lane goes on; return the
    number of failed jobs.

    With code, kis runs from that checkout (a `git worktree` at a commit), so edits to this tree while a lane runs
    never reach a job that starts later."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if code is not None:
        env["PYTHONPATH"] = str(code.resolve())
        env["PYTHONSAFEPATH"] = "1"  # else `python -m` puts the working directory (this tree) first
    (ROOT / OUTPUT / "logs").mkdir(parents=True, exist_ok=True)
    marker = ROOT / OUTPUT / f"lane_{lane}.running"
    marker.touch()
    try:
        # On a fresh checkout the lanes start together, and two of them may need one C: one lane at a time
        # computes and restores it, so none reads a C the other is still writing.
        with open(ROOT / OUTPUT / "unpark.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            restored = unpark(
                ROOT / RUNS,
                ROOT / COVARIANCE,
                ROOT / PARKED,
                _lane_runs(lane),
                _run_finished,
                lambda layer: _compute_covariance(layer, env, lane),
            )
        for stem in restored:
            print(f"lane {lane}: resumes {stem} from its parked checkpoint", flush=True)
        failed = 0
        for name, arguments in LANES[lane]:
            if name in finished_jobs():
                continue
            while _running(name, arguments):  # a job left running by a stopped driver: wait, then rerun = resume
                time.sleep(30)
            if _written(name, code):
                continue
            command = ["kis", *arguments, "--output_dir", str(OUTPUT)]
            started, beside = time.time(), _other_lanes_running(lane)
            returncode = _kis(command[1:], env, ROOT / OUTPUT / "logs" / f"{name}.log")
            entry = {
                "job": name,
                "command": " ".join(command),
                "threads": 1,
                "lanes_beside": max(beside, _other_lanes_running(lane)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "wall_seconds": round(time.time() - started, 1),
                "returncode": returncode,
                "commit": _commit(code or ROOT),
            }
            with open(ROOT / LOG, "a") as out:
                out.write(json.dumps(entry) + "\n")
            failed += returncode != 0
    finally:
        marker.unlink(missing_ok=True)
    return failed


def _compute_covariance(layer: int, env: dict[str, str], lane: str) -> None:
    """Compute one layer's C as `kis lifelong` does (the default corpus, 100,000 tokens), before a resume."""
    arguments = ["cache-cov", "--start_layer", str(layer), "--end_layer", str(layer), "--max_tokens", "100000"]
    log = ROOT / OUTPUT / "logs" / f"lane_{lane}_{covariance_name(layer)}.log"
    if _kis([*arguments, "--output_dir", str(OUTPUT), "--no_progress"], env, log) != 0:
        raise RuntimeError(f"computing C of layer {layer} failed: see {log}")


def main() -> int:
    """Run one lane, or print the plan."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lane", choices=sorted(LANES))
    parser.add_argument("--plan", action="store_true", help="list every job and whether it has finished")
    parser.add_argument("--code", type=Path, help="run kis from this checkout (a git worktree at a commit)")
    parser.add_argument("--park", action="store_true", help=f"copy the checkpoints in progress into {PARKED}")
    args = parser.parse_args()
    if args.park:
        for stem in park(ROOT / RUNS, ROOT / COVARIANCE, ROOT / PARKED, _run_finished):
            print(f"parked {stem}: commit {PARKED}")
        return 0
    if args.plan or not args.lane:
        done = finished_jobs()
        for lane, jobs in LANES.items():
            for name, arguments in jobs:
                entry = done.get(name)
                state = f"done in {entry['wall_seconds'] / 3600:.2f} h" if entry else "to do"
                state = "written" if not entry and _written(name, None) else state  # a trace, not in the log
                print(f"lane {lane}  {name:28s} {state:18s} kis {' '.join(arguments)}")
        return 0
    return min(run_lane(args.lane, args.code), 1)


if __name__ == "__main__":
    sys.exit(main())
