"""Stage 2's methods by the paper's names: which backbone a model starts from, which of
its parameters train, and what the one training engine minimises.

| method      | paper           | starts from                 | trains | objective         |
|-------------|-----------------|-----------------------------|--------|-------------------|
| scratch     | standard model  | random init                 | f, g   | cross-entropy     |
| partial     | partial FT      | standard pre-training       | g      | cross-entropy     |
| full        | full FT         | standard pre-training       | f, g   | cross-entropy     |
| at_stage1   | AT@stage-1      | adversarial pre-training    | f, g   | cross-entropy     |
| at_stage2   | AT@stage-2      | standard pre-training       | f, g   | PGD adversarial   |
| at_stage12  | AT@stage-1&2    | adversarial pre-training    | f, g   | PGD adversarial   |
| kd_stage2   | KD@stage-2      | standard pre-training       | f, g   | CE + feature KD   |
| dm_stage2   | (DM alone)      | standard pre-training       | f, g   | CE + λ·LL (Eq. 5) |
| dm_stage12  | DM@stage-1&2    | adversarial pre-training    | f, g   | CE + λ·LL (Eq. 5) |

"Standard" and "adversarial pre-training" are two of ``pretrain.objectives``:
``finetune.source`` and ``finetune.robust_source`` (defaults: ``standard`` and the first
adversarial objective). The adversarial objective of AT@stage-2 is ``finetune.at``, the
teacher and weight of KD ``finetune.kd``, DM's radius and inner steps ``finetune.dm``;
DM's λ is a dimension of the sweep (``finetune.space.lam``, default the paper's 500).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str
    label: str               # the paper's name
    paper: str | None        # its setting in study/paper/tables.csv
    source: str | None       # None (random init), "standard" or "robust" pre-training
    setting: str             # which parameters train (study.engine.SETTINGS)
    objective: str           # "ce", "at", "kd" or "dm"


METHODS = {m.name: m for m in [
    Method("scratch", "standard model", "standard", None, "scratch", "ce"),
    Method("partial", "partial fine-tune", "partial_finetune", "standard", "partial", "ce"),
    Method("full", "full fine-tune", "full_finetune", "standard", "full", "ce"),
    Method("at_stage1", "AT@stage-1", "at_stage1", "robust", "full", "ce"),
    Method("at_stage2", "AT@stage-2", "at_stage2", "standard", "full", "at"),
    Method("at_stage12", "AT@stage-1&2", "at_stage12", "robust", "full", "at"),
    Method("kd_stage2", "KD@stage-2", "kd_stage2", "standard", "full", "kd"),
    Method("dm_stage2", "DM@stage-2", None, "standard", "full", "dm"),
    Method("dm_stage12", "DM@stage-1&2", "dm_stage12", "robust", "full", "dm"),
]}
TABLE1 = ("scratch", "partial", "full")
TABLE5 = ("full", "at_stage1", "at_stage2", "at_stage12", "kd_stage2", "dm_stage12")
DEFAULT_LAMBDA = 500.0


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]
