"""The queue of `kis lifelong` runs behind docs/lifelong.md (issue 20), in two lanes of one thread each.

    .venv/bin/python benchmarks/lifelong_runs.py --lane a &   # ROME and its variants
    .venv/bin/python benchmarks/lifelong_runs.py --lane b &   # none, the causal traces, MEMIT, AlphaEdit
    .venv/bin/python benchmarks/lifelong_runs.py --plan       # every job and whether it has finished

Two 1-thread lanes are what two cores hold. Each job is one `kis lifelong` (or `kis trace`) process; a job that
finished is skipped (kis lifelong returns the finished run), one that was cut off resumes from its checkpoint, so
rerunning a lane after a session ends picks up where it stopped. Every job appends a line to
results/lifelong_runs.jsonl: its command, wall seconds, exit status and how many lanes ran beside it, so the
closing note can say what each run took (timings of two lanes are concurrent: labelled so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = Path("results")  # relative to the checkout: commands in the log carry no machine path
LAYER = 4  # the 20-fact causal trace's peak among the early-to-middle layers (the full trace is job "trace-w10")
SECOND_LAYER = 8  # the check at a second layer (see docs/lifelong.md for why)
SEEDS = (0, 1, 2)


def _lifelong(editor: str, seed: int, layer: int = LAYER) -> tuple[str, list[str]]:
    name = f"{editor}-seed{seed}-layer{layer}"
    return name, ["lifelong", "--editors", editor, "--seed", str(seed), "--layer", str(layer)]


def _trace(window: int, n_facts: int = 100) -> tuple[str, list[str]]:
    return f"trace-w{window}", ["trace", "--n_facts", str(n_facts), "--window", str(window)]


LANES: dict[str, list[tuple[str, list[str]]]] = {
    "a": [
        _lifelong("rome", 0),
        _lifelong("rome", 1),
        _lifelong("rome", 2),
        _lifelong("r-rome", 0),
        _lifelong("p-rome", 0),
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
    ],
}
LOG = OUTPUT / "lifelong_runs.jsonl"


def finished_jobs() -> dict[str, dict]:
    """Return the last successful log line of each job (name → entry)."""
    path = ROOT / LOG
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("returncode") == 0:
                done[entry["job"]] = entry
    return done


def _other_lanes_running(lane: str) -> int:
    """Return how many other lanes hold their lock file now (a concurrency label for the timings)."""
    return sum((ROOT / OUTPUT / f"lane_{other}.running").exists() for other in LANES if other != lane)


def run_lane(lane: str) -> int:
    """Run the lane's jobs in order, one thread each; return the first non-zero exit status, else 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    (ROOT / OUTPUT / "logs").mkdir(parents=True, exist_ok=True)
    marker = ROOT / OUTPUT / f"lane_{lane}.running"
    marker.touch()
    try:
        for name, arguments in LANES[lane]:
            if name in finished_jobs():
                continue
            command = ["kis", *arguments, "--output_dir", str(OUTPUT)]
            started, beside = time.time(), _other_lanes_running(lane)
            with open(ROOT / OUTPUT / "logs" / f"{name}.log", "a") as log:
                code = subprocess.call(
                    [sys.executable, "-m", "kis_lens.cli", *command[1:]], cwd=ROOT, env=env, stdout=log, stderr=log
                )
            entry = {
                "job": name,
                "command": " ".join(command),
                "threads": 1,
                "lanes_beside": max(beside, _other_lanes_running(lane)),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "wall_seconds": round(time.time() - started, 1),
                "returncode": code,
            }
            with open(ROOT / LOG, "a") as out:
                out.write(json.dumps(entry) + "\n")
            if code != 0:
                return code
    finally:
        marker.unlink(missing_ok=True)
    return 0


def main() -> int:
    """Run one lane, or print the plan."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lane", choices=sorted(LANES))
    parser.add_argument("--plan", action="store_true", help="list every job and whether it has finished")
    args = parser.parse_args()
    if args.plan or not args.lane:
        done = finished_jobs()
        for lane, jobs in LANES.items():
            for name, arguments in jobs:
                entry = done.get(name)
                state = f"done in {entry['wall_seconds'] / 3600:.2f} h" if entry else "to do"
                print(f"lane {lane}  {name:28s} {state:18s} kis {' '.join(arguments)}")
        return 0
    return run_lane(args.lane)


if __name__ == "__main__":
    sys.exit(main())
