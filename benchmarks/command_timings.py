"""Wall time of the README's main job as a user runs it: `kis all` on a fresh output folder, then again with C cached.

    .venv/bin/python benchmarks/command_timings.py            # ~5 min on 2 cores; writes results/commands.json
    .venv/bin/python benchmarks/render.py                     # puts the numbers into README.md

The first run estimates C; the second and third reuse every cache, and a fourth is profiled to say where the
remaining seconds go. Entries this script does not measure are kept as they are.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "commands.json"
# Function names whose cumulative time makes the cached rerun's breakdown.
BREAKDOWN = {
    "load_model": "load the model",
    "compute_keys": "keys (one batched forward per batch of facts)",
    "ensure_covariances": "read the covariance caches",
    "from_covariance": "Cholesky and condition number of C",
    "all_matrices": "the four matrices",
    "save_result": "write the results",
}


def run_kis_all(output_dir: Path) -> tuple[float, str]:
    """Return (wall seconds, stdout) of `kis all --output_dir output_dir` in a subprocess."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "kis_lens.cli", "all", "--output_dir", str(output_dir), "--no_progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, done.stdout


def profiled_breakdown(output_dir: Path) -> tuple[float, dict[str, float]]:
    """Return (wall seconds, {step: cumulative seconds}) of one profiled cached `kis all` in this process."""
    from kis_lens.cli import main

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(main, ["all", "--output_dir", str(output_dir), "--no_progress"])
    wall = time.perf_counter() - started
    steps: dict[str, float] = {}
    for (_, _, name), (_, _, _, cumulative, _) in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        if name in BREAKDOWN:
            steps[BREAKDOWN[name]] = steps.get(BREAKDOWN[name], 0.0) + cumulative
    return wall, {step: round(steps.get(step, 0.0), 2) for step in BREAKDOWN.values()}


def main() -> None:
    """Measure, then merge the numbers into benchmarks/results/commands.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=None, help="a fresh folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="kis-timing-"))
    fresh_wall, _ = run_kis_all(output_dir)
    cached_walls = [round(run_kis_all(output_dir)[0], 1) for _ in range(2)]
    profiled_wall, steps = profiled_breakdown(output_dir)
    report = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {}
    report.update(
        kis_all_fresh={"wall_s": round(fresh_wall, 1)},
        kis_all_cached={
            **report.get("kis_all_cached", {}),
            "wall_s": cached_walls,
            "profiled_wall_s": round(profiled_wall, 1),
            "breakdown_s": steps,
        },
    )
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
