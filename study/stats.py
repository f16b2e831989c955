"""Uncertainty of the study's numbers: intervals over test images and over seeds, the
paired bootstrap of an effect between two models, and Spearman's ρ with a permutation
p-value. Every interval is 95 %.

* One model, one seed: AOI and AAI are proportions of the same images, so Wilson's
  interval (scipy); DR = (AOI − AAI)/AOI is a ratio, so a bootstrap over the images.
* Several seeds: the mean and Student's t interval over the seeds.
* An effect (DR of model a minus DR of model b, ...): a paired bootstrap that draws the
  same test images for both models (they were attacked on the same images), and, with
  several seeds, draws the seeds too, so both sources of chance are in the interval.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000
WIDE = 10.0  # an interval wider than ± this many points says "too few images"


def mask(bits: str) -> np.ndarray:
    """A per-image 0/1 string (study.evaluate) as a bool array."""
    return np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")


def wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's interval of a proportion, in percent."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=LEVEL, method="wilson")
    return 100.0 * ci.low, 100.0 * ci.high


def dr(correct: np.ndarray, robust: np.ndarray, axis=-1) -> np.ndarray:
    """DR in percent from per-image clean and robust correctness (NaN where AOI is 0)."""
    c, r = correct.sum(axis), robust.sum(axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(c > 0, 100.0 * (c - r) / np.maximum(c, 1), np.nan)


def _draws(n: int, seed: int, resamples: int = RESAMPLES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _interval(draws: np.ndarray) -> tuple[float, float]:
    """The central 95 % of bootstrap draws, NaN where every draw is (DR of AOI 0)."""
    draws = draws[~np.isnan(draws)]
    if len(draws) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(draws, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(lo), float(hi)


def dr_interval(correct: np.ndarray, robust: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval of DR over the images."""
    if len(correct) == 0:
        return float("nan"), float("nan")
    idx = _draws(len(correct), seed)
    return _interval(dr(correct[idx], robust[idx]))


def t_factor(n: int) -> float:
    """Student's t of a 95 % interval over ``n`` seeds (12.7 for two)."""
    return float(stats.t.ppf(0.5 + LEVEL / 2, n - 1))


def over_seeds(values) -> tuple[float, float, float]:
    """(mean, lo, hi) of one number over seeds: Student's t interval (none for one seed)."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(t_factor(len(v)) * v.std(ddof=1) / np.sqrt(len(v)))
    return m, m - half, m + half


def paired_effect(replicates: list[dict], effect: Callable[[dict, np.ndarray], np.ndarray], seed: int = 0) -> dict:
    """An effect and its interval. ``replicates``: per seed, the models' per-image arrays
    (name -> (correct, robust)), all over the same n test images; ``effect(models, idx)``
    gives the effect on the images ``idx`` (shape (B, n): one draw a row) as B numbers.
    Each bootstrap draw resamples the images (the same ones for every model and seed)
    and the seeds; the point estimate is the mean effect over seeds on all images."""
    n = len(next(iter(replicates[0].values()))[0])
    whole = np.arange(n)[None, :]
    idx = _draws(n, seed)
    per_seed = np.stack([effect(r, idx) for r in replicates])  # (seeds, B)
    rng = np.random.default_rng(seed + 1)
    pick = rng.integers(0, len(replicates), size=(len(replicates), idx.shape[0]))
    with warnings.catch_warnings():  # where DR is undefined (AOI 0) on every seed, NaN stays
        warnings.simplefilter("ignore", RuntimeWarning)
        point = float(np.nanmean([effect(r, whole)[0] for r in replicates]))
        draws = np.nanmean(np.take_along_axis(per_seed, pick, 0), axis=0)
    lo, hi = _interval(draws)
    return {"effect": point, "lo": lo, "hi": hi, "images": n, "seeds": len(replicates)}


def verdict(lo: float, hi: float) -> str:
    """agree: the interval excludes zero in the paper's direction (effects are written so
    that the paper's is positive); disagree: it excludes zero the other way."""
    if lo > 0:
        return "agree"
    if hi < 0:
        return "disagree"
    return "inconclusive"


def spearman(x, y, seed: int = 0) -> tuple[float, float]:
    """Spearman's ρ and its two-sided permutation p-value (exact for few points)."""
    res = stats.permutation_test(
        (np.asarray(x, float), np.asarray(y, float)),
        lambda a, b: stats.spearmanr(a, b).statistic,
        permutation_type="pairings",
        n_resamples=9999,
        random_state=seed,
    )
    return float(res.statistic), float(res.pvalue)
