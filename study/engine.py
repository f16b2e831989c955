"""The one training engine: pre-training, fine-tuning and every defense run through it.

A ``Trainer`` owns the optimiser (separate parameter groups and learning rates for f
and g), the per-iteration schedule, mixed precision and the epoch loop. What is
minimised is an *objective* ``objective(model, images, labels) -> (loss, logits)``;
plain cross-entropy by default, and later defenses plug in their own without a loop
of their own. The loop takes any iterable of ``(images in [0,1], labels)`` and calls
``on_epoch(metrics)`` after every epoch, so a Ray Train worker or a Ray Tune trial
can report and checkpoint from there, and resume through ``state_dict``.

What trains (``trains``; the methods of ``study.methods`` pick it):
* ``f+g`` -- every parameter: the standard model (from random init) and the full
  fine-tune (f usually with the smaller learning rate).
* ``g``   -- the classifier only (the partial fine-tune); f's weights are frozen. Its
  BatchNorm layers either stay in training mode (``partial_bn="train"``, as the authors'
  code leaves the whole network: batch statistics, running statistics that adapt to
  the target) or are frozen too (``"frozen"``: eval mode, the source's statistics).

``TrainSettings`` is the one list of training options: job files take it as it is
(``study.config.TrainSpec`` adds only the ``lr`` shorthand).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from torch import nn

from study.models import unwrap
from study.objectives import cross_entropy

TRAINS = ("f+g", "g")
PARTIAL_BN = ("train", "frozen")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


def deterministic_kernels(on: bool) -> None:
    """The job option ``deterministic``: CUDA kernels that repeat bit for bit (cuDNN's
    deterministic algorithms, no autotuning, cuBLAS with a fixed workspace), and an error
    from any op that has none. On CPU the study's runs repeat without it. The switch is
    per process, so each worker sets it; it cannot be turned off again in one."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def one_of(known, what):
    """A validator: the value is one of ``known`` (the message names them)."""

    def check(v):
        if v not in known:
            raise ValueError(f"unknown {what} {v!r} (known: {', '.join(known)})")
        return v

    return AfterValidator(check)


class TrainSettings(BaseModel):
    # strict: a number written as a string ("0.1") is a mistake, not something to guess at
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    epochs: int = Field(10, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Annotated[str, one_of(OPTIMIZERS, "optimizer")] = "sgd"
    lr_f: float = Field(0.1, ge=0)  # learning rate of the feature extractor f
    lr_g: float = Field(0.1, ge=0)  # learning rate of the classifier g
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Annotated[str, one_of(SCHEDULES, "schedule")] = "cosine"
    step_every: int = Field(30, gt=0)  # step schedule: epochs between decays
    gamma: float = Field(0.1, gt=0)  # step schedule: decay factor
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool = True  # autocast + channels_last, on CUDA only
    amp_dtype: Literal["bfloat16", "float16"] = "bfloat16"  # float16 adds a gradient scaler


def param_groups(model: nn.Module, trains: str, lr_f: float, lr_g: float) -> list[dict]:
    if trains not in TRAINS:
        raise ValueError(f"unknown trains {trains!r} (known: {', '.join(TRAINS)})")
    m = unwrap(model)
    train_f = trains == "f+g"
    for p in m.f.parameters():
        p.requires_grad_(train_f)
    groups = [{"name": "g", "params": list(m.g.parameters()), "lr": lr_g}]
    if train_f:
        groups.insert(0, {"name": "f", "params": list(m.f.parameters()), "lr": lr_f})
    return groups


def lr_factor(s: TrainSettings, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates at iteration t (stepped once per batch)."""
    total = max(1, s.epochs * steps_per_epoch)
    warmup = int(s.warmup_epochs * steps_per_epoch)

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        if s.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        if s.schedule == "step":
            return s.gamma ** ((t // steps_per_epoch) // s.step_every)
        return 1.0

    return factor


def make_optimizer(groups, s: TrainSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=False)
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {s.optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def autocast(device: torch.device, enabled: bool, dtype: str = "bfloat16"):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


@torch.no_grad()
def accuracy(
    model: nn.Module, loader: Iterable, device=None, amp: bool = False, max_images: int | None = None
) -> float:
    """Top-1 accuracy in percent (the paper's AOI on a test loader)."""
    was_training = model.training
    model.eval()
    correct = seen = 0
    device = torch.device(device) if device else next(model.parameters()).device
    for images, labels in loader:
        if max_images is not None and seen >= max_images:
            break
        with autocast(device, amp):
            pred = model(images).argmax(1)
        keep = len(labels) if max_images is None else min(len(labels), max_images - seen)
        correct += (pred[:keep] == labels[:keep]).sum().item()
        seen += keep
    model.train(was_training)
    return 100.0 * correct / max(1, seen)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        settings: TrainSettings,
        trains: str,
        steps_per_epoch: int,
        device: str | torch.device = "cpu",
        objective: Callable | None = None,
        partial_bn: str = "train",
    ):
        if partial_bn not in PARTIAL_BN:
            raise ValueError(f"unknown partial_bn {partial_bn!r} (known: {', '.join(PARTIAL_BN)})")
        self.device = torch.device(device)
        self.settings, self.trains, self.partial_bn = settings, trains, partial_bn
        self.amp = settings.amp and self.device.type == "cuda"
        self.model = model.to(self.device)
        if self.amp:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.objective = objective or cross_entropy(settings.label_smoothing)
        groups = param_groups(self.model, trains, settings.lr_f, settings.lr_g)
        self.optimizer = make_optimizer(groups, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(settings, steps_per_epoch))
        # bf16 keeps float32's range and needs no loss scaling; float16 does
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and settings.amp_dtype == "float16" else None
        self.epoch = 0  # epochs completed
        self.steps_done = 0  # optimiser steps completed
        self.history: list[dict] = []

    # -- state, for checkpoints that resume mid-run -------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "steps_done": self.steps_done,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "history": list(self.history),
            "settings": self.settings.model_dump(),
            "trains": self.trains,
        }

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.steps_done = int(state.get("steps_done", 0))

    def _set_mode(self) -> None:
        self.model.train()
        if self.trains == "g" and self.partial_bn == "frozen":
            unwrap(self.model).f.eval()  # BatchNorm keeps the source's running statistics

    def lrs(self) -> dict:
        return {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}

    def train_epoch(
        self, loader: Iterable, progress: bool = True, desc: str = "", after_step: Callable[[int], None] | None = None
    ) -> dict:
        from tqdm.auto import tqdm

        self._set_mode()
        loss_sum = correct = seen = 0.0
        start = time.perf_counter()
        # a live bar on a terminal; in logs (CI, ray job logs) the per-epoch line is enough
        bar = tqdm(
            loader,
            desc=f"{desc} epoch {self.epoch + 1}/{self.settings.epochs}",
            disable=not (progress and sys.stderr.isatty()),
            leave=False,
            dynamic_ncols=True,
        )
        for images, labels in bar:
            with autocast(self.device, self.amp, self.settings.amp_dtype):
                loss, logits = self.objective(self.model, images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.scheduler.step()
            self.steps_done += 1
            if after_step is not None:
                after_step(self.steps_done)
            n = len(labels)
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == labels).sum().item()
            seen += n
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        seconds = time.perf_counter() - start
        return {
            "train_loss": loss_sum / max(1, seen),
            "train_acc": 100 * correct / max(1, seen),
            "epoch_seconds": seconds,
            "images_per_s": seen / max(seconds, 1e-9),
        }

    def fit(
        self,
        train_loader: Iterable,
        val_loader: Iterable | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        progress: bool = True,
        desc: str = "",
        val_name: str = "val_acc",
        before_epoch: Callable[[int], None] | None = None,
        after_step: Callable[[int], None] | None = None,
    ) -> list[dict]:
        """Trains from ``self.epoch`` (0, or where a loaded state left off) to the last epoch.

        ``val_loader``'s accuracy is recorded each epoch as ``val_name``; it is a monitor,
        nothing here selects a model by it. ``before_epoch(epoch)`` (0-based) runs first
        each epoch, e.g. to set the loader's resolution (progressive resizing);
        ``after_step(steps_done)`` after each optimiser step (snapshots for Fig. 5a).
        """
        while self.epoch < self.settings.epochs:
            if before_epoch is not None:
                before_epoch(self.epoch)
            lrs = self.lrs()  # the rates this epoch starts with
            metrics = self.train_epoch(train_loader, progress, desc, after_step)
            if val_loader is not None:
                metrics[val_name] = accuracy(self.model, val_loader, self.device, self.amp)
            self.epoch += 1
            metrics = {"epoch": self.epoch, **metrics, **lrs}
            self.history.append(metrics)
            if on_epoch is not None:
                on_epoch(metrics)
        return self.history
