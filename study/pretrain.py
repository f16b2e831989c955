"""Stage 1 on the driver's side: one pre-trained backbone per (backbone, objective),
imported from weights or trained on Ray Train (``study.distributed`` runs the workers)."""

from __future__ import annotations

import torch

from study import distributed, objectives, tracking
from study import weights as hub
from study.models import build_model, save_checkpoint
from study.stages import Job, Trained, finish_model, log


def fetch_weights(job: Job) -> dict:
    """Every imported backbone's file, fetched (or found in the cache), checked against
    its pin and loaded once into its backbone (a file that cannot load, or holds another
    network, stops the job here: before any data is prepared or MLflow started):
    (backbone, objective name) -> study.weights.Fetched."""
    p = job.cfg.pretrain
    for backbone in p.backbones:
        for name in p.objective_names():
            entry = p.weights_entry(name)
            if entry is not None and (backbone, name) not in job.fetched:
                spec, pin = entry
                got = hub.fetch(hub.parse(spec, backbone), job.weights_cache, pin)
                log(f"weights {backbone} ({name}): {spec} -> {got.path} (sha256 {got.sha256[:16]}...)")
                # loads as _import will, and holds it to the model contract (study.contract) at
                # every resolution the job runs it at: a broken term stops the job here
                hub.checked(got, backbone, _resolutions(job.cfg))
                job.fetched[backbone, name] = got
    return job.fetched


def _resolutions(cfg) -> list[int]:
    """Every side the job runs a pre-trained backbone at: stage 1's data and each target's."""
    keys = [cfg.pretrain.dataset] + (list(cfg.finetune.datasets) if cfg.finetune is not None else [])
    return sorted({cfg.resolution(k) for k in keys if k in cfg.datasets} or {224})


def identity(job: Job, backbone: str, name: str) -> dict:
    """What a pre-trained backbone's key is made of: for imported weights, the entry and
    the sha256 of the file it resolved to."""
    cfg, p = job.cfg, job.cfg.pretrain
    key, weights = p.dataset, p.weights_for(name)
    ident = {"stage": "pretrain", "backbone": backbone, "seed": cfg.seed, "weights": weights}
    if isinstance(p.weights, dict):  # imported backbones, one per objective
        ident["objective"] = name
    if weights is not None:
        ident["sha256"] = fetch_weights(job)[backbone, name].sha256
    else:
        ident.update(
            dataset=cfg.dataset_name(key),
            data=cfg.dataset_params(key),
            root=cfg.dataset_root(key),
            resolution=cfg.resolution(key),
            train=p.train.model_dump(),
            objective=name,
            progressive=p.progressive.model_dump() if p.progressive else None,
        )
    return ident


def pretrain(job: Job, backbone: str, objective) -> Trained:
    """Stage 1 for one backbone and objective: import weights, or train on Ray Train."""
    cfg, p = job.cfg, job.cfg.pretrain
    name = objectives.objective_name(objective)
    stage = Trained(job, "pretrain", identity(job, backbone, name))
    if stage.record is not None:
        log(f"pretrain {backbone} ({name}): done before, reusing {stage.ckpt.name}")
        return stage
    torch.manual_seed(cfg.seed)
    if p.weights_for(name) is not None:
        _import(stage, backbone, name, job.fetched[backbone, name])
        return stage
    run_name = f"pretrain-{backbone}-{cfg.dataset_name(p.dataset)}-{name}"
    log(
        f"pretrain {backbone} on {cfg.dataset_name(p.dataset)}, objective {name}, "
        f"{p.scaling.workers} Ray Train worker(s)"
    )
    rec = _train_on_ray(job, stage, backbone, objective, run_name)
    log(f"pretrain {backbone} ({name}): source AOI {rec['AOI']:.2f}")
    return stage


def _import(stage: Trained, backbone: str, name: str, fetched: hub.Fetched) -> None:
    """A backbone from ImageNet weights instead of training: checkpoint and MLflow run,
    both naming the file and its sha256."""
    model = build_model(backbone, 1000)
    fmt = hub.load(model, fetched)
    record = fetched.record() | {"weights_format": fmt}
    with stage.start_run(f"import-{backbone}") as run:
        tracking.log_params({"backbone": backbone, "objective": name, **record})
        save_checkpoint(model, stage.ckpt, {"stage_key": stage.key})
        tracking.set_tags({"study.weights": fetched.source.spec, "study.weights.sha256": fetched.sha256})
        stage.finish({"run_id": run.id, "AOI": None, "checkpoint": str(stage.ckpt), **record})


def _train_on_ray(job: Job, stage: Trained, backbone: str, objective, run_name: str) -> dict:
    """Trains stage 1 with Ray Train (study.distributed); the driver then measures AOI,
    writes the study checkpoint and logs the model. A rerun after a crash continues the
    same MLflow run and Ray Train run (both are keyed by the stage)."""
    cfg, p = job.cfg, job.cfg.pretrain
    key = p.dataset
    job.runtime.ray.ensure(cfg.ray.address, cfg.ray.num_cpus)
    params = {
        "stage": "pretrain",
        "backbone": backbone,
        "dataset": cfg.dataset_name(key),
        "objective": objectives.objective_name(objective),
        "seed": cfg.seed,
        "train": p.train.model_dump(),
        "scaling": p.scaling.model_dump(),
        "progressive": p.progressive.model_dump() if p.progressive else None,
    }
    with stage.start_run(run_name, resume=True) as run:
        if not run.params:
            tracking.log_params(params)
            tracking.log_yaml(params, "config.yaml")
            job.log_inputs(key)
        worker_cfg = distributed.worker_config(
            beton=job.beton(key, "train"),
            dataset=cfg.dataset_name(key),
            resolution=cfg.resolution(key),
            num_classes=job.num_classes(key),
            backbone=backbone,
            objective=objective,
            train=p.train.settings().model_dump(),
            seed=cfg.seed,
            use_gpu=p.scaling.use_gpu,
            desc=run_name,
            run_id=run.id,
            tracking_uri=tracking.uri(),
            progressive=p.progressive.model_dump() if p.progressive else None,
            deterministic=cfg.deterministic,
        )
        state = distributed.fit(
            worker_cfg,
            name=stage.ckpt.stem,
            storage=distributed.storage_path(cfg.ray.storage, job.out),
            workers=p.scaling.workers,
            use_gpu=p.scaling.use_gpu,
            cpus_per_worker=p.scaling.cpus_per_worker,
            gpus_per_worker=p.scaling.gpus_per_worker,
            max_failures=p.max_failures,
        )
        model = build_model(backbone, job.num_classes(key), resolution=cfg.resolution(key))
        model.load_state_dict(state["model"])
        model.to(job.device)
        test_loader = job.loader(key, "test", cfg.eval.batch_size, train=False)
        # the source accuracy on every test image: cheap, and what says the backbone learned
        return finish_model(job, stage, run, model, test_loader, state["history"], whole=True)
