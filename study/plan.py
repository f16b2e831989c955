"""``study plan JOB.yaml``: what a job will run and what it will cost, before anything
starts (no Ray, no data preparation, no MLflow).

The estimate multiplies image counts by per-image costs *measured* on a device: a
training step (forward, backward, optimiser), an attack step (forward and input-only
backward of the BatchNorm-folded model) and an inference pass, per backbone and
resolution, a few timed batches each. ``study plan`` times what its costs file lacks on
this machine's device and stores it there (``--no-measure``: never); run it once on a
GPU node of the cluster, then plan anywhere with ``--costs FILE`` (a job's ``limits.costs`` names the file that ``study
run`` checks ``limits.gpu_hours`` against). Costs measured on a CPU give CPU-hours, and
the printout says so.

What it counts: stage 1 (epochs x train images x (1 + attack steps) for adversarial
objectives), every stage-2 trial (the same, on train minus the validation share, plus a
validation pass each epoch) and the attack suite on every model (steps + 1 passes per
test image; AutoAttack counted as 1000 attack steps per image, a rough upper bound of
its standard version). The analyses are small beside these and are not counted.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from study import sweep, weights
from study.attacks import members, parse_attack
from study.config import JobConfig, parse
from study.data.registry import build_split, get_info, resolve_params
from study.engine import autocast
from study.fastcopy import inference_copy
from study.files import BadInput, atomic_write_text, read_json
from study.methods import METHODS, STRONG_ATTACK
from study.models import build_model
from study.objectives import KINDS
from study.stages import resolve_device

# Published split sizes (train, test) of the datasets that are read from disk.
KNOWN_SIZES = {
    "cifar10": (50000, 10000),
    "pets": (3680, 3669),
    "flowers": (2040, 6149),
    "cars": (8144, 8041),
    "food": (75750, 25250),
    "imagenet": (1281167, 50000),
    "fashion_mnist": (60000, 10000),
}
KNOWN_CLASSES = {"imagenet": 1000, "fashion_mnist": 10}  # for a train_per_class / test_per_class sample
AUTOATTACK_STEPS = {"standard": 1000, "apgd": 200}  # gradient passes an image, at most
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def split_sizes(cfg: JobConfig, key: str) -> tuple[int, int] | None:
    """(train, test) images of a dataset of the job, or None where unknown: generated
    sets from their parameters, disk sets from their published sizes or by counting
    the image files of an ImageFolder root that exists here."""
    name = cfg.dataset_name(key)
    info = get_info(name)
    if info.generated:
        params = resolve_params(name, cfg.dataset_params(key))
        classes = len(build_split(name, "test", params=params).classes)
        return classes * params["train_per_class"], classes * params["test_per_class"]
    if name in KNOWN_SIZES:
        params, classes = cfg.dataset_params(key), KNOWN_CLASSES.get(name)
        return tuple(
            n
            if params.get(f"{split}_per_class") is None or classes is None
            else min(n, classes * params[f"{split}_per_class"])
            for split, n in zip(("train", "test"), KNOWN_SIZES[name])
        )
    root = cfg.dataset_root(key)
    if root and Path(root).expanduser().is_dir():
        base = Path(root).expanduser()

        def count(*names):
            for n in names:
                if (base / n).is_dir():
                    return sum(1 for f in (base / n).rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            return 0

        train, test = count("train"), count("test", "val")
        return (train, test) if train and test else None
    return None


def resolution(cfg: JobConfig, key: str) -> int:
    spec = cfg.datasets[key]
    if spec.resolution:
        return spec.resolution
    name = cfg.dataset_name(key)
    if get_info(name).generated:
        return int(resolve_params(name, cfg.dataset_params(key)).get("image_size", 32))
    return 224


# -- measured per-image costs ---------------------------------------------------------


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _timed(fn, repeats: int, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def measure(
    backbone: str, side: int, device: torch.device, amp: bool = True, batch: int | None = None, repeats: int = 3
) -> dict:
    """Seconds per image of a training step, an attack step and an inference pass."""
    batch = batch or (64 if device.type == "cuda" else 8)
    model = build_model(backbone, 100, side).to(device)
    amp = amp and device.type == "cuda"
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

    fast = inference_copy(model.eval())

    def attack():
        xx = x.clone().requires_grad_(True)
        with autocast(device, amp):
            loss = F.cross_entropy(fast(xx).float(), y)
        torch.autograd.grad(loss, xx)

    def infer():
        with torch.no_grad(), autocast(device, amp):
            fast(x)

    model.train()
    t_train = _timed(train, repeats, device)
    return {
        "train": t_train / batch,
        "attack": _timed(attack, repeats, device) / batch,
        "infer": _timed(infer, repeats, device) / batch,
        "batch": batch,
    }


COST_KEYS = ("train", "attack", "infer")


def load_costs(path: Path | None) -> dict:
    """A costs file (``{"device": NAME, "costs": {"BACKBONE@SIDE": {"train": s, "attack": s,
    "infer": s, "batch": n}}}``, seconds per image), checked: BadInput naming the file and
    the entry when it is anything else, a cost that is not a finite non-negative number
    included (a NaN cost would let any ``limits.gpu_hours`` through). None or a missing
    file: no costs yet."""
    if not path or not Path(path).exists():
        return {"device": None, "costs": {}}
    table = read_json(path)
    if not isinstance(table, dict) or not isinstance(table.get("costs"), dict):
        raise BadInput(f'{path}: not a costs file (expected {{"device": ..., "costs": {{"BACKBONE@SIDE": ...}}}})')
    if not isinstance(table.get("device"), (str, type(None))):
        raise BadInput(f"{path}: device: expected a device name")
    for key, entry in table["costs"].items():
        if not isinstance(entry, dict):
            raise BadInput(f"{path}: costs.{key}: expected {{train, attack, infer}} seconds per image")
        for name in COST_KEYS:
            v = entry.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise BadInput(f"{path}: costs.{key}.{name}: {v!r} is not a finite number of seconds >= 0")
    return {"device": table.get("device"), "costs": table["costs"]}


def costs_for(cfg: JobConfig, path: Path | None, measure_here: bool, log=print) -> dict:
    """The costs file's entries, measuring (and storing) what the job needs and the file
    lacks when ``measure_here``."""
    table = load_costs(path)
    need = {(b, resolution(cfg, k)) for k in _targets(cfg) for b in _backbones(cfg)}
    if cfg.pretrain.weights is None:
        need |= {(b, resolution(cfg, cfg.pretrain.dataset)) for b in cfg.pretrain.backbones}
    device = resolve_device(cfg.device, cfg.deterministic)
    here = _device_name(device)
    for b, side in sorted(need):
        k = f"{b}@{side}"
        if k in table["costs"] or not measure_here:
            continue
        if table["device"] not in (None, here):
            raise ValueError(
                f"{path} holds costs measured on {table['device']}, this is {here}: use another --costs file"
            )
        log(f"plan: measuring {b} at {side}px on {here} ...")
        table["costs"][k] = measure(b, side, device)
        table["device"] = here
    if path and measure_here:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(path), json.dumps(table, indent=2))
    return table


def _targets(cfg: JobConfig) -> list[str]:
    return list(cfg.finetune.datasets) if cfg.finetune else []


def _backbones(cfg: JobConfig) -> list[str]:
    return cfg.finetune_backbones() if cfg.finetune else list(cfg.pretrain.backbones)


def _attack_steps(spec) -> int:
    """Attack steps per image of an objective or attack name (0 for standard)."""
    if isinstance(spec, dict):
        spec = spec.get("name", "standard")
    name = str(spec).split("[")[0]
    if name == "standard":
        return 0
    return steps_of(parse_attack(name))


def corruption_seconds(side: int) -> float:
    """Host seconds to corrupt one image of ``side`` px (imagecorruptions, mean over the 15
    common corruptions at severity 3: 2.7 ms at 32 px, 10.4 ms at 224 px on one core)."""
    return 2.5e-3 + 1.6e-7 * side * side


def steps_of(a) -> int:
    """Gradient passes per image of an attack, at most: early exit, and the strong
    evaluation attacking only what its cheaper members left, only lower it (a corruption
    takes none: a forward pass of its corrupted image)."""
    if a.kind == "corruption":
        return 0
    if a.kind == "autoattack":
        return AUTOATTACK_STEPS[a.version]
    if a.kind == "strong":
        return sum(steps_of(m) for m in members(a))
    return a.steps * a.restarts


def estimate(cfg: JobConfig, costs: dict) -> dict:
    """Trials, stages and device-seconds of the job; ``unknown`` lists what could not be
    counted (a dataset of unknown size, a backbone without a measured cost)."""
    unknown: list[str] = []
    c = costs.get("costs", {})

    def cost(backbone, key):
        return c.get(f"{backbone}@{resolution(cfg, key)}")

    def suite_seconds(backbone, key, method, n_test, seed=None):
        k = cost(backbone, key)
        cap = cfg.eval.max_images
        total = 0.0
        for a in cfg.eval.suite(method, key, seed):
            n = min(x for x in (n_test, cap, a.max_images) if x is not None)
            total += n * (steps_of(a) * k["attack"] + 2 * k["infer"])
            if a.kind == "corruption":
                total += n * corruption_seconds(resolution(cfg, key))
        return total + n_test * k["infer"]

    stages = []
    seconds = 0.0
    if cfg.pretrain.weights is None:
        key = cfg.pretrain.dataset
        size = split_sizes(cfg, key)
        t = cfg.pretrain.train
        for b in cfg.pretrain.backbones:
            for obj in cfg.pretrain.objective_specs():
                k = cost(b, key)
                if size is None or k is None:
                    unknown.append(f"stage 1 {b} on {key}: " + ("size unknown" if size is None else "no cost"))
                    continue
                steps = _attack_steps(obj)
                replicates = len(cfg.replicate_seeds()) if cfg.pretrain.replicate else 1
                s = replicates * (
                    t.epochs * size[0] * (k["train"] + steps * k["attack"]) + suite_seconds(b, key, "pretrain", size[1])
                )
                seconds += s
                stages.append({"stage": "pretrain", "backbone": b, "objective": str(obj), "seconds": s})
    pts = sweep.points(cfg) if cfg.finetune else []
    per_method: dict = {}
    for p in pts:
        key, b = p["dataset"], p["backbone"]
        size, k = split_sizes(cfg, key), cost(b, key)
        per_method.setdefault((key, p["method"]), 0)
        per_method[key, p["method"]] += 1
        if size is None or k is None:
            msg = f"{key}: " + (
                "size unknown (prepare it, or give its root)" if size is None else f"no measured cost for {b}"
            )
            if msg not in unknown:
                unknown.append(msg)
            continue
        ft = cfg.finetune
        spec = sweep.train_spec(cfg, p)
        obj = sweep.objective_spec(cfg, p)
        steps = KINDS[obj["kind"]].passes(obj)
        n_train = size[0] * (1 - ft.val_fraction)
        step_cost = k["infer"] if METHODS[p["method"]].trains == "g" else k["train"]
        s = spec.epochs * (n_train * (step_cost + steps * k["attack"]) + size[0] * ft.val_fraction * k["infer"])
        s += suite_seconds(b, key, p["method"], size[1], p["seed"])
        if KINDS[METHODS[p["method"]].kind].uses_lambda and sweep.lambda_rivals(cfg, p):  # chosen under the strong one
            n_val = min(x for x in (size[0] * ft.val_fraction, ft.val_attack_images) if x is not None)
            s += n_val * steps_of(parse_attack(STRONG_ATTACK)) * k["attack"]
        seconds += s
    return {
        "trials": len(pts),
        "per_method": per_method,
        "stages": stages,
        "seconds": seconds,
        "unknown": unknown,
        "device": costs.get("device"),
    }


def weights_lines(cfg: JobConfig) -> list[str]:
    """Each imported backbone: the name, the file it resolves to, what was published of it
    and whether it is cached here (resolved by name: nothing is downloaded)."""
    p, lines = cfg.pretrain, []
    cache = p.weights_cache if p.weights_cache and Path(p.weights_cache).expanduser().is_absolute() else None
    for backbone in p.backbones:
        for name in p.objective_names():
            spec, pin = p.weights_entry(name)
            src = weights.parse(spec, backbone)
            about = [weights.threat(src.entry)] if src.entry else []
            if src.published is not None:
                about.append(f"published clean {src.published:.2f} %")
            about.append("cached" if weights.cached(src, cache) else "not cached: fetched by `study run`")
            if pin:
                about.append(f"pinned sha256 {pin[:12]}...")
            lines.append(f"  {backbone} ({name}): {spec} -> {src.where} ({'; '.join(about)})")
    return lines


def render(cfg: JobConfig, est: dict) -> str:
    lines = [f"job {cfg.name}"]
    if cfg.pretrain.weights is None:
        lines.append(
            f"stage 1: pre-train {', '.join(cfg.pretrain.backbones)} on {cfg.pretrain.dataset} "
            f"({', '.join(cfg.pretrain.objective_names())}), Ray Train, "
            f"{cfg.pretrain.scaling.workers} worker(s)"
        )
    else:
        lines.append("stage 1: imported weights, nothing to train")
        lines += weights_lines(cfg)
    if cfg.finetune:
        ft = cfg.finetune
        lines.append(
            f"stage 2: {est['trials']} trials on Ray Tune, {ft.resources.gpus:g} GPU and "
            f"{ft.resources.cpus:g} CPU each"
            + (f", at most {ft.max_concurrent_trials} at once" if ft.max_concurrent_trials else "")
        )
        by_ds: dict = {}
        for (key, method), n in est["per_method"].items():
            by_ds.setdefault(key, []).append(f"{method} {n}")
        for key, parts in by_ds.items():
            lines.append(f"  {key}: {', '.join(parts)}")
        if cfg.analyses.enabled:
            lines.append(f"analyses: CCA, UAP, MMD, LL on {cfg.analyses.actors} Ray actor(s)")
    attacks = [e.attack.name for e in cfg.eval.attacks]
    lines.append(f"attacks on every model: {', '.join(attacks)}")
    c = cfg.eval.corruptions
    if c is not None:
        names = list(dict.fromkeys(i.corruption for i in c.items()))
        lines.append(
            f"common corruptions: {len(names)} ({', '.join(names)}) at severities "
            f"{', '.join(map(str, c.severities))}: {len(c.items())} items"
            + (f", on {', '.join(c.datasets)}" if c.datasets else "")
            + (f", models {', '.join(c.methods)}" if c.methods else "")
        )
    hours = est["seconds"] / 3600
    where = est["device"] or "no measured costs"
    kind = "GPU-hours" if est["device"] and not str(est["device"]).startswith("cpu") else "device-hours (CPU)"
    lines.append(f"estimate: {hours:,.1f} {kind}, from per-image costs measured on {where}")
    if kind != "GPU-hours" and est["device"]:
        lines.append("  (costs measured on a CPU: run `study plan JOB --costs FILE` on a GPU node for GPU-hours)")
    for u in est["unknown"]:
        lines.append(f"  not counted: {u}")
    lim = cfg.limits
    if lim.gpu_hours is not None:
        verdict = "within" if hours <= lim.gpu_hours else "OVER"
        lines.append(
            f"limits: {lim.gpu_hours:g} GPU-hours: {verdict}"
            + (f"; at most {lim.gpus:g} GPUs at once" if lim.gpus is not None else "")
        )
    return "\n".join(lines)


def read_pilot(cfg: JobConfig, out: Path):
    """The pilot run in OUT, checked before any other work: (its results frame, its
    per-image masks). BadInput names a damaged file or another job's OUT."""
    from study.report.sources import read_masks, read_results

    out = Path(out)
    missing = [f for f in ("results.csv", "per_image.json") if not (out / f).is_file()]
    if missing:
        raise BadInput(f"--evidence {out}: no {' or '.join(missing)} there (a finished run's OUT)")
    df = read_results(out / "results.csv", need=("seed", "job"))
    jobs = sorted(set(df.job))
    if jobs != [cfg.name]:
        raise BadInput(
            f"{out / 'results.csv'}: results of job {', '.join(jobs)}, not of {cfg.name} (another job's OUT?)"
        )
    return df, read_masks(out / "per_image.json", df)


def evidence(cfg: JobConfig, costs: dict, out: Path, pilot=None, at: str = "lower") -> list[str]:
    """``study plan JOB --evidence OUT``: from the pilot in OUT (its results.csv and
    per_image.json; ``pilot``: ``read_pilot``'s, read already), per claim and unit the
    seeds and test images at which the interval excludes zero at the pilot's effect with
    80 % probability (``study.evidence``), and the device-hours of this job at those counts."""
    from study import evidence as ev

    out = Path(out)
    df, masks = pilot or read_pilot(cfg, out)
    found = ev.pilots(df, masks)
    if not found:
        return [f"evidence: {out} has no full/standard or partial/full pair with per-image results to learn from"]

    def max_images(unit) -> int:
        size = split_sizes(cfg, unit["dataset"]) if unit["dataset"] in cfg.datasets else None
        pilot = max(p.images for _, u, _, p in found if u == unit)
        return size[1] if size else 10 * pilot

    def hours(unit, seeds: int, images: int) -> float | None:
        raw = cfg.resolved()
        variant = parse(
            {**raw, "seed": 0, "seeds": list(range(seeds)), "eval": {**raw["eval"], "max_images": images}},
            check_paths=False,
        )
        est = estimate(variant, costs)
        return None if est["unknown"] else est["seconds"] / 3600

    unit_ = "GPU" if "cuda" in str(costs.get("device", "")) else "device"
    return [f"evidence from {out} (80 % power; {unit_}-hours of the whole job at those counts):"] + [
        "  " + line for line in ev.lines(found, max_images, hours, at)
    ]
