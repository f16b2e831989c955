"""The pieces every stage of a job is made of: the job's context (``Job``), one trained
model's key, checkpoint, record and MLflow run (``Trained``), a trained model's last steps
(``finish_model``) and the attack suite on a stage's model (``evaluate_trained``).

Stage 1 (``study.pretrain``), stage 2 (``study.sweep``) and the analyses build on these;
``study.pipeline`` only puts them in order.

Each stage's output is keyed by the hash of the config that made it
(``OUT/checkpoints/<stage>-<hash>.pt`` beside ``.json`` with its metrics and MLflow
run id), so running the same job again skips what is done and redoes only what is not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from study import evaluate, threat, tracking
from study.config import ConfigError, JobConfig
from study.data.loaders import make_loader
from study.engine import accuracy, deterministic_kernels
from study.files import atomic_write_text, config_hash, sha256
from study.models import load_checkpoint, save_checkpoint
from study.runtime import Runtime


def log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def resolve_device(name: str, deterministic: bool = False) -> torch.device:
    """The job's device; with ``deterministic`` its kernels repeat bit for bit
    (study.engine.deterministic_kernels)."""
    deterministic_kernels(deterministic)
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
    fetched: dict = field(default_factory=dict)  # imported weights (study.pretrain.fetch_weights)
    runtime: Runtime = field(default_factory=Runtime)  # its Ray, loaders and digests (study.runtime)

    def for_seed(self, seed: int) -> Job:
        """This job as its replicate ``seed`` (study.config.JobConfig.for_seed)."""
        return self if seed == self.cfg.seed else replace(self, cfg=self.cfg.for_seed(seed))

    def _under_out(self, path: str) -> Path:
        """A job file's folder: as written when absolute, else relative to OUT."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.out / p

    @property
    def data_dir(self) -> Path:
        return self._under_out(self.cfg.data.dir)

    @property
    def weights_cache(self) -> Path | None:
        """pretrain.weights_cache; None: huggingface_hub's and torch's own caches."""
        c = self.cfg.pretrain.weights_cache
        return None if c is None else self._under_out(c)

    def beton(self, key: str, split: str) -> Path:
        # by the job's key, not the dataset's name: two keys may share a name (shapes, shapes10)
        return self.data_dir / key / f"{split}.beton"

    def loader(
        self,
        key: str,
        split: str,
        batch_size: int,
        train: bool,
        seed: int = 0,
        indices=None,
        workers: int | None = None,
    ):
        """An FFCV loader over a split (``indices``: a subset of it, e.g. the validation
        hold-out); ``workers`` defaults to data.workers."""
        return make_loader(
            self.beton(key, split),
            train=train,
            resolution=self.cfg.resolution(key),
            batch_size=batch_size,
            dataset=self.cfg.dataset_name(key),
            workers=workers or self.cfg.data.workers,
            device=self.device,
            seed=seed,
            indices=indices,
            channels_last=self.device.type == "cuda",
            cache=self.runtime.loaders,
        )

    def suite(self, method: str, key: str, backbone: str) -> list:
        """The evaluation items that meet a ``method`` model on dataset ``key``, each transfer
        item bound to the perturbations crafted for this unit (study.threat.bind)."""
        items = self.cfg.eval.suite(method, key, self.cfg.seed)
        return threat.bind(self.out, items, key, backbone, self.cfg.seed)

    def log_inputs(self, key: str, holdout: tuple | None = None) -> None:
        """The active run's dataset inputs: the train split (``holdout``: its training and
        validation parts, (train indices, validation indices)) and the test split."""
        train, test = self.manifest(key, "train"), self.manifest(key, "test")
        if holdout is None:
            train_parts = [("training", train["count"], train["config_hash"])]
        else:  # each part a subset of the split: its digest says which
            train_parts = [
                (
                    context,
                    len(idx),
                    config_hash(
                        {
                            "split": train["config_hash"],
                            "part": context,
                            "val_fraction": self.cfg.finetune.val_fraction,
                            "seed": self.cfg.seed,
                        }
                    ),
                )
                for context, idx in zip(("training", "validation"), holdout)
            ]
        parts = [(c, self.beton(key, "train"), train, n, d) for c, n, d in train_parts]
        parts.append(("evaluation", self.beton(key, "test"), test, test["count"], test["config_hash"]))
        tracking.log_splits(key, parts)

    def manifest(self, key: str, split: str) -> dict:
        return json.loads(self.beton(key, split).with_suffix(".json").read_text())

    def num_classes(self, key: str) -> int:
        return int(self.manifest(key, "train")["num_classes"])

    def aoi(self, model, loader, whole: bool = False) -> float:
        """AOI on the first ``eval.max_images`` test images (the ones the attacks see), or
        on all of them (``whole``: a pre-trained backbone's source accuracy)."""
        return accuracy(model, loader, self.device, max_images=None if whole else self.cfg.eval.max_images)

    def aoi_images(self, key: str, record: dict) -> int:
        """The test images a trained model's recorded AOI rests on (``aoi``)."""
        return record.get("aoi_images") or min(
            int(self.manifest(key, "test")["count"]), self.cfg.eval.max_images or 10**12
        )


def _safe(v) -> str:
    """A name part fit for file names (objective names may carry [option=value])."""
    return "".join(c if c.isalnum() or c in "._" else "_" for c in str(v)).strip("_")


class Trained:
    """One trained model: its key, checkpoint, record and MLflow child run. ``kind`` is
    the study's stage that trains it (``pretrain`` or ``finetune``); its key keeps the
    name users already have in files, results.csv and MLflow: the *stage key*."""

    TAGS = ("dataset", "backbone", "method", "objective", "source_stage")

    def __init__(self, job: Job, kind: str, ident: dict):
        self.job, self.kind, self.ident = job, kind, ident
        self.key = config_hash(ident)
        stem = "-".join(
            [kind]
            + [
                _safe(v)
                for k, v in ident.items()
                if k in ("dataset", "backbone", "method", "objective") and isinstance(v, str)
            ]
        )
        folder = job.out / "checkpoints"
        self.ckpt = folder / f"{stem}-{self.key}.pt"
        self.record_path = self.ckpt.with_suffix(".json")
        self.eval_path = self.ckpt.with_name(self.ckpt.stem + ".eval.json")  # attack results
        self.pending = self.ckpt.with_suffix(".run")

    @property
    def record(self) -> dict | None:
        """The stage's record, where its checkpoint is there and matches what the record
        says of it (size and sha256); a damaged one is set aside, so the stage trains again."""
        if not (self.ckpt.is_file() and self.record_path.is_file()):
            return None
        record = json.loads(self.record_path.read_text())
        return record if self._intact(record) else None

    def _intact(self, record: dict) -> bool:
        want = record.get("checkpoint_sha256")  # every record has it (study.formats upgrades older ones)
        size = self.ckpt.stat().st_size
        if size == record.get("checkpoint_size") and sha256(self.ckpt, self.job.runtime.digests) == want:
            return True
        aside = self.ckpt.with_name(self.ckpt.name + ".damaged")
        os.replace(self.ckpt, aside)
        if self.eval_path.is_file():  # its attack results were of the model it held
            os.replace(self.eval_path, self.eval_path.with_name(self.eval_path.name + ".damaged"))
        log(
            f"{self.ckpt.name} does not match its record ({size:,} bytes, recorded {record.get('checkpoint_size'):,}"
            f"{'' if size != record.get('checkpoint_size') else ', another sha256'}): training it again; "
            f"the damaged file is kept as {aside.name}"
        )
        return False

    def finish(self, record: dict) -> dict:
        if self.ckpt.is_file():  # what a later run checks before it reuses the checkpoint
            digest = sha256(self.ckpt, self.job.runtime.digests)
            record = {**record, "checkpoint_size": self.ckpt.stat().st_size, "checkpoint_sha256": digest}
        atomic_write_text(self.record_path, json.dumps(record, indent=2))
        self.pending.unlink(missing_ok=True)
        return record

    def start_run(self, name: str, resume: bool = False, parent_run_id: str | None = None):
        """A child run of the job (of the active run, or of ``parent_run_id`` in a process
        that has none, such as a Tune trial). A run left RUNNING by a killed attempt is
        marked KILLED, or, with ``resume`` (a stage that restores its own progress, as Ray
        Train and Tune do from their storage), continued, so no restart adds a run."""
        run = None
        if self.pending.is_file():
            stale = self.pending.read_text().strip()
            if resume and tracking.run_exists(stale, "the run a stopped attempt left"):
                run = tracking.child_run(name, parent_run_id, resume_id=stale)
            elif not resume:
                tracking.mark_killed(stale)
        if run is None:
            run = tracking.child_run(name, parent_run_id)
        self.ckpt.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.pending, run.id)
        tracking.set_tags(
            {
                "study.stage": self.kind,
                "study.stage_key": self.key,
                **{f"study.{k}": str(v) for k, v in self.ident.items() if k in self.TAGS},
            }
        )
        return run


def finish_model(
    job: Job, stage: Trained, run, model, test_loader, history: list, extra: dict | None = None, whole: bool = False
) -> dict:
    """A trained model's last steps, whoever trained it: AOI on the test split (the
    attacks' images, or ``whole``: every test image, recorded as ``aoi_images``), the
    study checkpoint, the model in MLflow, the stage's record."""
    aoi = job.aoi(model, test_loader, whole)
    tracking.log_metric("AOI", aoi)
    if whole:
        extra = {**(extra or {}), "aoi_images": int(test_loader.manifest["count"])}
    save_checkpoint(model, stage.ckpt, {"stage_key": stage.key})
    tracking.log_model(model)
    model.to(job.device)
    return stage.finish(
        {"run_id": run.id, "AOI": aoi, "history": history, "checkpoint": str(stage.ckpt), **(extra or {})}
    )


# -- evaluation ---------------------------------------------------------------------------
def _eval_store(stage: Trained) -> dict:
    path = stage.eval_path
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_trained(job: Job, stage: Trained, key: str, backbone: str, method: str) -> tuple[list[dict], list]:
    """Runs the job's attack suite on a stage's model and its dataset's test split.

    Results are kept per attack in ``<checkpoint>.eval.json`` (written after each attack,
    atomically), so a rerun or a resumed job attacks only what is missing; the model is
    loaded only then. New results go to the stage's MLflow run (tracking.log_evaluation).
    """
    attacks = job.suite(method, key, backbone)
    if not attacks:
        return [], []
    store = _eval_store(stage)
    cache = store.setdefault("results", {})
    name = stage.ckpt.stem.rsplit("-", 1)[0]

    def save(k, rec):
        atomic_write_text(stage.eval_path, json.dumps(store, indent=1))
        if job.progress:
            log(
                f"  {name} {rec['attack']}{' (eps 0 check)' if rec['probe'] else ''}: "
                f"AOI {rec['AOI']:.2f}, AAI {rec['AAI']:.2f} on {rec['images']} images "
                f"({rec['seconds']:.1f} s)"
            )

    cap, seed = job.cfg.eval.max_images, job.cfg.seed
    model = None
    if evaluate.missing(attacks, cap, seed, cache):  # load only when there is work
        model = load_checkpoint(stage.ckpt, backbone).to(job.device).eval()
    test = job.loader(key, "test", job.cfg.eval.batch_size, train=False)
    records = evaluate.evaluate(
        model, test, attacks, max_images=cap, seed=seed, cache=cache, on_result=save, fast_copy=job.cfg.eval.fast_copy
    )
    flags = evaluate.sanity_flags(records)
    logged = set(store.get("logged", []))
    if any(r["key"] not in logged for r in records):
        tracking.log_evaluation(stage.record["run_id"], records, flags, logged)
        store["logged"] = sorted(logged | {r["key"] for r in records})
        atomic_write_text(stage.eval_path, json.dumps(store, indent=1))
    return records, flags


def evaluated(job: Job, stage: Trained, method: str, key: str) -> bool:
    """Whether a stage is trained, attacked by the whole suite and logged: nothing to run."""
    if stage.record is None:
        return False
    store = _eval_store(stage)
    cache = store.get("results", {})
    attacks = job.suite(method, key, stage.ident["backbone"])
    if evaluate.missing(attacks, job.cfg.eval.max_images, job.cfg.seed, cache):
        return False
    return not attacks or set(cache) <= set(store.get("logged", []))
