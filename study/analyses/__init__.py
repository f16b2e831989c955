"""The paper's analyses (Section 4), served by Ray actors.

- **CCA** (Fig. 3): mean SVCCA correlation (Raghu et al. 2017: an SVD keeping 99 % of the
  variance, then CCA) between two models' activations on the same test images, for the
  bottom layer (the first of the backbone's four stages, ``layer1`` of a ResNet: the
  paper's conv2_x) and over all four layers (the mean of
  the four layers' SVCCA). A conv layer's rows are its spatial positions, as in SVCCA.
- **UAP** (Fig. 4, 5): a targeted universal perturbation made by a GAP encoder-decoder
  (Poursaeed et al. 2018) from a fixed noise input, bounded in L-inf by ``eps * tanh``.
  Fig. 5a attacks the snapshots kept along a model's fine-tuning with that model's UAP;
  Fig. 5b attacks the fine-tuned and the standard model with the pre-trained model's UAP
  (made on the source task) and reports the DR it causes.
- **MMD** (Fig. 6): unbiased RBF-kernel MMD^2 between the pre-trained model's embeddings
  of source and target test images, on one scale for every target: the bandwidth is the
  median heuristic over the source embeddings alone (recorded as ``bandwidth``), so the
  targets' MMDs are comparable (a bandwidth per pair would measure each with another kernel).
- **LL** (Eq. 4): the local Lipschitz steepness of f (``study.attacks.local_lipschitz``)
  for the pre-trained (source) and the standard (target-trained) feature extractors.

``Analyst`` is a Ray actor: it holds the models it has loaded on its device and serves
tasks; ``run`` fans the tasks of every target dataset out over a pool of actors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from study.analyses.measures import (
    GapGenerator,
    cca_correlations,
    layer_rows,
    median_bandwidth,
    mmd2,
    save_perturbation_png,
    svcca,
    train_uap,
    uap_effect,
)
from study.attacks import local_lipschitz
from study.claims import by_seed
from study.config import JobConfig, parse
from study.fastcopy import inference_copy
from study.files import atomic_write_text, config_hash
from study.models import load_checkpoint
from study.stages import Job, resolve_device

# -- SVCCA -----------------------------------------------------------------------------


def _bottom_and_all(per_layer: dict) -> dict:
    bottom = next(iter(per_layer))  # the family's first stage (layer1 of a ResNet)
    return {"bottom": per_layer[bottom], "all": sum(per_layer.values()) / len(per_layer), "layers": per_layer}


class Analyst:
    """Serves analysis tasks for one job. Models are loaded once per actor (BatchNorm
    folded, eval mode, on the actor's device) and kept for the tasks that follow."""

    def __init__(self, job_config: dict, out: str, threads: int = 1):
        torch.set_num_threads(max(1, int(threads)))
        self.cfg: JobConfig = parse(job_config)
        self.job = Job(self.cfg, Path(out), resolve_device(self.cfg.device, self.cfg.deterministic), progress=False)
        self.seed = self.cfg.seed  # the replicate of the task at hand
        self.spec = self.cfg.analyses
        self._models: dict[str, nn.Module] = {}
        self._source_uaps: dict[tuple, torch.Tensor] = {}

    def model(self, ckpt: str) -> nn.Module:
        if ckpt not in self._models:
            model = load_checkpoint(Path(ckpt))
            self._models[ckpt] = inference_copy(model, self.cfg.eval.fast_copy).to(self.job.device)
        return self._models[ckpt]

    def batches(self, key: str, split: str, images: int, train: bool = False) -> list:
        out, n = [], 0
        for x, y in self.job.loader(key, split, self.cfg.eval.batch_size, train=train, seed=self.seed, workers=1):
            x, y = x[: images - n].clone().contiguous().to(self.job.device), y[: images - n].clone()
            out.append((x, y.to(self.job.device)))
            n += len(y)
            if n >= images:
                break
        return out

    def run(self, task: dict) -> dict:
        import os

        start, t0 = time.time(), time.perf_counter()
        self.seed = task.get("seed", self.cfg.seed)
        result = getattr(self, "_" + task["kind"])(**task["args"])
        import ray

        return {
            "task": task,
            "result": result,
            "seconds": time.perf_counter() - t0,
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "started": start,
            "ended": time.time(),
        }

    # each task returns plain data (numbers, lists, file paths)
    def _cca(self, key: str, models: dict) -> dict:
        """SVCCA of each pair of ``models`` (name -> checkpoint): bottom layer and all; and
        its chance level (``chance``): the first pair with one side's rows shuffled, so no
        row of one model meets its own image in the other. What finite rows and units
        give two unrelated representations: near it, a similarity means nothing."""
        batches = self.batches(key, "test", self.spec.cca.images)
        acts = {}
        with torch.no_grad():
            for name, ckpt in models.items():
                m = self.model(ckpt)
                per = [m.layers(x) for x, _ in batches]
                acts[name] = {layer: torch.cat([p[layer] for p in per]) for layer in per[0]}
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        names = list(models)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
        for i, (a, b) in enumerate(pairs):
            per_layer, chance = {}, {}
            for layer in acts[a]:
                ra, rb = layer_rows(acts[a][layer]), layer_rows(acts[b][layer])
                rows = torch.randperm(len(ra), generator=g)[: self.spec.cca.max_rows]
                per_layer[layer] = svcca(ra[rows], rb[rows], self.spec.cca.keep)
                if i == 0:
                    shuffled = rows[torch.randperm(len(rows), generator=g)]
                    chance[layer] = svcca(ra[rows], rb[shuffled], self.spec.cca.keep)
            out[f"{a}|{b}"] = _bottom_and_all(per_layer)
            if chance:
                out["chance"] = _bottom_and_all(chance)
        if self.spec.cca.resamples and len(names) > 1:
            bottom = next(iter(acts[names[0]]))
            out["bottom_draws"] = self._bottom_draws({n: acts[n][bottom] for n in names}, pairs)
        return out

    def _bottom_draws(self, acts: dict, pairs: list) -> dict:
        """The bottom layer's SVCCA of each pair, and its chance level (the first pair's
        rows shuffled), on bootstrap draws of the images: the same draws for every pair and
        every seed (a generator of their own), so the CCA claim pairs them."""
        spec = self.spec.cca
        first = next(iter(acts.values()))
        per_image = len(layer_rows(first[:1]))
        images = len(first)
        draw_g, row_g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(self.seed)
        out: dict = {f"{a}|{b}": [] for a, b in pairs} | {"chance": [], "images": images}
        rows_of = {n: layer_rows(t) for n, t in acts.items()}
        a0, b0 = pairs[0]  # the chance level's pair
        for _ in range(spec.resamples):
            pick = torch.randint(0, images, (images,), generator=draw_g)
            rows = (pick[:, None] * per_image + torch.arange(per_image)).flatten()
            rows = rows[torch.randperm(len(rows), generator=row_g)[: spec.max_rows]]
            for a, b in pairs:
                out[f"{a}|{b}"].append(svcca(rows_of[a][rows], rows_of[b][rows], spec.keep))
            shuffled = rows[torch.randperm(len(rows), generator=row_g)]
            out["chance"].append(svcca(rows_of[a0][rows], rows_of[b0][shuffled], spec.keep))
        return out

    def _uap(self, key: str, name: str, ckpt: str, snapshots: list, png: str) -> dict:
        """A model's own targeted UAP, its success on the model and on its snapshots."""
        u = self.spec.uap
        model = self.model(ckpt)
        train = self.batches(key, "train", u.train_images, train=False)
        delta = train_uap(model, train, u.target, u.eps / 255.0, u.steps, u.lr, self.seed)
        test = self.batches(key, "test", self.spec.images)
        own = uap_effect(model, test, delta, u.target)
        along = []
        for snap in snapshots:
            eff = uap_effect(self.model(snap["checkpoint"]), test, delta, u.target)
            along.append({"step": snap["step"], "success": eff["success"]})
        along.append({"step": snapshots[-1]["of"] if snapshots else None, "success": own["success"]})
        save_perturbation_png(delta, Path(png), f"{name}: UAP to class {u.target}")
        torch.save(delta, Path(png).with_suffix(".pt"))
        return {
            "success": own["success"],
            "max_abs": float(delta.abs().max()),
            "eps_pixels": u.eps / 255.0,
            "along_training": along,
            "png": png,
        }

    def _uap_transfer(self, source_key: str, key: str, pretrained: str, models: dict) -> dict:
        """The pre-trained model's UAP (made on the source task) against target models:
        the DR it causes on each."""
        u = self.spec.uap
        made = (pretrained, source_key, self.seed)  # every target of a seed meets the same UAP
        if made not in self._source_uaps:
            src = self.batches(source_key, "train", u.train_images)
            self._source_uaps[made] = train_uap(
                self.model(pretrained), src, u.target, u.eps / 255.0, u.steps, u.lr, self.seed
            )
        delta = self._source_uaps[made]
        test = self.batches(key, "test", self.spec.images)
        own = uap_effect(self.model(pretrained), self.batches(source_key, "test", self.spec.images), delta, u.target)
        effects = {name: uap_effect(self.model(c), test, delta, None) for name, c in models.items()}
        return {
            "source_success": own["success"],
            "DR": {name: e["DR"] for name, e in effects.items()},
            "masks": {name: {"correct": e["correct"], "robust": e["robust"]} for name, e in effects.items()},
        }

    def _mmd(self, source_key: str, key: str, pretrained: str) -> dict:
        m = self.model(pretrained)
        with torch.no_grad():
            es = torch.cat([m.f(x) for x, _ in self.batches(source_key, "test", self.spec.mmd.images)])
            et = torch.cat([m.f(x) for x, _ in self.batches(key, "test", self.spec.mmd.images)])
        s = median_bandwidth(es)  # the source's: the same for every target of this model
        return {"mmd2": mmd2(es, et, bandwidth=s), "bandwidth": s, "images": [len(es), len(et)]}

    def _ll(self, key: str, models: dict) -> dict:
        spec = self.spec.ll
        g = torch.Generator().manual_seed(self.seed)
        out = {}
        batches = self.batches(key, "test", spec.images)
        for name, ckpt in models.items():
            f = self.model(ckpt).f
            vals, n = 0.0, 0
            for x, _ in batches:
                with torch.no_grad():
                    v = local_lipschitz(f, x, spec.eps / 255.0, spec.steps, generator=g)
                vals += float(v) * len(x)
                n += len(x)
            out[name] = vals / max(n, 1)
        return out


# -- the driver -----------------------------------------------------------------------------


def run_replicates(job: Job, rows: list[dict], stages: dict, sources: dict, log=print) -> dict:
    """Section 4's analyses of every seed's models (``run``)."""
    per_seed = {
        s: models_of(job.for_seed(s), [r for r in rows if r.get("seed") == s], stages, sources)
        for s in job.cfg.replicate_seeds()
    }
    return run(job, per_seed, log)


def models_of(job: Job, rows: list[dict], stages: dict, sources: dict) -> dict:
    """The models Section 4 analyses on each target dataset (first fine-tuning backbone) of
    the job's seed: the pre-trained (the standard source), and the selected fine-tuned and
    standard ones."""
    cfg = job.cfg
    backbone = cfg.finetune_backbones()[0]
    pre = sources.get((cfg.seed, backbone, cfg.source_objective()))
    models: dict = {}
    for key in cfg.finetune.datasets:
        m: dict = {"snapshots": {}}
        if pre is not None and pre.ckpt.is_file():
            m["pretrained"] = str(pre.ckpt)
        for r in rows:
            if (
                r["dataset"] == key
                and r["backbone"] == backbone
                and r.get("selected")
                and not r.get("attack")
                and r["method"] in ("full", "scratch")
            ):
                st = stages[r["stage"]]
                m[r["method"]] = str(st.ckpt)
                m["snapshots"][r["method"]] = (st.record or {}).get("snapshots", [])
        models[key] = m
    return models


def plan(job, per_seed: dict) -> list[dict]:
    """The tasks of every replicate: ``per_seed`` maps a seed to its ``models_of``."""
    return [{**t, "seed": seed} for seed, models in per_seed.items() for t in _plan(job, models, seed)]


def _plan(job, models: dict, seed: int) -> list[dict]:
    """The tasks for every target dataset. ``models``: dataset key -> {"pretrained",
    "full", "scratch": checkpoint path, "snapshots": {"full"|"scratch": [...]}} (the
    selected trials); a dataset missing a model gets no task that needs it."""
    cfg = job.cfg
    src = cfg.pretrain.dataset  # trained on here, or named beside imported weights
    source_ok = src is not None and job.beton(src, "test").is_file() and job.beton(src, "train").is_file()
    folder = job.out / "analyses"
    tasks = []
    for key, m in models.items():
        trio = {k: m[k] for k in ("full", "pretrained", "scratch") if m.get(k)}
        names = {"full": "fine-tuned", "pretrained": "pre-trained", "scratch": "standard"}
        if len(trio) >= 2:
            tasks.append(
                {"kind": "cca", "dataset": key, "args": {"key": key, "models": {names[k]: v for k, v in trio.items()}}}
            )
        for k in ("full", "scratch"):
            if m.get(k):
                tasks.append(
                    {
                        "kind": "uap",
                        "dataset": key,
                        "model": k,
                        "args": {
                            "key": key,
                            "name": names[k],
                            "ckpt": m[k],
                            "snapshots": m.get("snapshots", {}).get(k, []),
                            "png": str(folder / f"uap-{key}-{k}-s{seed}.png"),
                        },
                    }
                )
        if m.get("pretrained") and source_ok:
            both = {names[k]: m[k] for k in ("full", "scratch") if m.get(k)}
            if both:
                tasks.append(
                    {
                        "kind": "uap_transfer",
                        "dataset": key,
                        "args": {"source_key": src, "key": key, "pretrained": m["pretrained"], "models": both},
                    }
                )
            tasks.append(
                {"kind": "mmd", "dataset": key, "args": {"source_key": src, "key": key, "pretrained": m["pretrained"]}}
            )
        ll = {names[k]: m[k] for k in ("pretrained", "scratch", "full") if m.get(k)}
        if ll:
            tasks.append({"kind": "ll", "dataset": key, "args": {"key": key, "models": ll}})
    return tasks


def run(job, per_seed: dict, log=print) -> dict:
    """Runs the analyses of every seed (``per_seed``: seed -> ``models_of``) on a pool of
    Ray actors; writes ``OUT/analyses/analyses.json`` (atomically: ``{"seeds": {seed:
    {"datasets": ...}}}``, which actor ran what, when) and returns it. Reuses a previous
    result for the same models and spec."""
    import ray
    from ray.util import ActorPool

    cfg = job.cfg
    spec = cfg.analyses
    folder = job.out / "analyses"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "analyses.json"
    tasks = plan(job, per_seed)
    key = config_hash({"tasks": tasks, "spec": spec.model_dump()})
    if path.is_file():
        prev = json.loads(path.read_text())
        if prev.get("key") == key:
            log(f"analyses: {len(tasks)} tasks done before, reusing {path}")
            return prev
    if not tasks:
        log("analyses: nothing to analyse (no fine-tuned model)")
        return {"key": key, "seeds": {}}
    job.runtime.ray.ensure(cfg.ray.address, cfg.ray.num_cpus)
    n = min(spec.actors, len(tasks))
    actor = ray.remote(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)(Analyst)
    actors = [actor.remote(cfg.resolved(), str(job.out.resolve()), max(1, int(spec.resources.cpus))) for _ in range(n)]
    log(
        f"analyses: {len(tasks)} tasks on {n} Ray actor(s) "
        f"({spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU each)"
    )
    from tqdm.auto import tqdm

    done = []
    pool = ActorPool(actors)
    start = time.perf_counter()
    with tqdm(total=len(tasks), desc="analyses", disable=not job.progress, leave=False) as bar:
        for r in pool.map_unordered(lambda a, t: a.run.remote(t), tasks):
            done.append(r)
            t = r["task"]
            log(
                f"analyses: {t['kind']} on {t['dataset']}{' (' + t['model'] + ')' if 'model' in t else ''} "
                f"in {r['seconds']:.1f} s"
            )
            bar.update(1)
    for a in actors:
        ray.kill(a)
    out: dict = {
        "key": key,
        "seconds": time.perf_counter() - start,
        "actors": n,
        "seeds": {str(s): {"datasets": {}} for s in per_seed},
        "tasks": [
            {
                "kind": r["task"]["kind"],
                "dataset": r["task"]["dataset"],
                "seed": r["task"]["seed"],
                "model": r["task"].get("model"),
                "pid": r["pid"],
                "node": r["node"],
                "started": r["started"],
                "ended": r["ended"],
            }
            for r in done
        ],
    }
    _place(cfg, out, tasks, done)
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


def _place(cfg, out: dict, tasks: list, done: list) -> None:
    """Each finished task's result into ``out``'s seed and dataset (the job's key, as in
    results), in the tasks' order."""
    for r in sorted(done, key=lambda r: tasks.index(r["task"])):
        t = r["task"]
        slot = out["seeds"][str(t["seed"])]["datasets"].setdefault(t["dataset"], {})
        if t["kind"] == "uap":
            slot.setdefault("uap", {})[t["model"]] = r["result"]
        elif t["kind"] == "mmd":  # whose DR it goes with: this job's first fine-tuning backbone's
            slot["mmd"] = {
                **r["result"],
                "job": cfg.name,
                "backbone": cfg.finetune_backbones()[0],
                "dataset": t["dataset"],
            }
        else:
            slot[t["kind"]] = r["result"]


def metrics(result: dict) -> dict:
    """Flat MLflow metrics of an analyses result (``.../s<seed>`` per replicate)."""
    m = {}
    for seed, rep in by_seed(result).items():
        for k, v in _metrics(rep).items():
            m[f"{k}/s{seed}"] = v
    return m


def _metrics(result: dict) -> dict:
    m = {}
    for key, a in result.get("datasets", {}).items():
        for pair, v in a.get("cca", {}).items():
            if "bottom" not in v:  # the bootstrap draws
                continue
            tag = pair.replace("|", "_vs_").replace("-", "")
            m[f"cca/{key}/{tag}/bottom"] = v["bottom"]
            m[f"cca/{key}/{tag}/all"] = v["all"]
        for model, v in a.get("uap", {}).items():
            m[f"uap/{key}/{model}/success"] = v["success"]
        for name, dr in a.get("uap_transfer", {}).get("DR", {}).items():
            m[f"uap_transfer/{key}/{name.replace('-', '')}/DR"] = dr
        if "mmd" in a:
            m[f"mmd2/{key}"] = a["mmd"]["mmd2"]
        for name, v in a.get("ll", {}).items():
            m[f"ll/{key}/{name.replace('-', '')}"] = v
    return m


__all__ = [
    "Analyst",
    "GapGenerator",
    "cca_correlations",
    "layer_rows",
    "median_bandwidth",
    "metrics",
    "mmd2",
    "models_of",
    "plan",
    "run",
    "run_replicates",
    "save_perturbation_png",
    "svcca",
    "train_uap",
    "uap_effect",
]
