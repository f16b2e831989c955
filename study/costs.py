"""What a job's work costs on a device, measured the way the job runs it.

Per-image costs: a training step (forward, backward, optimiser), an attack step (forward
and input-only backward of the inference copy) and an inference pass, per backbone,
resolution, batch size and torch threads (``key``), timed after warm-up as the median of
repeats at the batch sizes the job uses (stage 1's per worker, stage 2's, the
evaluation's). Stored with the device, the library versions and the date in a costs file
(``~/.cache/study/costs.json`` by default); an entry measured under other versions is
measured again. A file measured elsewhere (a GPU node) may hold entries without a batch
(``BACKBONE@SIDE``): they stand for every batch.

Fixed costs (seconds, not per image): a Ray Train fit before its first step, a trial's
process and loaders, an analysis task, the MLflow server, the report, and the data
preparation per image. ``FIXED_PRIOR`` holds values measured on a 2-core CPU machine;
``study plan JOB --from OUT`` measures them from a finished run and stores them
(``fixed`` in the costs file), and the plan says which it used.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from study.files import BadInput, atomic_write_text, read_json

COST_KEYS = ("train", "attack", "infer")
# Seconds, measured once on a 2-core AMD EPYC (AVX-512) from a run of the demo and of the
# tiny job (each stage's wall-clock less its measured compute): the plan's fixed costs
# until `study plan --from OUT` measures them where the job runs.
FIXED_PRIOR = {
    "fit": 65.0,  # a Ray Train fit: controller and worker actors, imports, loader compile, the source's suite
    "trial": 5.0,  # a trial's process, loaders and checkpoints beyond its compute
    "actor": 8.0,  # an analysis actor's start (its process, torch's import), once per stage: they start together
    "task": 2.5,  # an analysis task's loaders and models beyond its compute
    "server": 2.0,  # the MLflow server
    "report": 8.0,  # results, tables, figures and the report
    "data": 1.2e-3,  # preparing one image of a .beton
}
WARMUP, REPEATS = 2, 5


def versions() -> dict:
    """What a measured cost depends on besides the device."""
    return {"torch": torch.__version__, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def key(backbone: str, side: int, batch: int, threads: int) -> str:
    """A costs file's entry: ``resnet10@32/b128/t2``."""
    return f"{backbone}@{side}/b{batch}/t{threads}"


def timed(fn, device, clock=time.perf_counter, warmup: int = WARMUP, repeats: int = REPEATS) -> float:
    """The median seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return statistics.median(times)


def measure(backbone: str, side: int, device: torch.device, batch: int, threads: int, clock=time.perf_counter) -> dict:
    """Seconds per image of a training step, an attack step and an inference pass at
    ``batch`` images with ``threads`` torch threads, as the job runs them."""
    from study.engine import autocast
    from study.fastcopy import inference_copy
    from study.models import build_model

    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = build_model(backbone, 100, side).to(device)
        amp = device.type == "cuda"
        if amp:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        x = torch.rand(batch, 3, side, side, device=device)
        y = torch.randint(0, 100, (batch,), device=device)

        def train():
            with autocast(device, amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.train()
        t_train = timed(train, device, clock)
        fast = inference_copy(model.eval())

        def attack():
            xx = x.clone().requires_grad_(True)
            with autocast(device, amp):
                loss = F.cross_entropy(fast(xx).float(), y)
            torch.autograd.grad(loss, xx)

        def infer():
            with torch.no_grad(), autocast(device, amp):
                fast(x)

        costs = {"train": t_train, "attack": timed(attack, device, clock), "infer": timed(infer, device, clock)}
    finally:
        torch.set_num_threads(was)
    return {k: v / batch for k, v in costs.items()} | {
        "batch": batch,
        "threads": threads,
        **versions(),
        "date": datetime.date.today().isoformat(),
    }


def _number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0


def load(path: Path | None) -> dict:
    """A costs file (``{"device": NAME, "costs": {KEY: {"train": s, "attack": s, "infer": s,
    ...}}, "fixed": {NAME: s}}``, seconds per image), checked: BadInput naming the file and
    the entry when it is anything else, a cost that is not a finite non-negative number
    included (a NaN cost would let any ``limits.gpu_hours`` through). None or a missing
    file: no costs yet."""
    if not path or not Path(path).exists():
        return {"device": None, "costs": {}, "fixed": {}}
    table = read_json(path)
    if not isinstance(table, dict) or not isinstance(table.get("costs"), dict):
        raise BadInput(f'{path}: not a costs file (expected {{"device": ..., "costs": {{"BACKBONE@SIDE": ...}}}})')
    if not isinstance(table.get("device"), (str, type(None))):
        raise BadInput(f"{path}: device: expected a device name")
    for name, entry in table["costs"].items():
        if not isinstance(entry, dict):
            raise BadInput(f"{path}: costs.{name}: expected {{train, attack, infer}} seconds per image")
        for k in COST_KEYS:
            if not _number(entry.get(k)):
                raise BadInput(f"{path}: costs.{name}.{k}: {entry.get(k)!r} is not a finite number of seconds >= 0")
    fixed = table.get("fixed", {})
    if not isinstance(fixed, dict) or not all(k in FIXED_PRIOR and _number(v) for k, v in fixed.items()):
        raise BadInput(f"{path}: fixed: expected seconds >= 0 for some of {', '.join(FIXED_PRIOR)}")
    return {
        "device": table.get("device"),
        "costs": table["costs"],
        "fixed": fixed,
        "fixed_from": table.get("fixed_from"),
    }


def lookup(table: dict, backbone: str, side: int, batch: int, threads: int) -> dict | None:
    """The entry for a backbone at a resolution, batch and thread count: the one measured
    so, else a file's batch-free ``BACKBONE@SIDE`` entry (measured elsewhere), else None."""
    c = table.get("costs", {})
    return c.get(key(backbone, side, batch, threads)) or c.get(f"{backbone}@{side}")


def fixed(table: dict) -> dict:
    """The fixed costs: those measured from a run (``--from``), the priors for the rest."""
    return {**FIXED_PRIOR, **table.get("fixed", {})}


def store(path: Path, table: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({k: v for k, v in table.items() if v is not None}, indent=2))


def complete(table: dict, need, device: torch.device, path: Path | None, measure_here: bool, log=print) -> dict:
    """``table`` with every (backbone, side, batch, threads) of ``need`` measured here
    where it lacks one or its entry was measured under other library versions; stored
    in ``path``."""
    here, now = device_name(device), versions()
    changed = False
    cpus = str(table["device"]).startswith("cpu") and here.startswith("cpu")
    if measure_here and cpus and table["device"] != here:  # an older file's CPU costs, or another CPU's
        log(f"plan: {path} holds costs measured on {table['device']}: measuring them again on {here}")
        table, changed = {"device": None, "costs": {}, "fixed": {}}, True
    for backbone, side, batch, threads in sorted(need):
        entry = table["costs"].get(key(backbone, side, batch, threads))
        if entry is not None and all(entry.get(k) in (None, v) for k, v in now.items()):
            continue
        if table["device"] not in (None, here):  # measured elsewhere: its entries stand for every batch
            if lookup(table, backbone, side, batch, threads) is None and measure_here:
                raise BadInput(
                    f"{path} holds costs measured on {table['device']}, this is {here}: use another --costs file"
                )
            continue
        if not measure_here:
            continue
        log(f"plan: measuring {backbone} at {side}px, batch {batch}, {threads} thread(s) on {here} ...")
        table["costs"][key(backbone, side, batch, threads)] = measure(backbone, side, device, batch, threads)
        table["device"], changed = here, True
    if path and changed:
        store(Path(path), table)
    return table
