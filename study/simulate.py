"""Simulated studies with a known truth: the results frame and per-image masks that
``study.claims.judge`` reads, for a full fine-tune and a standard model on the same test
images over several training runs. What the calibration (benchmarks/calibration.py) and
the evidence planner (``study.evidence``) run the claims' statistics on.

Each training run's DR is its method's mean plus a normal draw of sd ``spread`` points
(the spread between training runs); the test images are shared by every model and seed,
as in the study. The models agree on which images they get right (AOI ``aoi`` for all),
and an image a model gets right breaks under the attack when its vulnerability, uniform
on [0, 1], is below the run's DR / 100; with probability ``shared`` that vulnerability is
the image's own (the same for every model and seed: some images are easy to break for
all), otherwise the model's own draw. Marginally every vulnerability is uniform, so the
expected DR of a run over the image population is its DR exactly, and the true gap of
the claim is ``gap``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.methods import TABLE1_ATTACK

UNIT = {"job": "sim", "dataset": "target", "backbone": "resnet18", "source_data": "source"}


def _bits(a: np.ndarray) -> str:
    return "".join(np.where(a, "1", "0"))  # as study.evaluate.mask_bits writes them


def masks_for(
    rng: np.random.Generator,
    seeds: int,
    images: int,
    gap: float,
    spread: float,
    base: float = 30.0,
    aoi: float = 0.8,
    shared: float = 0.5,
) -> list[dict]:
    """Per seed, method -> (correct, robust) boolean arrays over the same ``images``
    (full's mean DR is ``base + gap``, the standard model's ``base``)."""
    u, w = rng.random(images), rng.random(images)
    correct = u < aoi
    out = []
    for _ in range(seeds):
        one = {}
        for method, mean in (("full", base + gap), ("scratch", base)):
            dr = float(np.clip(mean + spread * rng.standard_normal(), 0.0, 100.0)) / 100.0
            v = np.where(rng.random(images) < shared, w, rng.random(images))
            one[method] = (correct.copy(), correct & (v >= dr))
        out.append(one)
    return out


def study(per_seed: list[dict]) -> tuple[pd.DataFrame, dict]:
    """The results frame and per-image masks of one simulated study (``masks_for``): one
    chosen model per method and seed in one unit, attacked with Table 1's attack."""
    rows, masks = [], {}
    for seed, models in enumerate(per_seed):
        for method, (c, r) in models.items():
            stage = f"{method}-{seed}"
            aoi, aai = 100.0 * c.mean(), 100.0 * r.mean()
            rows.append(
                {
                    **UNIT,
                    "source_data": "" if method == "scratch" else UNIT["source_data"],
                    "method": method,
                    "seed": seed,
                    "lam": np.nan,
                    "selected": True,
                    "chosen": True,
                    "attack": TABLE1_ATTACK,
                    "images": len(c),
                    "AOI": aoi,
                    "AAI": aai,
                    "DR": 100.0 * (aoi - aai) / aoi if aoi else np.nan,
                    "stage": stage,
                }
            )
            masks[stage] = {TABLE1_ATTACK: {"correct": _bits(c), "robust": _bits(r)}}
    return pd.DataFrame(rows), masks
