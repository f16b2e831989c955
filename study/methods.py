"""Stage 2's methods by the paper's names: which backbone a model starts from, which of
its parameters train, and what the one training engine minimises.

| method      | paper           | starts from                 | trains | objective (kind)       |
|-------------|-----------------|-----------------------------|--------|------------------------|
| scratch     | standard model  | random init                 | f+g    | cross-entropy (ce)     |
| partial     | partial FT      | standard pre-training       | g      | cross-entropy (ce)     |
| full        | full FT         | standard pre-training       | f+g    | cross-entropy (ce)     |
| at_stage1   | AT@stage-1      | adversarial pre-training    | f+g    | cross-entropy (ce)     |
| at_stage2   | AT@stage-2      | standard pre-training       | f+g    | PGD adversarial (at)   |
| at_stage12  | AT@stage-1&2    | adversarial pre-training    | f+g    | PGD adversarial (at)   |
| kd_stage2   | KD@stage-2      | standard pre-training       | f+g    | CE + feature KD (kd)   |
| dm_stage2   | (DM alone)      | standard pre-training       | f+g    | CE + λ·LL, Eq. 5 (dm)  |
| dm_stage12  | DM@stage-1&2    | adversarial pre-training    | f+g    | CE + λ·LL, Eq. 5 (dm)  |
| trades_stage2 | TRADES@stage-2 | standard pre-training     | f+g    | CE + β·KL (trades)     |

"Standard" and "adversarial pre-training" are two of ``pretrain.objectives``:
``finetune.source`` and ``finetune.robust_source`` (defaults: ``standard`` and the first
adversarial objective). Each kind's options are a section of ``finetune`` (``at``,
``kd``, ``dm``, ``trades``); the kinds themselves are ``study.objectives.KINDS``. DM's λ is a
dimension of the sweep (``finetune.space.lam``, default the paper's 500).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Method:
    name: str
    label: str  # the paper's name
    paper: str | None  # its name in study/paper/tables.csv
    starts_from: str | None  # None (random init), "standard" or "robust" pre-training
    trains: str  # which parameters train: "f+g" or "g" (study.engine.TRAINS)
    kind: str  # its objective's kind in study.objectives.KINDS


METHODS = {
    m.name: m
    for m in [
        Method(name="scratch", label="standard model", paper="standard", starts_from=None, trains="f+g", kind="ce"),
        Method(
            name="partial",
            label="partial fine-tune",
            paper="partial_finetune",
            starts_from="standard",
            trains="g",
            kind="ce",
        ),
        Method(
            name="full", label="full fine-tune", paper="full_finetune", starts_from="standard", trains="f+g", kind="ce"
        ),
        Method(name="at_stage1", label="AT@stage-1", paper="at_stage1", starts_from="robust", trains="f+g", kind="ce"),
        Method(
            name="at_stage2", label="AT@stage-2", paper="at_stage2", starts_from="standard", trains="f+g", kind="at"
        ),
        Method(
            name="at_stage12", label="AT@stage-1&2", paper="at_stage12", starts_from="robust", trains="f+g", kind="at"
        ),
        Method(
            name="kd_stage2", label="KD@stage-2", paper="kd_stage2", starts_from="standard", trains="f+g", kind="kd"
        ),
        Method(name="dm_stage2", label="DM@stage-2", paper=None, starts_from="standard", trains="f+g", kind="dm"),
        Method(
            name="dm_stage12", label="DM@stage-1&2", paper="dm_stage12", starts_from="robust", trains="f+g", kind="dm"
        ),
        # Zhang et al. 2019, beside DM; the paper has no number for it
        Method(
            name="trades_stage2",
            label="TRADES@stage-2",
            paper=None,
            starts_from="standard",
            trains="f+g",
            kind="trades",
        ),
    ]
}
TABLE1 = ("scratch", "partial", "full")
TABLE1_ATTACK = "pgd10_linf_0.5"  # the paper's attack of Tables 1, 3, 4 and 5: PGD-10 at 0.5/255
# the strong evaluation at the same eps (study.attacks.members: the worst case of PGD-10,
# PGD-50 with restarts and AutoAttack): what chooses DM's λ on validation, and what the
# defense claim rests on where a job runs it
STRONG_ATTACK = "strong_linf_0.5"
# Table 2's other attacks (AutoAttack's column among them), and the paper's names of the
# source datasets of Table 4
TABLE2_ATTACKS = ("pgd10_linf_2.0", "fgsm_linf_0.5", "fgsm_linf_2.0", "autoattack_linf_0.5")
SOURCE_ALIAS = {"animals10": "imagenet10animals", "imagenet10animals": "imagenet10animals", "cifar10": "cifar10"}
TABLE5 = ("full", "at_stage1", "at_stage2", "at_stage12", "kd_stage2", "dm_stage12", "trades_stage2")
RIVALS = ("at_stage1", "at_stage2", "at_stage12", "kd_stage2")  # claim 5's: the defenses the paper compares DM with
OTHER_RIVALS = ("dm_stage2", "trades_stage2")  # compared with DM on a line of their own: not in the paper
DEFAULT_LAMBDA = 500.0
# DM "guarantees" AOI (the paper): its λ is chosen among those whose validation accuracy,
# and claim 5 holds DM to a test AOI, at most this many points below the full fine-tune's
AOI_MARGIN = 5.0


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]
