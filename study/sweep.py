"""Stage 2 on Ray Tune: one trial per (target dataset, backbone, method, λ, learning rates).

The trial list is expanded here, deterministically, before Tune sees it (``points``):
a grid over the job's space, or ``num_samples`` random draws (seeded) per dataset,
backbone, method and λ; λ applies to the DM methods only, and a partial fine-tune has
no lr of f to vary, so no two trials train the same model. Tune then runs the list as a
single grid dimension, with the job's resources per trial, ``max_concurrent_trials``
and an optional ASHA scheduler on validation accuracy.

A trial (``trial``) is one trained model, a ``stages.Trained`` like every other:

1. builds the model from its pre-trained checkpoint (``study.methods`` says which one,
   which parameters train, and the objective's kind in ``study.objectives.KINDS``);
2. fine-tunes on the training split minus a held-out validation split
   (``finetune.val_fraction``, seeded) and reports ``val_acc`` every epoch, with its
   state as a Tune checkpoint (at most every ``checkpoint_every_s``), so a failed
   trial resumes near where it stopped;
3. a λ method (DM) is attacked on the validation images too (Table 1's attack: its
   ``val_AAI``);
4. measures AOI on the test split, writes the study checkpoint, logs the model, then
   runs the attack suite and reports AOI, AAI and DR of every attack.

Model selection -- which learning rates stand for a method in the tables -- uses
``val_acc`` only, and DM's λ ``val_AAI`` and ``val_acc``, never the test split
(``results.select``).

MLflow: every trial is a child run of the job's parent run (``mlflow.parentRunId``); a
trial that restarts continues its own run and logs each epoch once, so a restart adds
no run. Running the job again after the driver died restores the sweep from its Tune
storage (``Tuner.restore``): finished trials are not run again, unfinished ones resume.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from study import distributed, tracking
from study.config import Distribution, JobConfig, parse
from study.data.loaders import holdout
from study.engine import Trainer
from study.files import config_hash
from study.methods import METHODS, STRONG_ATTACK
from study.models import build_model, load_checkpoint, save_checkpoint, unwrap
from study.objectives import KINDS
from study.stages import Job, Trained, evaluate_trained, evaluated, finish_model, log, resolve_device

STATE_FILE = "trainer.pt"


# -- the trial list ---------------------------------------------------------------------
def _draw(values, rng: random.Random):
    if isinstance(values, Distribution):
        if values.loguniform is not None:
            lo, hi = values.loguniform
            return math.exp(rng.uniform(math.log(lo), math.log(hi)))
        return rng.uniform(*values.uniform)
    return rng.choice(values)


def points(cfg: JobConfig) -> list[dict]:
    """Every trial of the job's sweep, in a stable order: the points of the space, drawn
    once (random search: from the first seed), then each of them for every seed."""
    return [{**p, "seed": seed} for seed in cfg.replicate_seeds() for p in _space_points(cfg)]


def _space_points(cfg: JobConfig) -> list[dict]:
    ft = cfg.finetune
    if ft is None:
        return []
    rng = random.Random(cfg.replicate_seeds()[0])
    out, seen = [], set()
    for key in ft.datasets:
        for backbone in cfg.finetune_backbones():
            for name in ft.methods_of(key):
                method = METHODS[name]
                base = ft.train_for(name).settings()
                fixed = ft.fixed_by_override(name)  # an override wins over the space
                if "lr" in fixed:
                    fixed |= {"lr_f", "lr_g"}
                if method.trains == "g":  # f is frozen: its rate changes nothing
                    fixed.add("lr_f")
                dims = {}
                for k in ("lr_f", "lr_g", "optimizer"):
                    v = getattr(ft.space, k)
                    dims[k] = v if v is not None and k not in fixed else [getattr(base, k)]
                for lam in ft.space.lam if KINDS[method.kind].uses_lambda else [None]:
                    if ft.search == "grid":
                        combos = itertools.product(dims["lr_f"], dims["lr_g"], dims["optimizer"])
                    else:
                        combos = [
                            tuple(_draw(dims[k], rng) for k in ("lr_f", "lr_g", "optimizer"))
                            for _ in range(ft.num_samples)
                        ]
                    for lr_f, lr_g, opt in combos:
                        p = {
                            "dataset": key,
                            "backbone": backbone,
                            "method": name,
                            "lam": None if lam is None else float(lam),
                            "lr_f": float(lr_f),
                            "lr_g": float(lr_g),
                            "optimizer": opt,
                        }
                        ident = tuple(sorted(p.items(), key=lambda kv: kv[0]))
                        if ident not in seen:
                            seen.add(ident)
                            out.append(p)
    return out


def label(p: dict) -> str:
    lam = f" λ={p['lam']:g}" if p["lam"] is not None else ""
    return (
        f"{p['method']} {p['backbone']} {p['dataset']}{lam} "
        f"lr_f={p['lr_f']:g} lr_g={p['lr_g']:g} {p['optimizer']} seed={p['seed']}"
    )


# -- one trial --------------------------------------------------------------------------
def train_spec(cfg: JobConfig, p: dict):
    """The TrainSpec of a point: the method's spec with the point's rates and optimiser."""
    spec = cfg.finetune.train_for(p["method"])
    return spec.model_copy(update={"lr": None, "lr_f": p["lr_f"], "lr_g": p["lr_g"], "optimizer": p["optimizer"]})


def objective_spec(cfg: JobConfig, p: dict) -> dict:
    """What the method minimises, as recorded in the stage's identity (its kind's entry)."""
    method = METHODS[p["method"]]
    return KINDS[method.kind].identity(cfg.finetune, p, source_name(cfg, p["method"]), cfg.robust_objective())


def source_name(cfg: JobConfig, method: str) -> str | None:
    """The pre-training objective whose backbone ``method`` starts from (None: scratch)."""
    kind = METHODS[method].starts_from
    if kind is None:
        return None
    return cfg.source_objective() if kind == "standard" else cfg.robust_objective()


def source_table(stages: dict) -> dict:
    """(seed, backbone, objective) -> the pre-trained model (``Trained``), as the plain {key, ckpt} a trial gets."""
    return {k: {"key": st.key, "ckpt": str(st.ckpt.resolve())} for k, st in stages.items()}


def trained_for(job, p: dict, sources: dict) -> Trained:
    """The ``Trained`` of a point, of its seed's replicate; ``sources`` maps (seed, backbone,
    objective) to the pre-trained stage's {key, ckpt} (``source_table``)."""
    job = job.for_seed(p["seed"])
    cfg = job.cfg
    src = source_name(cfg, p["method"])
    obj = objective_spec(cfg, p)
    teacher = KINDS[obj["kind"]].teacher(obj)
    if teacher is not None:
        obj["teacher_key"] = sources[p["seed"], p["backbone"], teacher]["key"]
    ident = {
        "stage": "finetune",
        "dataset": cfg.dataset_name(p["dataset"]),
        "backbone": p["backbone"],
        "method": p["method"],
        "seed": cfg.seed,
        "data": cfg.dataset_params(p["dataset"]),
        "root": cfg.dataset_root(p["dataset"]),  # two folder datasets differ only here
        "resolution": cfg.resolution(p["dataset"]),
        "train": train_spec(cfg, p).model_dump(),
        "objective": obj,
        "val_fraction": cfg.finetune.val_fraction,
        "source_stage": None if src is None else sources[p["seed"], p["backbone"], src]["key"],
    }
    if METHODS[p["method"]].trains == "g" and cfg.finetune.partial_bn == "train":
        # in the key only when BatchNorm trains: models from before the switch were frozen
        ident["partial_bn"] = "train"
    return Trained(job, "finetune", ident)


def _objective(cfg: JobConfig, p: dict, ident: dict, sources: dict, device, generator):
    """The objective function of a point, from its identity (and its teacher, if any)."""
    kind = KINDS[ident["kind"]]
    teacher = kind.teacher(ident)
    if teacher is not None:
        teacher = load_checkpoint(sources[p["seed"], p["backbone"], teacher]["ckpt"], p["backbone"]).to(device)
    return kind.build(ident, train_spec(cfg, p).label_smoothing, generator, teacher)


def snapshot_steps(cfg: JobConfig, method: str, total: int) -> set[int]:
    """The optimiser steps after which a trial keeps a snapshot of its model: Fig. 5a's
    fractions of training, for the standard model and the full fine-tune only."""
    if not cfg.analyses.enabled or method not in ("scratch", "full"):
        return set()
    return {min(total - 1, max(1, round(f * total))) for f in cfg.analyses.snapshots} - {0}


def snapshot_path(stage, step: int) -> Path:
    return stage.ckpt.with_name(f"{stage.ckpt.stem}.step{step}.pt")


def _model(job: Job, p: dict, sources: dict):
    """A point's model before fine-tuning: random init, or its source backbone with a new g."""
    cfg, key = job.cfg, p["dataset"]
    torch.manual_seed(cfg.seed + 1)
    num_classes = job.num_classes(key)
    src = source_name(cfg, p["method"])
    if src is None:
        return build_model(p["backbone"], num_classes, cfg.resolution(key))
    model = load_checkpoint(sources[p["seed"], p["backbone"], src]["ckpt"], p["backbone"])
    torch.manual_seed(cfg.seed + 1)
    model.reset_classifier(num_classes)
    return model


class _Reporter:
    """A trial's per-epoch work: the epoch into MLflow, a line, and a Tune report with the
    trainer's state as a checkpoint at most every ``checkpoint_every_s`` (a checkpoint
    costs seconds to write, so short epochs do not spend their time saving). The last
    epoch reports after the attacks."""

    def __init__(self, trainer, run_id: str, name: str, epochs: int, every_s: float):
        self.trainer, self.run_id, self.name, self.epochs, self.every_s = trainer, run_id, name, epochs, every_s
        self.logged, self.saved, self.last = tracking.History(run_id), time.monotonic(), {}

    def __call__(self, m: dict) -> None:
        from ray import tune

        self.logged.sync(self.trainer.history)
        distributed.say(
            f"[study]   {self.name} epoch {m['epoch']}/{self.epochs}: loss {m['train_loss']:.3f}, "
            f"train acc {m['train_acc']:.1f}, val acc {m['val_acc']:.1f}, "
            f"{m['images_per_s']:.0f} img/s"
        )
        self.last.update(m)
        if m["epoch"] == self.epochs:
            return
        if time.monotonic() - self.saved < self.every_s:
            tune.report(dict(m))
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(self.trainer.state_dict(), Path(d) / STATE_FILE)
            tune.report(dict(m), checkpoint=tune.Checkpoint.from_directory(d))
        self.saved = time.monotonic()


def _fine_tune(job: Job, stage: Trained, p: dict, sources: dict, context: dict) -> dict:
    """Trains a point's model, resuming from Tune's checkpoint, and finishes its stage;
    returns the last epoch's metrics."""
    from ray import tune

    cfg, key, name = job.cfg, p["dataset"], label(p)
    spec = train_spec(cfg, p)
    s = spec.settings()
    model = _model(job, p, sources)
    train_idx, val_idx = holdout(int(job.manifest(key, "train")["count"]), cfg.finetune.val_fraction, cfg.seed)
    threads = max(1, int(context["cpus"]))  # the trial's own CPUs, not data.workers
    train_loader = job.loader(key, "train", s.batch_size, train=True, seed=cfg.seed, indices=train_idx, workers=threads)
    val_loader = job.loader(key, "train", cfg.eval.batch_size, train=False, indices=val_idx, workers=threads)
    generator = torch.Generator().manual_seed(cfg.seed)
    objective = _objective(cfg, p, stage.ident["objective"], sources, job.device, generator)
    trainer = Trainer(
        model,
        s,
        METHODS[p["method"]].trains,
        len(train_loader),
        job.device,
        objective,
        partial_bn=cfg.finetune.partial_bn,
    )
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            trainer.load_state_dict(torch.load(Path(d) / STATE_FILE, map_location=job.device, weights_only=True))
    params = {
        "stage": "finetune",
        "method": p["method"],
        "lam": p["lam"],
        "dataset": cfg.dataset_name(key),
        "backbone": p["backbone"],
        "seed": cfg.seed,
        "source_stage": stage.ident["source_stage"],
        "objective": stage.ident["objective"],
        "val_fraction": cfg.finetune.val_fraction,
        "train": spec.model_dump(),
        "tune_trial": tune.get_context().get_trial_name(),
    }
    with stage.start_run(name, resume=True, parent_run_id=context["parent_run_id"]) as run:
        if not run.params:
            tracking.log_params(params)
            tracking.log_yaml(params, "config.yaml")
            tracking.set_tags({"study.lam": str(p["lam"]), "study.tune_trial": params["tune_trial"]})
            job.log_inputs(key, (train_idx, val_idx))
        report = _Reporter(trainer, run.id, name, s.epochs, cfg.finetune.checkpoint_every_s)
        total = s.epochs * len(train_loader)
        snap_at = snapshot_steps(cfg, p["method"], total)

        def after_step(step: int) -> None:  # Fig. 5a attacks the model along its training
            if step in snap_at:
                save_checkpoint(trainer.model, snapshot_path(stage, step), {"stage_key": stage.key})

        trainer.fit(
            train_loader,
            val_loader,
            on_epoch=report,
            progress=False,
            desc=name,
            val_name="val_acc",
            before_epoch=train_loader.set_epoch,  # a resumed trial sees the epochs it would have
            after_step=after_step,
        )
        test_loader = job.loader(key, "test", cfg.eval.batch_size, train=False)
        snaps = [
            {"step": k, "of": total, "checkpoint": str(snapshot_path(stage, k))}
            for k in sorted(snap_at)
            if snapshot_path(stage, k).is_file()
        ]
        extra = {"snapshots": snaps, "steps": total, "f_l1": feature_l1(trainer.model, val_loader)}
        tracking.log_metric("f_l1", extra["f_l1"])
        if KINDS[METHODS[p["method"]].kind].uses_lambda and lambda_rivals(cfg, p):
            extra |= validation_attack(job, trainer.model, val_loader)
            tracking.log_metric("val_AAI", extra["val_AAI"])
        finish_model(job, stage, run, trainer.model, test_loader, trainer.history, extra=extra)
    return report.last


@torch.no_grad()
def feature_l1(model, val_loader) -> float:
    """Mean ||f(x)||_1 over the validation images: DM's LL can fall by shrinking f (and
    growing g, g∘f unchanged), which this shows beside the plain fine-tune's."""
    f = unwrap(model).f
    was = f.training
    f.eval()
    total, n = 0.0, 0
    for x, _ in val_loader:
        total += float(f(x).flatten(1).float().abs().sum())
        n += len(x)
    f.train(was)
    return total / max(n, 1)


def lambda_rivals(cfg: JobConfig, p: dict) -> bool:
    """Whether another λ of the sweep competes with this point's for its method (else the
    validation attack that chooses λ has nothing to choose and is not run)."""
    same = ("dataset", "backbone", "method")
    return any(q["lam"] != p["lam"] for q in _space_points(cfg) if all(q[k] == p[k] for k in same))


def validation_attack(job: Job, model, val_loader) -> dict:
    """The strong evaluation at Table 1's eps on the validation images (at most
    ``finetune.val_attack_images``): what chooses a λ method's λ (``results.choose_lambda``),
    so the choice never sees the test split, and a λ whose model merely resists the
    paper's PGD-10 (gradient masking) is not rewarded for it."""
    from study.attacks import parse_attack
    from study.evaluate import evaluate

    model.eval()
    rec = next(
        r
        for r in evaluate(
            model,
            val_loader,
            [parse_attack(STRONG_ATTACK)],
            max_images=job.cfg.finetune.val_attack_images,
            seed=job.cfg.seed,
            fast_copy=job.cfg.eval.fast_copy,
        )
        if not r["probe"]
    )
    return {"val_AAI": rec["AAI"], "val_attack": rec["attack"], "val_images": rec["images"]}


def trial(config: dict, context: dict) -> None:
    """A Tune trial: fine-tune one point, then attack it (see the module docstring)."""
    from ray import tune

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a line per checkpoint
    p = config["point"]
    cfg = parse(context["job"])
    torch.set_num_threads(max(1, int(context["cpus"])))
    job = Job(
        cfg.for_seed(p["seed"]), Path(context["out"]), resolve_device(cfg.device, cfg.deterministic), progress=False
    )
    sources = {(int(k.split("|")[0]), *k.split("|")[1:]): v for k, v in context["sources"].items()}
    tracking.use(context["tracking_uri"], context["experiment_id"])
    stage = trained_for(job, p, sources)
    last = _fine_tune(job, stage, p, sources, context) if stage.record is None else {}
    rec = stage.record
    records, _ = evaluate_trained(job, stage, p["dataset"], p["backbone"], p["method"])
    final = {**(last or rec["history"][-1]), "val_acc": rec["history"][-1]["val_acc"], "AOI": rec["AOI"]}
    for r in records:
        if not r["probe"]:
            k = tracking.metric_key(r["attack"])
            final.update({f"AAI/{k}": r["AAI"], f"DR/{k}": r["DR"], f"AOI/{k}": r["AOI"]})
    distributed.say(
        f"[study] {label(p)}: val acc {final['val_acc']:.2f}, "
        f"AOI {rec['AOI']:.2f} on {job.aoi_images(p['dataset'], rec)} images"
        + "".join(f", AAI {r['attack']} {r['AAI']:.2f} on {r['images']}" for r in records if not r["probe"])
    )
    tune.report(final)


# -- the sweep --------------------------------------------------------------------------
def run(job, sources: dict, parent_run_id: str, experiment_id: str) -> list[dict]:
    """Runs (or restores) the job's sweep on Ray Tune; returns the points. Skips Tune
    when every point is trained and evaluated already. ``sources``: ``source_table``."""
    import os

    from ray import tune

    cfg = job.cfg
    pts = points(cfg)
    if all(evaluated(job, trained_for(job, p, sources), p["method"], p["dataset"]) for p in pts):
        log(f"sweep: all {len(pts)} trials done before, reusing")
        return pts
    # Tune warns when one-epoch trials snapshot its state often; that is the price of
    # resuming every trial at its last epoch, and cheap on a local disk
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    job.runtime.ray.ensure(cfg.ray.address, cfg.ray.num_cpus)
    ft = cfg.finetune
    context = {
        "job": cfg.resolved(),
        "out": str(job.out.resolve()),
        "parent_run_id": parent_run_id,
        "experiment_id": experiment_id,
        "tracking_uri": tracking.uri(),
        "cpus": ft.resources.cpus,
        "sources": {f"{s}|{b}|{o}": v for (s, b, o), v in sources.items()},
    }
    resources = {"cpu": ft.resources.cpus, "gpu": ft.resources.gpus}
    trainable = tune.with_resources(tune.with_parameters(trial, context=context), resources)
    storage = distributed.storage_path(cfg.ray.storage, job.out)
    name = f"sweep-{cfg.hash()[:16]}"
    path = f"{storage.rstrip('/')}/{name}"
    log(
        f"sweep: {len(pts)} trials on Ray Tune ({resources['cpu']:g} CPU, {resources['gpu']:g} GPU each"
        f"{f', at most {ft.max_concurrent_trials} at once' if ft.max_concurrent_trials else ''}), "
        f"storage {path}"
    )
    restoring = tune.Tuner.can_restore(path)
    if restoring:
        log("sweep: restoring the sweep a previous driver left (finished trials are kept)")
    tuner = make_tuner(
        trainable, pts, ft, storage, name, max_epochs=max(train_spec(cfg, p).epochs for p in pts), restore=restoring
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    for r in failed:
        log(f"sweep: trial {label(r.config['point'])} failed: {str(r.error).splitlines()[0][:300]}")
    gave_up = {label(r.config["point"]) for r in failed}
    redo = [p for p in pts if label(p) not in gave_up and trained_for(job, p, sources).record is None]
    if restoring and redo:  # trials the restored sweep counts as finished whose checkpoint was set aside
        again = f"{name}-again-{config_hash(sorted(label(p) for p in redo))[:8]}"
        log(f"sweep: {len(redo)} finished trial(s) lack a usable checkpoint: training them again ({again})")
        epochs = max(train_spec(cfg, p).epochs for p in redo)
        resume = tune.Tuner.can_restore(f"{storage.rstrip('/')}/{again}")
        make_tuner(trainable, redo, ft, storage, again, max_epochs=epochs, restore=resume).fit()
    return pts


def make_tuner(trainable, pts: list[dict], ft, storage: str, name: str, max_epochs: int, restore: bool = False):
    """The Tuner of a sweep over ``pts`` (one grid dimension, ``point``) with the
    FinetuneSpec ``ft``'s scheduler, concurrency and failure policy; or, with ``restore``,
    the one a previous driver left at ``storage/name``. The overhead benchmark builds its
    Tuner here too, so it measures the sweep's own settings."""
    from ray import tune

    if restore:
        return tune.Tuner.restore(
            f"{storage.rstrip('/')}/{name}", trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = None
    if ft.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_epochs,
            grace_period=ft.scheduler.grace_period,
            reduction_factor=ft.scheduler.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space={"point": tune.grid_search(pts)},
        tune_config=tune.TuneConfig(
            metric="val_acc",
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=ft.max_concurrent_trials,
            # one process serves trial after trial: no start-up
            # and imports (seconds each) per trial
            reuse_actors=True,
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=ft.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )
