"""Benchmark: where a command's CPU goes, by kind of process (the test suite, the demo).

Runs the command and samples every process on the machine every ``--every`` seconds
(psutil), crediting each process's CPU time to a kind read off its command line: Ray's
daemons, Ray Train's and Tune's workers and helpers (by their ``ray::`` titles), MLflow
servers, ``study`` drivers, other Python processes (the pytest workers and their tests).
A process that lives less than one interval is missed; run it on a machine doing nothing
else, since every process is counted. For the suite on a clean clone:

    git clone -q . /tmp/clone && cd /tmp/clone
    .venv/bin/python /path/to/benchmarks/suite_cpu.py -- ./run.sh test

It prints the wall-clock time, the CPU seconds per kind (largest first), their total
and the share of the machine's cores they used.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import time

import psutil

KINDS = [  # (a piece of the command line, the kind); the first that matches
    ("gcs_server", "ray daemons"),
    ("raylet", "ray daemons"),
    ("dashboard", "ray daemons"),
    ("log_monitor", "ray daemons"),
    ("monitor.py", "ray daemons"),
    ("runtime_env", "ray daemons"),
    ("ray::IDLE", "ray idle workers"),
    ("ray::RayTrainWorker", "ray train workers"),
    ("ray::ImplicitFunc", "tune trials"),
    ("ray::Analyst", "analysis actors"),
    ("ray::", "ray helper actors"),
    ("mlflow server", "mlflow servers"),
    ("mlflow.server", "mlflow servers"),
    ("study.cli", "study drivers"),
    ("bin/study", "study drivers"),
    ("bin/ray", "ray command line"),
    ("python", "other python (pytest workers, tests)"),
]


def kind(cmdline: list[str]) -> str:
    line = " ".join(cmdline)
    return next((k for piece, k in KINDS if piece in line), "other")


def sample(seen: dict, start: dict, started: float) -> None:
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times", "create_time"]):
        if p.info["pid"] == os.getpid() or p.info["cpu_times"] is None:
            continue
        key = (p.info["pid"], p.info["create_time"])
        used = p.info["cpu_times"].user + p.info["cpu_times"].system
        start.setdefault(key, used if p.info["create_time"] < started else 0.0)
        seen[key] = (kind(p.info["cmdline"] or []), used)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    seen, start, started = {}, {}, time.time()
    sample(seen, start, started)  # what runs already is not the command's
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        sample(seen, start, started)
        time.sleep(args.every)
    wall = time.time() - started
    per = collections.Counter()
    for key, (k, used) in seen.items():
        per[k] += used - start[key]
    total = sum(per.values())
    cores = os.cpu_count()
    print(f"exit {proc.returncode}; wall {wall:.0f} s; CPU {total:.0f} s ({total / wall / cores:.0%} of {cores} cores)")
    for k, used in per.most_common():
        print(f"{used:8.0f} s  {k}")


if __name__ == "__main__":
    main()
