"""The corruption findings: the full fine-tune against the standard model on relative
corruption error, and the architectures against ResNet-50 (Otani & Yamada)."""

from __future__ import annotations

import pandas as pd

from study import stats
from study.claims.units import (
    _items_of,
    _unit_fields,
    corrupted,
    corruption_item,
    models_by_seed,
    once,
    rate_gap,
    relative_error_gap,
)
from study.claims.verdicts import _judge

CORRUPTION_CLAIM = (
    "Fine-tuned models are less robust to common corruptions than standard ones: the full fine-tune's "
    "relative corruption error (above its clean error) is higher (not in the paper: Hendrycks & Dietterich's "
    "corruptions, the study's second question)."
)
# Otani & Yamada (2022): the architecture, not robust ImageNet training, carries corruption
# robustness into downstream tasks; the CNN they compare with is ResNet-50
ARCH_REFERENCE = "resnet50"
ARCH_CONTENDERS = ("vit_b_16", "swin_t", "convnext_tiny")
ARCH_CLAIM = (
    "Under full fine-tuning, ViT-B/16, Swin-T and ConvNeXt-T lose less accuracy to common corruptions "
    "than ResNet-50 (Otani & Yamada 2022: the architecture matters more than robust pre-training)."
)


def _corruption_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """The full fine-tune's relative corruption error minus the standard model's, per unit:
    each image's clean correctness minus its share of the corruption items it is right
    under (error above clean error: the fine-tune's other clean accuracy stays out of it,
    as in Hendrycks & Dietterich's relative mCE), paired over the images and seeds; the
    absolute error's gap beside it, and which corruption items the mean covers."""
    item = corruption_item(df)
    per = []
    for unit in once(df, every, ("scratch", "full")) if item else []:
        reps = models_by_seed(df, masks, {m: (unit, m) for m in ("scratch", "full")}, item, corrupted)
        if reps:
            effect = stats.paired_effect(reps, relative_error_gap("full", "scratch"))
            absolute = stats.paired_effect(reps, rate_gap("scratch", "full", 1))
            covered = _items_of(df, masks, unit)
            also = (
                f"; absolute error full − standard {absolute['effect']:+.1f} [{absolute['lo']:+.1f}, "
                f"{absolute['hi']:+.1f}]; mean over {len(covered)} corruption items ({', '.join(covered)})"
            )
            per.append(
                {
                    **_unit_fields(unit, every),
                    "what": "relative corruption error full − standard",
                    **effect,
                    "also": also,
                }
            )
    missing = (
        "needs eval.corruptions on a standard model and a full fine-tune of one unit"
        if item
        else "the job evaluates no corruptions (eval.corruptions)"
    )
    return {"id": "corruption", **_judge(CORRUPTION_CLAIM, per, missing)}


def _architecture_claim(df: pd.DataFrame, masks: dict, every: list[dict]) -> dict:
    """Per target (job, dataset, source data) with full fine-tunes of ResNet-50 and of a
    contender: ResNet-50's relative corruption error minus the contender's, paired over
    the images and seeds; one line per contender."""
    item = corruption_item(df)
    groups: dict = {}
    for u in every:
        groups.setdefault((u["job"], u["dataset"], u["source_data"]), {})[u["backbone"]] = u
    per = []
    for by_backbone in groups.values() if item else []:
        ref = by_backbone.get(ARCH_REFERENCE)
        for b in ARCH_CONTENDERS:
            if ref is None or b not in by_backbone:
                continue
            wanted = {ARCH_REFERENCE: (ref, "full"), b: (by_backbone[b], "full")}
            reps = models_by_seed(df, masks, wanted, item, corrupted)
            if reps:
                what = f"relative corruption error {ARCH_REFERENCE} − {b}"
                per.append(
                    {
                        **_unit_fields({**by_backbone[b], "backbone": b}, every),
                        "what": what,
                        **stats.paired_effect(reps, relative_error_gap(ARCH_REFERENCE, b)),
                    }
                )
    missing = (
        f"needs eval.corruptions on full fine-tunes of {ARCH_REFERENCE} and of one of "
        f"{', '.join(ARCH_CONTENDERS)} on one target (jobs/architectures.yaml)"
    )
    return {"id": "corruption-architecture", **_judge(ARCH_CLAIM, per, missing)}
