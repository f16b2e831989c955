"""Stage 1 on Ray Train: the one training engine, data-parallel over Ray workers.

``fit`` starts a Ray Train ``TorchTrainer`` (Train V2 API) whose every worker runs
``train_loop``: it builds its own FFCV loader (``distributed=True``, random order, as
many loader threads as the CPUs Ray gave the worker, a ``batch_size / workers`` share of
the global batch), wraps the model in DDP (``ray.train.torch.prepare_model``) and trains
it with ``study.engine.Trainer`` and a ``study.objectives`` objective. The same code runs
with 2 CPU workers on a laptop and 64 GPUs on a cluster; only ``ScalingConfig`` changes.

Failures: after every epoch each worker calls ``ray.train.report``; rank 0 attaches a
checkpoint (model, optimiser, scheduler, gradient scaler, epoch, history and the MLflow
run id). A restarted worker group (``FailureConfig(max_failures)``) starts from
``ray.train.get_checkpoint()``, and a rerun of the same stage (same name and storage)
restores the run from storage. Rank 0 logs each epoch's metrics to the stage's MLflow run
exactly once: before logging it reads which epochs the run already has, and after a
restart it fills in any epoch the checkpoint holds but MLflow missed.
Every epoch also checks that the workers' weights are still identical
(``workers_in_sync``), the property DDP promises.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch

from study import objectives, tracking
from study.data.loaders import make_loader
from study.engine import Trainer, TrainSettings, deterministic_kernels
from study.models import build_model, unwrap

STATE_FILE = "state.pt"


def fingerprint(model: torch.nn.Module) -> float:
    """One number that differs when any parameter differs (a position-weighted float64
    sum, computed where the tensors live). Identical weights give identical numbers, so
    workers compare it instead of shipping their weights around. Buffers are left out on
    purpose: DDP gives every worker rank 0's BatchNorm statistics at the start of each
    forward pass, so after a worker's last batch they differ by design."""
    total = torch.zeros((), dtype=torch.float64)
    for i, t in enumerate(model.parameters()):
        t = t.detach().double().flatten()
        w = torch.arange(1, t.numel() + 1, dtype=torch.float64, device=t.device)
        total += (t * w.mul_(1e-6).add_(i + 1)).sum().cpu()
    return float(total)


def resolution_at(epoch: int, spec: dict | None, default: int) -> int:
    """ffcv-imagenet's progressive resizing: ``min_res`` until ``start_ramp``, then linear
    to ``max_res`` at ``end_ramp`` (epochs, 0-based), in steps of ``step`` pixels."""
    if not spec:
        return default
    lo, hi = spec["min_res"], spec["max_res"]
    a, b, step = spec["start_ramp"], spec["end_ramp"], spec.get("step", 32)
    if epoch <= a:
        return lo
    if epoch >= b:
        return hi
    res = lo + (hi - lo) * (epoch - a) / (b - a)
    return int(round(res / step) * step)


# -- the worker loop ------------------------------------------------------------------------
def _quiet_report_lines() -> None:
    """Ray Train logs every report at INFO ("Reporting training result ...") through a
    logger named after its file path, which RunConfig's LoggingConfig level does not reach;
    two long lines per epoch would bury the study's own."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def say(line: str) -> None:
    """One line to the driver's console (Ray forwards worker stdout; Train V2's patched
    print would show it twice)."""
    import sys

    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _resume(trainer, cfg: dict, rank: int, device) -> int:
    """Loads Ray Train's checkpoint into ``trainer``, if there is one; returns how often
    this run came back from a checkpoint (a metric, for the record)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    trainer.load_state_dict(state)
    if rank == 0:
        say(f"[study] {cfg['desc']}: resumed from the checkpoint of epoch {trainer.epoch}")
    return int(state.get("restarts", 0)) + 1


class _EpochEnd:
    """What every worker does after an epoch: gather the group's numbers and weight
    fingerprints, report to Ray Train (rank 0 with a checkpoint), log to MLflow once."""

    def __init__(self, trainer, cfg: dict, rank: int, world: int, restarts: int, logged):
        self.trainer, self.cfg, self.rank, self.world = trainer, cfg, rank, world
        self.restarts, self.logged = restarts, logged

    def __call__(self, m: dict) -> None:  # m is trainer.history[-1]: what goes in the checkpoint
        import ray.train

        cfg, world = self.cfg, self.world
        mine = (fingerprint(unwrap(self.trainer.model)), m["train_loss"], m["train_acc"], m["images_per_s"])
        every = [mine]
        if world > 1:
            every = [None] * world
            torch.distributed.all_gather_object(every, mine)
        prints = [e[0] for e in every]
        # the whole global batch's loss and accuracy (equal shards), and the group's speed
        m["train_loss"] = sum(e[1] for e in every) / world
        m["train_acc"] = sum(e[2] for e in every) / world
        m["images_per_s"] = sum(e[3] for e in every)
        m["workers_in_sync"] = float(len(set(prints)) == 1)
        m["restarts"] = float(self.restarts)
        if cfg.get("progressive"):
            m["resolution"] = float(resolution_at(m["epoch"] - 1, cfg["progressive"], cfg["resolution"]))
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if self.rank == 0:
                torch.save(
                    {**self.trainer.state_dict(), "run_id": cfg.get("run_id"), "restarts": self.restarts},
                    Path(d) / STATE_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(
                {**m, "fingerprints": prints}, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{m['epoch']:04d}"
            )
        if self.logged is not None:  # after report: the checkpoint of this epoch exists
            self.logged.sync(self.trainer.history)
        if self.rank == 0:
            say(
                f"[study]   {cfg['desc']} epoch {m['epoch']}/{self.trainer.settings.epochs}: loss "
                f"{m['train_loss']:.3f}, train acc {m['train_acc']:.1f}, "
                f"{m['images_per_s']:.0f} img/s on {world} worker(s)"
                + ("" if m["workers_in_sync"] else ", WORKERS OUT OF SYNC")
            )


def train_loop(cfg: dict) -> None:
    """Runs on every Ray Train worker. ``cfg`` is plain data (see ``worker_config``)."""
    import ray
    import ray.train
    import ray.train.torch as rtt

    # DDP on CPU: oneDNN lays out some 1x1-conv weight gradients with other strides than
    # DDP's buckets; a copy is made, nothing is wrong
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    _quiet_report_lines()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(cpus)
    device = rtt.get_device() if cfg["use_gpu"] else torch.device("cpu")
    deterministic_kernels(cfg.get("deterministic", False))
    settings = TrainSettings(**cfg["train"])
    if settings.batch_size % world:
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by {world} workers")
    if not Path(cfg["beton"]).is_file():  # a node that does not see the shared data dir
        raise FileNotFoundError(
            f"{cfg['beton']} is not on node {ray.util.get_node_ip_address()}: on a cluster, "
            f"data.dir must be storage that every node mounts at the same path"
        )
    loader = make_loader(
        cfg["beton"],
        train=True,
        resolution=cfg["resolution"],
        batch_size=settings.batch_size // world,
        dataset=cfg["dataset"],
        workers=cpus,
        device=device,
        distributed=world > 1,
        seed=cfg["seed"],
        channels_last=device.type == "cuda",
    )
    torch.manual_seed(cfg["seed"])  # DDP broadcasts rank 0's weights anyway
    model = build_model(cfg["backbone"], cfg["num_classes"], cfg["resolution"])
    # each worker draws its own random starts for the attack
    generator = torch.Generator().manual_seed(cfg["seed"] * 1009 + rank)
    objective = objectives.build(cfg["objective"], settings.label_smoothing, generator)
    trainer = Trainer(model, settings, "f+g", len(loader), device, objective)
    trainer.model = rtt.prepare_model(trainer.model, move_to_device=False)  # DDP if world > 1
    restarts = _resume(trainer, cfg, rank, device)
    logged = None
    if rank == 0 and cfg.get("run_id"):
        logged = tracking.History(cfg["run_id"], cfg["tracking_uri"])
        logged.sync(trainer.history)  # what a crash kept from MLflow

    def before_epoch(epoch: int) -> None:
        loader.set_epoch(epoch)  # the shuffle an uninterrupted run would have had
        if cfg.get("progressive"):
            loader.set_resolution(resolution_at(epoch, cfg["progressive"], cfg["resolution"]))

    trainer.fit(
        loader,
        None,
        on_epoch=_EpochEnd(trainer, cfg, rank, world, restarts, logged),
        progress=False,
        desc=cfg["desc"],
        before_epoch=before_epoch,
    )


# -- the driver side ------------------------------------------------------------------------
def worker_config(
    *,
    beton,
    dataset: str,
    resolution: int,
    num_classes: int,
    backbone: str,
    objective,
    train: dict,
    seed: int,
    use_gpu: bool,
    desc: str,
    run_id: str | None = None,
    tracking_uri: str | None = None,
    progressive: dict | None = None,
    deterministic: bool = False,
) -> dict:
    return {
        "deterministic": deterministic,
        "beton": str(Path(beton).resolve()),
        "dataset": dataset,
        "resolution": resolution,
        "num_classes": num_classes,
        "backbone": backbone,
        "objective": objective,
        "train": dict(train),
        "seed": seed,
        "use_gpu": use_gpu,
        "desc": desc,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "progressive": progressive,
    }


def storage_path(storage: str, out: Path) -> str:
    """Ray Train storage: a URI (s3://, gs://, ...) as is, else an absolute local path
    (relative ones under OUT)."""
    if "://" in storage:
        return storage
    p = Path(storage).expanduser()
    return str((p if p.is_absolute() else Path(out) / p).resolve())


def fit(
    cfg: dict,
    *,
    name: str,
    storage: str,
    workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 1,
    max_failures: int = 2,
) -> dict:
    """Trains on Ray and returns the final checkpoint's state (``model`` is the state dict
    of the bare StudyModel; ``history`` has one entry per epoch)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # Ray Train's per-report INFO lines would bury the study's own
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
