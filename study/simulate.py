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
    return models_for(rng, seeds, images, {"full": base + gap, "scratch": base}, spread, aoi, shared)


def models_for(
    rng: np.random.Generator,
    seeds: int,
    images: int,
    dr: dict,
    spread: float,
    aoi: float | dict = 0.8,
    shared: float = 0.5,
    tail: float | None = None,
    clean_jitter: float = 0.0,
) -> list[dict]:
    """Per seed, method -> (correct, robust) over the same ``images``: method's mean DR
    ``dr[method]``, its AOI ``aoi`` (one for all, or per method). Each training run's DR
    draws its spread from a normal of sd ``spread``, or with ``tail`` from Student's t on
    that many degrees of freedom scaled to sd ``spread`` (heavy-tailed: the odd run far
    off). An image is right where its difficulty, shared by every model and seed, is below
    the AOI; ``clean_jitter`` (0-1) redraws that share of each model's difficulties of its
    own, so the clean masks of seeds and methods differ."""
    difficulty, w = rng.random(images), rng.random(images)
    out = []
    for _ in range(seeds):
        one = {}
        for method, mean in dr.items():
            a = aoi[method] if isinstance(aoi, dict) else aoi
            d = np.where(rng.random(images) < clean_jitter, rng.random(images), difficulty)
            correct = d < a
            z = rng.standard_normal() if tail is None else rng.standard_t(tail) / np.sqrt(tail / (tail - 2))
            rate = float(np.clip(mean + spread * z, 0.0, 100.0)) / 100.0
            v = np.where(rng.random(images) < shared, w, rng.random(images))
            one[method] = (correct, correct & (v >= rate))
        out.append(one)
    return out


def corrupted_models(rng: np.random.Generator, per_seed: list[dict], error: dict, items: int = 3) -> list[dict]:
    """The same models under ``items`` corruptions, each losing ``error[method]`` points of
    accuracy in expectation (its relative corruption error): an image it gets right breaks
    with probability error / its clean accuracy."""
    out = []
    for models in per_seed:
        out.append(
            {
                m: [c & (rng.random(len(c)) >= error[m] / (100.0 * max(c.mean(), 1e-9))) for _ in range(items)]
                for m, (c, _) in models.items()
                if m in error
            }
        )
    return out


def study(
    per_seed: list[dict], attacks=(TABLE1_ATTACK,), corrupted: list[dict] | None = None, flags: dict | None = None
) -> tuple[pd.DataFrame, dict]:
    """The results frame and per-image masks of one simulated study (``models_for``): one
    chosen model per method and seed in one unit, attacked with each of ``attacks`` (the
    same masks), and, with ``corrupted`` (``corrupted_models``), evaluated under its
    corruption items. ``flags``: method -> the sanity flags its rows carry ('ok')."""
    rows, masks = [], {}
    items = [f"corruption_fog_{k + 1}" for k in range(len(next(iter(corrupted[0].values()))))] if corrupted else []
    for seed, models in enumerate(per_seed):
        for method, (c, r) in models.items():
            stage = f"{method}-{seed}"
            masks[stage] = {}
            runs = [(a, c, r) for a in attacks]
            if corrupted and method in corrupted[seed]:
                runs += [(name, c, rr) for name, rr in zip(items, corrupted[seed][method])]
            for attack, cc, rr in runs:
                aoi, aai = 100.0 * cc.mean(), 100.0 * rr.mean()
                rows.append(
                    {
                        **UNIT,
                        "source_data": "" if method == "scratch" else UNIT["source_data"],
                        "source": "" if method == "scratch" else "standard",
                        "method": method,
                        "seed": seed,
                        "lam": np.nan,
                        "selected": True,
                        "chosen": True,
                        "attack": attack,
                        "images": len(cc),
                        "AOI": aoi,
                        "AAI": aai,
                        "DR": 100.0 * (aoi - aai) / aoi if aoi else np.nan,
                        "flags": (flags or {}).get(method, "ok"),
                        "stage": stage,
                    }
                )
                masks[stage][attack] = {"correct": _bits(cc), "robust": _bits(rr)}
    return pd.DataFrame(rows), masks
