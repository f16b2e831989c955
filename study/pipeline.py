"""Runs a job: data -> stage 1 (pre-train or import, Ray Train) -> stage 2 (the sweep of
fine-tuning + attack trials, Ray Tune: study.sweep) -> results.

Each stage's output is keyed by the hash of the config that made it
(``OUT/checkpoints/<stage>-<hash>.pt`` beside ``.json`` with its metrics and MLflow
run id), so running the same job again skips what is done and redoes only what is not.

OUT layout::

    OUT/job.yaml              the resolved config that ran
    OUT/job.json              the job's MLflow experiment and parent run
    OUT/data/<dataset>/       .beton files and manifests (data.dir)
    OUT/checkpoints/          one checkpoint + record per trained model, and its
                              attack results (<stage>.eval.json, one entry per attack)
    OUT/mlflow.db             MLflow sqlite backend (local server only)
    OUT/mlartifacts/          MLflow artifact store (local server only)
    OUT/results.csv, .md      the table (the paper's Tables 1 and 2 beside ours in .md)
    OUT/sanity.csv            every sanity flag of every evaluated model
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from study import analyses, distributed, evaluate, objectives, report, results, tracking
from study.config import ConfigError, JobConfig
from study.data.beton import atomic_write_text, config_hash, prepare
from study.data.loaders import make_loader
from study.engine import accuracy
from study.models import build_model, load_checkpoint, load_trunk_weights, save_checkpoint


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass
class Job:
    cfg: JobConfig
    out: Path
    device: torch.device
    progress: bool = True

    @property
    def data_dir(self) -> Path:
        d = Path(self.cfg.data.dir).expanduser()
        return d if d.is_absolute() else self.out / d

    def beton(self, key: str, split: str) -> Path:
        # by the job's key, not the dataset's name: two keys may share a name (shapes, shapes10)
        return self.data_dir / key / f"{split}.beton"

    def loader(self, key: str, split: str, batch_size: int, train: bool, seed: int = 0,
               indices=None, workers: int | None = None):
        """An FFCV loader over a split (``indices``: a subset of it, e.g. the validation
        hold-out); ``workers`` defaults to data.workers."""
        return make_loader(self.beton(key, split), train=train, resolution=self.cfg.resolution(key),
                           batch_size=batch_size, dataset=self.cfg.dataset_name(key),
                           workers=workers or self.cfg.data.workers, device=self.device, seed=seed,
                           indices=indices, channels_last=self.device.type == "cuda")

    def manifest(self, key: str, split: str) -> dict:
        return json.loads(self.beton(key, split).with_suffix(".json").read_text())

    def num_classes(self, key: str) -> int:
        return int(self.manifest(key, "train")["num_classes"])

    def aoi(self, model, loader) -> float:
        return accuracy(model, loader, self.device, max_images=self.cfg.eval.max_images)


# -- stages -----------------------------------------------------------------------------
def _safe(v) -> str:
    """A name part fit for file names (objective names may carry [option=value])."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in str(v)).strip("_")


class Stage:
    """One trained model: its key, checkpoint, record and MLflow child run."""

    def __init__(self, job: Job, kind: str, ident: dict):
        self.job, self.kind, self.ident = job, kind, ident
        self.key = config_hash(ident)
        stem = "-".join([kind] + [_safe(v) for k, v in ident.items()
                                  if k in ("dataset", "backbone", "method", "objective")
                                  and isinstance(v, str)])
        folder = job.out / "checkpoints"
        self.ckpt = folder / f"{stem}-{self.key}.pt"
        self.record_path = self.ckpt.with_suffix(".json")
        self.eval_path = self.ckpt.with_name(self.ckpt.stem + ".eval.json")  # attack results
        self.pending = self.ckpt.with_suffix(".run")

    @property
    def record(self) -> dict | None:
        if self.ckpt.is_file() and self.record_path.is_file():
            return json.loads(self.record_path.read_text())
        return None

    def finish(self, record: dict) -> dict:
        atomic_write_text(self.record_path, json.dumps(record, indent=2))
        self.pending.unlink(missing_ok=True)
        return record

    def start_run(self, name: str, resume: bool = False, parent_run_id: str | None = None):
        """A child run of the job (of the active run, or of ``parent_run_id`` in a process
        that has none, such as a Tune trial). A run left RUNNING by a killed attempt is
        marked KILLED, or, with ``resume`` (a stage that restores its own progress, as Ray
        Train and Tune do from their storage), continued, so no restart adds a run."""
        import mlflow

        run = None
        if self.pending.is_file():
            stale = self.pending.read_text().strip()
            try:
                if resume:
                    mlflow.MlflowClient().get_run(stale)
                    run = mlflow.start_run(run_id=stale, nested=parent_run_id is None)
                else:
                    mlflow.MlflowClient().set_terminated(stale, status="KILLED")
            except Exception:
                pass  # the run lives in another store; nothing to mend
        if run is None:
            run = (mlflow.start_run(run_name=name, parent_run_id=parent_run_id) if parent_run_id
                   else mlflow.start_run(run_name=name, nested=True))
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.pending, run.info.run_id)
        mlflow.set_tags({"study.stage": self.kind, "study.stage_key": self.key,
                         **{f"study.{k}": str(v) for k, v in self.ident.items()
                            if k in ("dataset", "backbone", "setting", "objective", "source")}})
        return run


def _finish_model(job: Job, stage: Stage, run, model, test_loader, history: list,
                  extra: dict | None = None) -> dict:
    """A trained model's last steps, whoever trained it: AOI on the test split, the study
    checkpoint, the model in MLflow, the stage's record."""
    import mlflow

    aoi = job.aoi(model, test_loader)
    mlflow.log_metric("AOI", aoi)
    save_checkpoint(model, stage.ckpt, {"stage_key": stage.key})
    tracking.log_model(model)
    model.to(job.device)
    return stage.finish({"run_id": run.info.run_id, "AOI": aoi, "history": history,
                         "checkpoint": str(stage.ckpt), **(extra or {})})


def pretrain(job: Job, backbone: str, objective) -> Stage:
    """Stage 1 for one backbone and objective: import weights, or train on Ray Train."""
    cfg, p = job.cfg, job.cfg.pretrain
    key = p.dataset
    name = objectives.objective_name(objective)
    weights = p.weights_for(name)
    ident = {"stage": "pretrain", "backbone": backbone, "seed": cfg.seed, "weights": weights}
    if isinstance(p.weights, dict):  # imported backbones, one per objective
        ident["objective"] = name
    if weights is None:
        ident.update(dataset=cfg.dataset_name(key), data=cfg.dataset_params(key), root=cfg.dataset_root(key),
                     resolution=cfg.resolution(key), train=p.train.model_dump(), objective=name,
                     progressive=p.progressive.model_dump() if p.progressive else None)
    stage = Stage(job, "pretrain", ident)
    if stage.record is not None:
        log(f"pretrain {backbone} ({name}): done before, reusing {stage.ckpt.name}")
        return stage

    torch.manual_seed(cfg.seed)
    if weights is not None:  # import instead of training
        import mlflow

        model = build_model(backbone, 1000)
        load_trunk_weights(model, weights)
        with stage.start_run(f"import-{backbone}") as run:
            tracking.log_params({"backbone": backbone, "weights": weights, "objective": name})
            save_checkpoint(model, stage.ckpt, {"stage_key": stage.key})
            mlflow.set_tag("study.weights", weights)
            stage.finish({"run_id": run.info.run_id, "AOI": None, "checkpoint": str(stage.ckpt)})
        return stage

    run_name = f"pretrain-{backbone}-{cfg.dataset_name(key)}-{name}"
    log(f"pretrain {backbone} on {cfg.dataset_name(key)}, objective {name}, "
        f"{p.scaling.workers} Ray Train worker(s)")
    rec = _train_on_ray(job, stage, backbone, objective, key, run_name)
    log(f"pretrain {backbone} ({name}): source AOI {rec['AOI']:.2f}")
    return stage


def _train_on_ray(job: Job, stage: Stage, backbone: str, objective, key: str, run_name: str) -> dict:
    """Trains stage 1 with Ray Train (study.distributed); the driver then measures AOI,
    writes the study checkpoint and logs the model. A rerun after a crash continues the
    same MLflow run and Ray Train run (both are keyed by the stage)."""
    import dataclasses

    import mlflow

    cfg, p = job.cfg, job.cfg.pretrain
    distributed.ensure_ray(cfg.ray.address, cfg.ray.num_cpus)
    params = {"stage": "pretrain", "backbone": backbone, "dataset": cfg.dataset_name(key),
              "objective": objectives.objective_name(objective), "seed": cfg.seed,
              "train": p.train.model_dump(), "scaling": p.scaling.model_dump(),
              "progressive": p.progressive.model_dump() if p.progressive else None}
    with stage.start_run(run_name, resume=True) as run:
        if not run.data.params:
            tracking.log_params(params)
            tracking.log_yaml(params, "config.yaml")
        worker_cfg = distributed.worker_config(
            beton=job.beton(key, "train"), dataset=cfg.dataset_name(key),
            resolution=cfg.resolution(key), num_classes=job.num_classes(key), backbone=backbone,
            objective=objective, train=dataclasses.asdict(p.train.settings()), seed=cfg.seed,
            use_gpu=p.scaling.use_gpu, desc=run_name, run_id=run.info.run_id,
            tracking_uri=mlflow.get_tracking_uri(),
            progressive=p.progressive.model_dump() if p.progressive else None)
        state = distributed.fit(worker_cfg, name=stage.ckpt.stem,
                                storage=distributed.storage_path(cfg.ray.storage, job.out),
                                workers=p.scaling.workers, use_gpu=p.scaling.use_gpu,
                                cpus_per_worker=p.scaling.cpus_per_worker,
                                gpus_per_worker=p.scaling.gpus_per_worker,
                                max_failures=p.max_failures)
        model = build_model(backbone, job.num_classes(key))
        model.load_state_dict(state["model"])
        model.to(job.device)
        test_loader = job.loader(key, "test", cfg.eval.batch_size, train=False)
        return _finish_model(job, stage, run, model, test_loader, state["history"])


# -- evaluation ---------------------------------------------------------------------------
def evaluate_stage(job: Job, stage: Stage, key: str, backbone: str,
                   setting: str) -> tuple[list[dict], list]:
    """Runs the job's attack suite on a stage's model and its dataset's test split.

    Results are kept per attack in ``<checkpoint>.eval.json`` (written after each attack,
    atomically), so a rerun or a resumed job attacks only what is missing; the model is
    loaded only then. New results go to the stage's MLflow run (tracking.log_evaluation).
    """
    attacks = job.cfg.eval.suite(setting, key)
    if not attacks:
        return [], []
    path = stage.eval_path
    store = json.loads(path.read_text()) if path.is_file() else {}
    cache = store.setdefault("results", {})
    name = stage.ckpt.stem.rsplit("-", 1)[0]

    def save(k, rec):
        atomic_write_text(path, json.dumps(store, indent=1))
        if job.progress:
            log(f"  {name} {rec['attack']}{' (eps 0 check)' if rec['probe'] else ''}: "
                f"AOI {rec['AOI']:.2f}, AAI {rec['AAI']:.2f} on {rec['images']} images "
                f"({rec['seconds']:.1f} s)")

    cap, seed = job.cfg.eval.max_images, job.cfg.seed
    model = None
    if evaluate.missing(attacks, cap, seed, cache):  # load only when there is work
        model = load_checkpoint(stage.ckpt, backbone).to(job.device).eval()
    test = job.loader(key, "test", job.cfg.eval.batch_size, train=False)
    records = evaluate.evaluate(model, test, attacks, max_images=cap, seed=seed, cache=cache,
                                on_result=save)
    flags = evaluate.sanity_flags(records)
    logged = set(store.get("logged", []))
    if any(r["key"] not in logged for r in records):
        tracking.log_evaluation(stage.record["run_id"], records, flags, logged)
        store["logged"] = sorted(logged | {r["key"] for r in records})
        atomic_write_text(path, json.dumps(store, indent=1))
    return records, flags


def evaluate_stage_done(job: Job, stage: Stage, setting: str, key: str) -> bool:
    """Whether a stage is trained, attacked by the whole suite and logged: nothing to run."""
    if stage.record is None:
        return False
    path = stage.eval_path
    store = json.loads(path.read_text()) if path.is_file() else {}
    cache = store.get("results", {})
    attacks = job.cfg.eval.suite(setting, key)
    if evaluate.missing(attacks, job.cfg.eval.max_images, job.cfg.seed, cache):
        return False
    return not attacks or set(cache) <= set(store.get("logged", []))


def _source_data(cfg: JobConfig, setting: str) -> str | None:
    """What a model's backbone was pre-trained on (Table 4 compares these)."""
    from study.methods import METHODS

    if setting != "pretrain" and METHODS[setting].source is None:
        return None
    w = cfg.pretrain.weights
    if w is None:
        return cfg.pretrain.dataset  # the job's key: a folder dataset's name says little
    return "imagenet" if isinstance(w, dict) or w == "imagenet" else Path(str(w)).stem


def _rows(job: Job, key: str, backbone: str, setting: str, source: str | None, rec: dict,
          records, flags, stage: Stage, point: dict | None = None):
    """Result rows of one model: the clean row, then one per attack. ``source`` is the
    pre-training objective of a pre-trained model or of a fine-tune's backbone; ``point``
    a sweep trial's λ, rates and optimiser."""
    point = point or {}
    history = rec.get("history") or [{}]
    # the job's key names the dataset in results (unique in a job; the paper's name in its job files)
    base = {"dataset": key, "backbone": backbone, "setting": setting,
            "source": source, "source_data": _source_data(job.cfg, setting),
            "lam": point.get("lam"), "lr_f": point.get("lr_f"),
            "lr_g": point.get("lr_g"), "optimizer": point.get("optimizer"),
            "val_acc": history[-1].get("val_acc"), "stage": stage.key}
    rows = [{**base, "AOI": rec["AOI"]}]
    for r in records:
        if r["probe"]:
            continue
        bad = [f.name for f in evaluate.failed(flags, r["attack"])]
        rows.append({**base, "attack": r["attack"], "images": r["images"], "AOI": r["AOI"],
                     "AAI": r["AAI"], "DR": r["DR"], "flags": "; ".join(bad) if bad else "ok"})
    sanity = [{**base, "flag": f.name, "attack": f.attack, "passed": f.passed, "detail": f.detail}
              for f in flags]
    return rows, sanity


# -- the job ----------------------------------------------------------------------------
def _parent_run(out: Path, cfg: JobConfig):
    """The job's parent run: resumed when this OUT already ran the same config."""
    import mlflow

    exp_id = tracking.get_or_create_experiment(cfg.name)
    mlflow.set_experiment(experiment_id=exp_id)  # child runs land beside their parent
    state = out / "job.json"
    if state.is_file():
        prev = json.loads(state.read_text())
        if prev.get("config_hash") == cfg.hash():
            try:
                mlflow.MlflowClient().get_run(prev["parent_run_id"])
                return mlflow.start_run(run_id=prev["parent_run_id"])
            except Exception:
                pass  # another store, or the run was deleted: start afresh
    run = mlflow.start_run(experiment_id=exp_id, run_name=cfg.name)
    atomic_write_text(state, json.dumps({"config_hash": cfg.hash(), "experiment_id": exp_id,
                                         "parent_run_id": run.info.run_id}, indent=2))
    return run


def _select(rows: list[dict]) -> None:
    """Marks, per (dataset, backbone, method, λ), the trial with the best validation
    accuracy as ``selected`` (ties: the first); the paper's tables show only those, so
    model selection never looks at the test split. Stage-1 rows have no rivals."""
    best: dict = {}
    for r in rows:
        if r["setting"] == "pretrain" or r.get("attack"):
            continue
        k = (r["dataset"], r["backbone"], r["setting"], r.get("lam"))
        val = -1.0 if r.get("val_acc") is None else r["val_acc"]
        if k not in best or val > best[k][0]:
            best[k] = (val, r["stage"])
    picked = {stage for _, stage in best.values()}
    for r in rows:
        r["selected"] = r["setting"] == "pretrain" or r["stage"] in picked


def run_job(cfg: JobConfig, out: Path, progress: bool = True):
    """Runs the job into ``out``; returns the results frame and its Markdown."""
    import mlflow

    out = Path(out)
    device = resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    job = Job(cfg, out, device, progress)
    atomic_write_text(out / "job.yaml", yaml.safe_dump(cfg.resolved(), sort_keys=False))
    wants_gpu = cfg.pretrain.scaling.use_gpu or (cfg.finetune is not None and cfg.finetune.resources.gpus > 0)
    if wants_gpu and device.type == "cpu":
        # The driver itself attacks the stage-1 models (and writes the .beton files): on a
        # cluster's CPU head that is slow. `ray job submit --entrypoint-num-gpus 1` runs it on a GPU node.
        log("this driver has no GPU, though the job's workers use GPUs: it attacks the stage-1 models on "
            "CPU (on a cluster, submit with `ray job submit --entrypoint-num-gpus 1`)")

    used = {cfg.pretrain.dataset} if cfg.pretrain.weights is None else set()
    used |= set(cfg.finetune.datasets if cfg.finetune else [])
    for key in sorted(used):
        name = cfg.dataset_name(key)
        prepared = prepare(name, job.data_dir, root=cfg.dataset_root(key),
                           params=cfg.dataset_params(key), workers=cfg.data.workers, folder=key)
        for split, p in prepared.items():
            log(f"data {key}/{split}: {p.manifest['count']} images, "
                f"{'written' if p.written else 'already prepared'} ({p.beton})")

    with tracking.tracking(out, quiet=not progress):
        with _parent_run(out, cfg) as parent:
            tracking.log_yaml(cfg.resolved(), "job.yaml")
            if not parent.data.params:
                tracking.log_params(cfg.resolved())
            rows, sanity = [], []

            stages = {}

            def add(stage, key, backbone, setting, source, point=None):
                stages[stage.key] = stage
                records, flags = evaluate_stage(job, stage, key, backbone, setting)
                r, s_ = _rows(job, key, backbone, setting, source, stage.record, records, flags,
                              stage, point)
                rows.extend(r)
                sanity.extend(s_)

            sources = {}
            for backbone in cfg.pretrain.backbones:
                for objective in cfg.pretrain.objective_specs():
                    name = objectives.objective_name(objective)
                    sources[backbone, name] = stage = pretrain(job, backbone, objective)
                    if stage.record.get("AOI") is not None:  # trained here: it has a test split
                        add(stage, cfg.pretrain.dataset, backbone, "pretrain", name)
            if cfg.finetune is not None:
                from study import sweep

                table = sweep.source_table(sources)
                points = sweep.run(job, table, parent.info.run_id, parent.info.experiment_id)
                for p in points:
                    stage = sweep.stage_for(job, p, table)
                    if stage.record is None:
                        log(f"sweep: {sweep.label(p)} has no trained model (failed or stopped early)")
                        continue
                    add(stage, p["dataset"], p["backbone"], p["method"],
                        sweep.source_name(cfg, p["method"]), p)
            _select(rows)
            found = {}
            if cfg.finetune is not None and cfg.analyses.enabled:
                found = _analyse(job, rows, stages, sources)
            distributed.release_ray()
            df, md = results.write(rows, out, title=f"{cfg.name}: results", sanity=sanity)
            for name in ("results.csv", "results.md", "sanity.csv"):
                mlflow.log_artifact(str(out / name))
            if found:
                mlflow.log_metrics(analyses.metrics(found))
                mlflow.log_artifacts(str(out / "analyses"), "analyses")
            page = report.build(df, found, out / "report", title=cfg.name)
            mlflow.log_artifacts(str(out / "report"), "report")
            log(f"report: {page}")
    return df, md


def _analyse(job: Job, rows: list[dict], stages: dict, sources: dict) -> dict:
    """Section 4's analyses on the selected models of each target dataset (first
    fine-tuning backbone): pre-trained (the standard source), fine-tuned, standard."""
    cfg = job.cfg
    backbone = cfg.finetune_backbones()[0]
    pre = sources.get((backbone, cfg.source_objective()))
    models: dict = {}
    for key in cfg.finetune.datasets:
        m: dict = {"snapshots": {}}
        if pre is not None and pre.ckpt.is_file():
            m["pretrained"] = str(pre.ckpt)
        for r in rows:
            if (r["dataset"] == key and r["backbone"] == backbone and r.get("selected")
                    and not r.get("attack") and r["setting"] in ("full", "scratch")):
                st = stages[r["stage"]]
                m[r["setting"]] = str(st.ckpt)
                m["snapshots"][r["setting"]] = (st.record or {}).get("snapshots", [])
        models[key] = m
    return analyses.run(job, models, log=log)
