"""Benchmark: the overhead of stage 2's sweep on Ray Tune.

N tiny trials, each a fixed amount of single-threaded torch work split into "epochs"
that report and checkpoint exactly as a fine-tuning trial does, run through the Tuner
the sweep builds (``study.sweep.make_tuner``: reused actors, one checkpoint kept, 1 CPU
per trial). The ideal is the trials' summed work divided by the parallelism (the CPUs
of the local Ray); the sweep's overhead is what the wall time adds to it:

    uv run python benchmarks/sweep_overhead.py                # 12 trials on 2 CPUs
    uv run python benchmarks/sweep_overhead.py --trials 24 --work 2

It prints the wall time, the ideal, their ratio (target <= 1.3) and where the time went.
Ray's own start-up is not counted: a cluster is up before a sweep starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _busy(reps: int) -> None:
    import torch

    a = torch.randn(256, 256)
    for _ in range(reps):
        a = torch.tanh(a @ a * 1e-2)


def calibrate(seconds: float) -> int:
    """Matmul repetitions that take ``seconds`` on one thread here."""
    import torch

    torch.set_num_threads(1)
    _busy(50)
    t = time.perf_counter()
    _busy(400)
    per = (time.perf_counter() - t) / 400
    return max(1, int(seconds / per))


def tiny_trial(config: dict) -> None:
    import torch
    from ray import tune

    torch.set_num_threads(1)
    p = config["point"]
    start = time.perf_counter()
    work = 0.0
    checkpoint = tune.get_checkpoint()
    first = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            first = int((Path(d) / "epoch").read_text())
    for epoch in range(first, p["epochs"]):
        t = time.perf_counter()
        _busy(p["reps"] // p["epochs"])
        work += time.perf_counter() - t
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "epoch").write_text(str(epoch + 1))
            torch.save({"w": torch.zeros(1000)}, Path(d) / "state.pt")
            tune.report(
                {"val_acc": float(epoch), "work_s": work, "trial_s": time.perf_counter() - start},
                checkpoint=tune.Checkpoint.from_directory(d),
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--work", type=float, default=5.0, help="seconds of work per trial")
    ap.add_argument("--epochs", type=int, default=3, help="reports (with a checkpoint) per trial")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # read when Ray is imported
    import ray

    from study import config, sweep

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    reps = calibrate(args.work)
    ray.init(num_cpus=args.cpus, dashboard_host="127.0.0.1", include_dashboard=False, log_to_driver=False)
    try:
        from ray import tune

        ft = config.FinetuneSpec(datasets=["demo"], resources={"cpus": 1})
        pts = [{"trial": i, "reps": reps, "epochs": args.epochs} for i in range(args.trials)]
        trainable = tune.with_resources(tiny_trial, {"cpu": 1})
        with tempfile.TemporaryDirectory() as storage:
            tuner = sweep.make_tuner(trainable, pts, ft, storage, "overhead", max_epochs=args.epochs)
            t = time.perf_counter()
            grid = tuner.fit()
            wall = time.perf_counter() - t
        errors = [r.error for r in grid if r.error is not None]
        if errors:
            print(f"{len(errors)} trial(s) failed: {errors[0]}")
            return 1
        work = [r.metrics["work_s"] for r in grid]
        inside = [r.metrics["trial_s"] for r in grid]
    finally:
        ray.shutdown()
    ideal = sum(work) / args.cpus
    ratio = wall / ideal
    print(f"{args.trials} trials x {args.epochs} reports, {args.cpus} CPUs, 1 CPU per trial, reused actors")
    print(f"work per trial    median {statistics.median(work):6.2f} s (summed {sum(work):.1f} s)")
    print(f"trial, in process median {statistics.median(inside):6.2f} s (reports and checkpoints included)")
    print(f"ideal (summed work / {args.cpus})     {ideal:7.2f} s")
    print(f"wall (Tuner.fit)                {wall:7.2f} s")
    print(f"ratio wall / ideal              {ratio:7.2f}  (target <= 1.30: {'yes' if ratio <= 1.3 else 'NO'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
