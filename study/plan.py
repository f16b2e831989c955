"""``study plan JOB.yaml``: what a job will run and what it will cost, before anything
starts (no Ray, no data preparation, no MLflow).

Per stage, two numbers: device-hours (what holds a device: each stage-1 worker for its
whole fit, each trial, each analysis task; what a cluster bills) and wall-clock (what a
user waits: trials side by side as the job's resources and the cluster allow, this
machine by default, ``--cluster 8xGPU`` for another). Both come from per-image costs
measured at the job's batch sizes (``study.costs``), times the work the run really does:
epochs of training images, a validation pass per epoch, the attack suite on the images a
model gets right with early exit and each member of the strong evaluation on what the
ones before it left, corruptions, the analyses at their configured sizes, and fixed costs
(a Ray Train fit's start, a trial's, an analysis task's, the server, the report, data
preparation). ``--from OUT`` sets the plan beside a finished run of the job, stage by
stage, and measures the fixed costs and the attack shares from it.
"""

from __future__ import annotations

from pathlib import Path

from study import costs, sweep, weights
from study.attacks import parse_attack
from study.config import JobConfig, parse
from study.data.registry import build_split, get_info, resolve_params
from study.files import BadInput
from study.methods import METHODS, STRONG_ATTACK
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


# -- the costs a job needs --------------------------------------------------------------


def _threads(n: float) -> int:
    return max(1, int(n))


def needs(cfg: JobConfig) -> set[tuple[str, int, int, int]]:
    """(backbone, side, batch, threads) of every cost the job's estimate reads: stage 1's
    training per worker, stage 2's training, and the evaluation at its batch size."""
    need = set()
    ev = cfg.eval.batch_size
    if cfg.pretrain.weights is None:
        s, side = cfg.pretrain.scaling, resolution(cfg, cfg.pretrain.dataset)
        per_worker = max(1, cfg.pretrain.train.batch_size // s.workers)
        for b in cfg.pretrain.backbones:
            need |= {(b, side, per_worker, _threads(s.cpus_per_worker)), (b, side, ev, _threads(s.cpus_per_worker))}
    if cfg.finetune:
        t = _threads(cfg.finetune.resources.cpus)
        for key in _targets(cfg):
            for b in _backbones(cfg):
                side = resolution(cfg, key)
                need |= {(b, side, cfg.finetune.train.batch_size, t), (b, side, ev, t)}
                if cfg.analyses.enabled:
                    need.add((b, side, ev, _threads(cfg.analyses.resources.cpus)))
    return need


def costs_for(cfg: JobConfig, path: Path | None, measure_here: bool, log=print) -> dict:
    """The costs file's entries, measuring (and storing) what the job needs and the file
    lacks when ``measure_here``."""
    table = costs.load(path)
    return costs.complete(table, needs(cfg), resolve_device(cfg.device, cfg.deterministic), path, measure_here, log)


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
    return parse_attack(name).steps_at_most()


# The share of test images an attack works on (those the model gets right) and the share
# of those the paper's PGD-10 leaves unbroken: priors (typical of the demo's and the
# paper's fine-tunes at 0.5/255) until a pilot run (`--from OUT`) measures them.
SHARES_PRIOR = {"correct": 0.85, "survive": 0.9}
EVERY_STEP = {"correct": 1.0, "survive": 1.0}  # every image takes every step: the upper bound


def pilot_shares(df) -> dict:
    """``SHARES_PRIOR`` measured on a finished run's results (its rows under PGD)."""
    rows = df[df.attack.astype(str).str.startswith("pgd") & (df.AOI > 0)] if "attack" in df else df.iloc[:0]
    if not len(rows):
        return dict(SHARES_PRIOR)
    return {"correct": float(rows.AOI.mean() / 100), "survive": float((rows.AAI / rows.AOI).mean())}


class _Model:
    """The cost model of one job: per-image costs at the job's batch sizes and threads,
    fixed costs, and the attack shares; ``unknown`` collects what it cannot price."""

    def __init__(self, cfg: JobConfig, table: dict, shares: dict):
        self.cfg, self.table, self.shares = cfg, table, shares
        self.fixed, self.unknown = costs.fixed(table), []

    def cost(self, backbone: str, key: str, batch: int, threads: float) -> dict | None:
        k = costs.lookup(self.table, backbone, resolution(self.cfg, key), batch, _threads(threads))
        if k is None:
            self.missing(f"{key}: no measured cost for {backbone} at batch {batch}")
        return k

    def missing(self, what: str) -> None:
        """``what`` could not be priced: said once, however many trials lack it."""
        if what not in self.unknown:
            self.unknown.append(what)

    def suite(self, backbone, key, method, n_test, threads, seed=None) -> float:
        """Seconds of the clean pass and the attack suite on one model."""
        k = self.cost(backbone, key, self.cfg.eval.batch_size, threads)
        if k is None:
            return 0.0
        cap, total, side = self.cfg.eval.max_images, n_test * k["infer"], resolution(self.cfg, key)
        for a in self.cfg.eval.suite(method, key, seed):
            n = min(x for x in (n_test, cap, a.max_images) if x is not None)
            # each item: its gradient passes, a clean and an item pass, its own work off the model
            total += n * (a.passes(self.shares) * k["attack"] + 2 * k["infer"] + a.host_seconds(side))
        return total

    def stage1(self) -> list[dict]:
        """One Ray Train fit per backbone and objective (per seed with replicate): its
        workers share the training images; the suite runs once on the source's test set."""
        cfg, out = self.cfg, []
        p, key = cfg.pretrain, cfg.pretrain.dataset
        if p.weights is not None:
            return out
        size = split_sizes(cfg, key)
        if size is None:
            self.missing(f"stage 1 on {key}: size unknown")
            return out
        w, threads = p.scaling.workers, p.scaling.cpus_per_worker
        for b in p.backbones:
            k = self.cost(b, key, max(1, p.train.batch_size // w), threads)
            if k is None:
                continue
            for obj in p.objective_specs():
                train = p.train.epochs * size[0] / w * (k["train"] + _attack_steps(obj) * k["attack"])
                wall = self.fixed["fit"] + train + self.suite(b, key, "pretrain", size[1], threads)
                out += [{"wall": wall, "devices": w}] * (len(cfg.replicate_seeds()) if p.replicate else 1)
        return out

    def transfer(self) -> float:
        """Seconds of crafting the public-backbone threat's perturbations on f₀ (study.threat):
        each item's steps on every image it is crafted on, every step a gradient pass; the
        surrogate's linear probe reads the training split once."""
        from study import threat

        cfg, total = self.cfg, 0.0
        if cfg.finetune is None:
            return 0.0
        for seed in cfg.replicate_seeds():
            for key in cfg.finetune.datasets:
                size = split_sizes(cfg, key)
                for item in threat.items_of(cfg, key, seed):
                    for b in cfg.finetune_backbones():
                        k = self.cost(b, key, cfg.eval.batch_size, cfg.finetune.resources.cpus)
                        if k is None or size is None:
                            continue
                        n = min(x for x in (size[1], cfg.eval.max_images, item.max_images) if x is not None)
                        probe = size[0] * k["infer"] if item.kind == "surrogate" else 0.0
                        total += n * item.steps * k["attack"] + probe
        return total

    def trial(self, p: dict) -> float | None:
        """Seconds of one stage-2 trial: fine-tuning with a validation pass each epoch, the
        suite, and DM's validation under the strong evaluation where λ is chosen."""
        cfg, ft = self.cfg, self.cfg.finetune
        key, b = p["dataset"], p["backbone"]
        size = split_sizes(cfg, key)
        k = self.cost(b, key, ft.train.batch_size, ft.resources.cpus)
        if size is None:
            self.missing(f"{key}: size unknown (prepare it, or give its root)")
        if size is None or k is None:
            return None
        obj = sweep.objective_spec(cfg, p)
        steps = KINDS[obj["kind"]].passes(obj)
        n_train = size[0] * (1 - ft.val_fraction)
        step = k["infer"] if METHODS[p["method"]].trains == "g" else k["train"]
        s = sweep.train_spec(cfg, p).epochs * (
            n_train * (step + steps * k["attack"]) + size[0] * ft.val_fraction * k["infer"]
        )
        s += self.suite(b, key, p["method"], size[1], ft.resources.cpus, p["seed"])
        if KINDS[METHODS[p["method"]].kind].uses_lambda and sweep.lambda_rivals(cfg, p):
            n_val = min(x for x in (size[0] * ft.val_fraction, ft.val_attack_images) if x is not None)
            s += n_val * parse_attack(STRONG_ATTACK).passes(self.shares) * k["attack"]
        return self.fixed["trial"] + s

    def analyses(self, pts: list[dict]) -> list[float]:
        """Seconds of each analysis task (study.analyses' plan: per seed and target, CCA,
        a UAP per fine-tuned and standard model, the pre-trained UAP's transfer, MMD, LL)."""
        cfg, a = self.cfg, self.cfg.analyses
        if not (cfg.finetune and a.enabled):
            return []
        tasks = []
        pretrained, source = True, cfg.pretrain.dataset is not None
        for (_, key, b), methods in _models(pts).items():
            k = self.cost(b, key, cfg.eval.batch_size, a.resources.cpus)
            if k is None:
                continue
            have = [m for m in ("full", "scratch") if m in methods]
            uap = a.uap.steps * min(cfg.eval.batch_size, a.uap.train_images) * k["attack"]
            if len(have) + pretrained >= 2:
                tasks.append(a.cca.images * (len(have) + pretrained) * k["infer"])
            tasks += [uap + (len(a.snapshots) + 1) * a.images * k["infer"] for _ in have]
            if source and have:
                tasks.append(uap + a.images * len(have) * k["infer"])
            if source:
                tasks.append(2 * a.mmd.images * k["infer"])
            tasks.append((len(have) + pretrained) * a.ll.images * a.ll.steps * k["attack"])
        return [self.fixed["task"] + t for t in tasks]


def _models(pts: list[dict]) -> dict:
    """(seed, dataset, backbone) -> the methods the sweep trains there."""
    out: dict = {}
    for p in pts:
        out.setdefault((p["seed"], p["dataset"], p["backbone"]), set()).add(p["method"])
    return out


def job_images(cfg: JobConfig) -> int:
    """Images of every split of every dataset of the job: what data preparation writes."""
    return sum(sum(split_sizes(cfg, k) or (0, 0)) for k in cfg.datasets)


def parse_cluster(text: str) -> dict:
    """``8xGPU``, ``8×GPU`` or ``16xCPU``: the devices a plan's wall-clock assumes."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*(gpu|cpu)\s*", str(text), re.IGNORECASE)
    if not m or int(m[1]) < 1:
        raise BadInput(f"--cluster {text!r}: expected N×GPU or N×CPU, e.g. 8xGPU")
    return {m[2].lower() + "s": int(m[1])}


def this_machine() -> dict:
    import os

    import torch

    return {"cpus": os.cpu_count() or 1, "gpus": torch.cuda.device_count()}


def _at_once(cfg: JobConfig, cluster: dict) -> int:
    """Trials that run side by side on ``cluster`` given the job's resources."""
    r = cfg.finetune.resources
    fit = cluster.get("gpus", 0) // r.gpus if r.gpus else cluster.get("cpus", 1) // r.cpus
    return max(1, min(int(fit) or 1, cfg.finetune.max_concurrent_trials or 10**9))


def estimate(cfg: JobConfig, table: dict, shares: dict | None = None, cluster: dict | None = None) -> dict:
    """Trials and, per stage, device-seconds (what holds a device: a fit's workers, the
    trials, the analysis actors) and wall-clock seconds on ``cluster`` (this machine by
    default); ``unknown`` lists what could not be counted."""
    shares, cluster = shares or SHARES_PRIOR, cluster or this_machine()
    model = _Model(cfg, table, shares)
    fixed = model.fixed
    pts = sweep.points(cfg) if cfg.finetune else []
    per_method: dict = {}
    for p in pts:
        per_method[p["dataset"], p["method"]] = per_method.get((p["dataset"], p["method"]), 0) + 1
    images = job_images(cfg)
    stages = {"data": {"seconds": 0.0, "wall": images * fixed["data"]}}
    stages["MLflow"] = {"seconds": 0.0, "wall": fixed["server"]}
    fits = model.stage1()
    if fits:
        held = sum(f["wall"] * f["devices"] for f in fits)  # every worker holds its device the whole fit
        stages["stage 1"] = {"seconds": held, "wall": sum(f["wall"] for f in fits)}
    crafted = model.transfer()
    if crafted:  # on the driver, one item after another
        stages["transfer"] = {"seconds": crafted, "wall": crafted}
    trials = [t for t in (model.trial(p) for p in pts) if t is not None]
    if trials:
        per = cfg.finetune.resources.gpus or 1.0  # GPUs a trial holds (a CPU trial: one device)
        wall = max(sum(trials) / _at_once(cfg, cluster), max(trials))
        stages["sweep"] = {"seconds": sum(trials) * per, "wall": wall}
    tasks = model.analyses(pts)
    actors = min(cfg.analyses.actors, len(tasks)) or 1
    if tasks:  # the actors start side by side, then share the tasks
        wall = fixed["actor"] + max(sum(tasks) / actors, max(tasks))
        stages["analyses"] = {"seconds": sum(tasks) + actors * fixed["actor"], "wall": wall}
    stages["results and report"] = {"seconds": 0.0, "wall": fixed["report"]}
    return {
        "trials": len(pts),
        "per_method": per_method,
        "stages": stages,
        "seconds": sum(v["seconds"] for v in stages.values()),
        "wall": sum(v["wall"] for v in stages.values()),
        "unknown": model.unknown,
        "device": table.get("device"),
        "fixed_from": table.get("fixed_from"),
        "shares": shares,
        "cluster": cluster,
        "images": images,  # of every split of every dataset: what data preparation writes
        "fits": len(fits),
        "tasks": len(tasks),
        "actors": actors,
        "at_once": _at_once(cfg, cluster) if cfg.finetune else 1,
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


def _where(entry, cap: int | None) -> str:
    """An attack of the suite and the models, datasets, seeds and images it runs on."""
    a = entry.attack
    n = min(x for x in (cap, a.max_images) if x is not None) if (cap or a.max_images) else None
    only = [", ".join(map(str, v)) for v in (entry.methods, entry.datasets) if v]
    only += [f"seed {', '.join(map(str, entry.seeds))}"] if entry.seeds else []
    return f"{a.name} ({'; '.join(only) or 'every model'}" + (f", {n} images)" if n else ")")


def render(cfg: JobConfig, est: dict, measured: dict | None = None) -> str:
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
    lines.append("attacks: " + "; ".join(_where(e, cfg.eval.max_images) for e in cfg.eval.attacks))
    c = cfg.eval.corruptions
    if c is not None:
        names = list(dict.fromkeys(i.corruption for i in c.items()))
        lines.append(
            f"common corruptions: {len(names)} ({', '.join(names)}) at severities "
            f"{', '.join(map(str, c.severities))}: {len(c.items())} items"
            + (f", on {', '.join(c.datasets)}" if c.datasets else "")
            + (f", models {', '.join(c.methods)}" if c.methods else "")
        )
    lines += cost_lines(est, measured)
    for u in est["unknown"]:
        lines.append(f"  not counted: {u}")
    lim = cfg.limits
    if lim.gpu_hours is not None:
        verdict = "within" if est["seconds"] / 3600 <= lim.gpu_hours else "OVER"
        lines.append(
            f"limits: {lim.gpu_hours:g} GPU-hours: {verdict}"
            + (f"; at most {lim.gpus:g} GPUs at once" if lim.gpus is not None else "")
        )
    return "\n".join(lines)


def _hm(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"
    return f"{seconds / 3600:,.1f} h"


def cost_lines(est: dict, measured: dict | None = None) -> list[str]:
    """Per stage: device-hours (what a cluster bills) and wall-clock (what a user waits),
    and beside them a run's measured wall-clock and the plan's ratio to it."""
    gpu = est["device"] and not str(est["device"]).startswith("cpu")
    kind = "GPU-hours" if gpu else "device-hours (CPU)"
    where = "this machine" if est["cluster"] == this_machine() else "the cluster"
    c = est["cluster"]
    on = f"{where}: {c.get('gpus', 0)} GPU, {c.get('cpus', 0)} CPU" if "cpus" in c else f"{c['gpus']}×GPU"
    head = f"  {'stage':<20}{kind:>20}{'wall-clock':>14}" + (f"{'measured':>14}{'plan/run':>10}" if measured else "")
    lines = [f"estimate on {est['device'] or 'no measured costs'} (wall-clock on {on}):", head]
    for name, v in est["stages"].items():
        row = f"  {name:<20}{v['seconds'] / 3600:>20,.3f}{_hm(v['wall']):>14}"
        if measured and name in measured:
            row += f"{_hm(measured[name]):>14}{v['wall'] / max(measured[name], 1e-9):>9.2f}×"
        lines.append(row)
    total = f"  {'total':<20}{est['seconds'] / 3600:>20,.3f}{_hm(est['wall']):>14}"
    if measured:
        run = sum(measured.values())
        total += f"{_hm(run):>14}{est['wall'] / max(run, 1e-9):>9.2f}×"
    lines.append(total)
    fixed = f"measured from {est['fixed_from']}" if est.get("fixed_from") else "priors (study.costs.FIXED_PRIOR)"
    sh = est["shares"]
    lines.append(
        f"  per-image costs measured at the job's batch sizes; fixed costs: {fixed}; attacks on "
        f"{sh['correct']:.0%} of the images, {sh['survive']:.0%} of them left by PGD-10"
    )
    if not gpu and est["device"]:
        lines.append("  (costs measured on a CPU: run `study plan JOB --costs FILE` on a GPU node for GPU-hours)")
    return lines


def read_run(cfg: JobConfig, out: Path):
    """A finished run's OUT for ``--from``: (its results frame, its phases' wall-clock
    seconds from ``timing.json``). BadInput names what is missing or damaged."""
    from study.files import read_json
    from study.report.sources import read_results

    out = Path(out)
    if not (out / "timing.json").is_file():
        raise BadInput(f"--from {out}: no timing.json there (a run finished by this version writes it)")
    timing = read_json(out / "timing.json")
    phases = timing.get("phases") if isinstance(timing, dict) else None
    if not isinstance(phases, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in phases.values()):
        raise BadInput(f"{out / 'timing.json'}: expected {{'phases': {{name: seconds}}}}")
    if timing.get("job") not in (None, cfg.name):
        raise BadInput(f"{out / 'timing.json'}: a run of job {timing['job']}, not of {cfg.name}")
    return read_results(out / "results.csv", need=("job",)), phases


def calibrate(table: dict, est: dict, phases: dict, out: Path) -> dict:
    """``table`` with fixed costs measured from a run's phases: a stage's measured
    wall-clock less the plan's compute, per fit, trial or task on its critical path; the
    server, report and data preparation as they took. ``est``: the plan of that job."""
    f, stages, new = costs.fixed(table), est["stages"], {}
    on_path = (
        ("stage 1", "fit", est["fits"]),
        ("sweep", "trial", est["trials"] / est["at_once"]),
        ("analyses", "task", est["tasks"] / est["actors"]),
    )
    for stage, name, n in on_path:
        if n and stage in phases and stage in stages:
            compute = stages[stage]["wall"] - n * f[name]
            new[name] = max(0.0, (phases[stage] - compute) / n)
    for stage, name in (("MLflow", "server"), ("results and report", "report")):
        if stage in phases:
            new[name] = phases[stage]
    if "data" in phases and est["images"]:
        new["data"] = phases["data"] / est["images"]
    return {**table, "fixed": {**table.get("fixed", {}), **new}, "fixed_from": str(out)}


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
