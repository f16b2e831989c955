"""How far `study plan` is from the runs it plans: the tiny job and the demo, stage by stage.

For each job it runs `study run JOB --out DIR` (or reads a finished OUT given with
--tiny-out / --demo-out: its timing.json), makes the plan as a user would before the run
(per-image costs measured here at the job's batch sizes into a fresh costs file, the
fixed costs' priors, the attack shares' priors: nothing taken from the run it is checked
against) and prints, per stage and overall, the plan's wall-clock, the run's, and their
ratio. The targets (issue 43): overall within ×1.5, each stage within ×2.

    uv run python benchmarks/plan_accuracy.py [--demo-out runs/demo] [--tiny-out runs/tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OVERALL, PER_STAGE = 1.5, 2.0
SHORT = 20.0  # seconds: a stage shorter than this in the run is shown, not judged (a second's jitter is ×2)


def finished(job: str, out: Path | None, scratch: Path) -> Path:
    """A finished run of ``job``: ``out`` when it has timing.json, else a fresh run."""
    if out is not None and (out / "timing.json").is_file():
        return out
    out = scratch / job
    start = time.monotonic()
    print(f"running jobs/{job}.yaml into {out} ...", flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "study.cli", "run", str(ROOT / "jobs" / f"{job}.yaml"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"jobs/{job}.yaml failed:\n{done.stderr[-3000:]}")
    print(f"  done in {time.monotonic() - start:.0f} s", flush=True)
    return out


def compare(job: str, out: Path, costs_file: Path) -> tuple[float, list[tuple[str, float, float]]]:
    from study import config, plan

    cfg = config.load(ROOT / "jobs" / f"{job}.yaml")
    table = plan.costs_for(cfg, costs_file, True, log=lambda m: None)
    est = plan.estimate(cfg, table)
    phases = json.loads((out / "timing.json").read_text())["phases"]
    print(f"\n{job}: {out}")
    print(f"  {'stage':<20}{'plan':>10}{'run':>10}{'plan/run':>10}")
    ratios = []
    for stage, took in phases.items():
        planned = est["stages"].get(stage, {}).get("wall", 0.0)
        ratio = planned / took if took else float("nan")
        ratios.append((stage, ratio, took))
        short = "  (short: not judged)" if took < SHORT else ""
        print(f"  {stage:<20}{planned:>9.0f}s{took:>9.0f}s{ratio:>9.2f}×{short}")
    total = est["wall"] / sum(phases.values())
    print(f"  {'total':<20}{est['wall']:>9.0f}s{sum(phases.values()):>9.0f}s{total:>9.2f}×")
    return total, ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-out", type=Path, help="a finished demo run to read instead of running it")
    ap.add_argument("--tiny-out", type=Path, help="a finished tiny run to read instead of running it")
    args = ap.parse_args()
    bad = []
    with tempfile.TemporaryDirectory() as scratch:
        costs_file = Path(scratch) / "costs.json"  # measured here, now: no earlier file's entries
        for job, given in (("tiny", args.tiny_out), ("demo", args.demo_out)):
            out = finished(job, given, Path(scratch))
            total, ratios = compare(job, out, costs_file)
            if not 1 / OVERALL <= total <= OVERALL:
                bad.append(f"{job} overall {total:.2f}×")
            judged = [(s, r) for s, r, took in ratios if took >= SHORT]
            bad += [f"{job} {s} {r:.2f}×" for s, r in judged if not 1 / PER_STAGE <= r <= PER_STAGE]
    print("\n" + ("every ratio within target" if not bad else "outside the targets: " + "; ".join(bad)))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
