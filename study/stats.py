"""Uncertainty of the study's numbers: intervals over test images and over seeds, the
paired bootstrap of an effect between two models, and Spearman's ρ with a permutation
p-value. Every interval is 95 %.

* One model, one seed: AOI and AAI are proportions of the same images, so Wilson's
  interval (scipy); DR = (AOI − AAI)/AOI is a ratio, so a bootstrap over the images.
* Several seeds: the mean and Student's t interval over the seeds.
* An effect (DR of model a minus DR of model b, ...), ``paired_effect``: with one seed, a
  paired bootstrap that draws the same test images for both models (they were attacked
  on the same images); it covers the test images only, not the spread between training
  runs. With S seeds, the mean of the seeds' effects, whose variance has two parts: the
  image noise the seeds share (every seed is tested on the same images), Ĉ, the seeds'
  mean cross-covariance of their bootstrap draws, which no number of seeds averages away;
  and the spread of the seeds' effects s² / S (the training runs' spread plus each seed's
  own image noise). The half-width is √(z² Ĉ + t²(S−1) s² / S): Ĉ is estimated from
  hundreds of images, so it takes the normal z (1.96); s² from S − 1 degrees of freedom,
  so it takes Student's t. (An earlier rule put t(S−1) on both and counted each seed's own
  image noise twice: 12.7 at two seeds on noise known from hundreds of images, which made
  two seeds less decisive than one.) benchmarks/calibration.py simulates its coverage,
  false verdicts and power.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000
WIDE = 10.0  # an interval wider than ± this many points says "too few images" (or seeds)
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))  # 1.96: the image noise is estimated from hundreds of images


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


def over_seeds(values, image_var: float = 0.0) -> tuple[float, float, float]:
    """(mean, lo, hi) of one number over seeds (none for one seed): √(z² · image_var +
    t²(S−1) · s²/S), ``image_var`` the image noise the seeds share (their shared test
    images), as ``combine`` counts it; 0 leaves Student's t interval over the seeds."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    half = float(np.sqrt(Z**2 * image_var + t_factor(len(v)) ** 2 * v.var(ddof=1) / len(v)))
    return m, m - half, m + half


COVERS_IMAGES = "test images"
COVERS_RUNS = "test images and training runs"


def seed_effects(replicates: list[dict], effect, seed: int = 0) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, each seed's effect on its first n images, each seed's effect on the same
    bootstrap draws of those images (seeds × RESAMPLES)): n is the number of images every
    seed has; NaN where the effect is undefined (DR of AOI 0)."""
    n = min(len(c) for r in replicates for c, _ in r.values())
    reps = [{k: (c[:n], r[:n]) for k, (c, r) in rep.items()} for rep in replicates]
    idx = _draws(n, seed)
    with warnings.catch_warnings():  # where DR is undefined (AOI 0), NaN stays
        warnings.simplefilter("ignore", RuntimeWarning)
        points = np.array([effect(r, np.arange(n)[None, :])[0] for r in reps], dtype=float)
        draws = np.stack([effect(r, idx) for r in reps])
    return n, points, draws


def paired_effect(replicates: list[dict], effect: Callable[[dict, np.ndarray], np.ndarray], seed: int = 0) -> dict:
    """An effect and its interval (see the module docstring). ``replicates``: per seed, the
    models' per-image arrays (name -> (correct, robust)) over the same test images, in the
    same order; seeds that saw different numbers of images are cut to the images all of
    them share (the first n). ``effect(models, idx)`` gives the effect on the images
    ``idx`` (shape (B, n): one draw a row) as B numbers. A seed whose effect is undefined
    (DR of AOI 0) is left out. Returns effect, lo, hi, images, seeds, covers, and df."""
    n, points, draws = seed_effects(replicates, effect, seed)
    return {"images": n, **combine(points, draws)}


def combine(points: np.ndarray, draws: np.ndarray) -> dict:
    """The interval of an effect from each seed's value (``points``) and its bootstrap
    draws over images (seeds × draws, the same images drawn for every seed), as
    ``paired_effect`` describes; also for effects that are not per-image masks (SVCCA)."""
    points, draws = np.asarray(points, dtype=float), np.asarray(draws, dtype=float)
    keep = ~np.isnan(points)
    out = {"seeds": int(keep.sum()), "covers": COVERS_IMAGES if keep.sum() < 2 else COVERS_RUNS}
    if not keep.any():
        return {"effect": float("nan"), "lo": float("nan"), "hi": float("nan"), "df": None, **out}
    point = float(points[keep].mean())
    draws = draws[keep]
    if keep.sum() == 1:
        lo, hi = _interval(draws[0])
        d = draws[0][~np.isnan(draws[0])]
        p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))) if len(d) else 1.0
        return {"effect": point, "lo": lo, "hi": hi, "df": None, "p": p, **out}
    s = int(keep.sum())
    shared, _ = image_noise(draws)
    between = float(np.var(points[keep], ddof=1)) / s
    half = _half(shared, between, s)
    return {
        "effect": point,
        "lo": point - half(LEVEL),
        "hi": point + half(LEVEL),
        "df": s - 1,
        "p": _p(point, half),
        **out,
    }


def _half(shared: float, between: float, s: int):
    """level -> the half-width √(z² Ĉ + t²(S−1) s²/S) at that level."""

    def half(level: float) -> float:
        q = 0.5 + level / 2
        return float(np.sqrt(stats.norm.ppf(q) ** 2 * shared + stats.t.ppf(q, s - 1) ** 2 * between))

    return half


def _p(effect: float, half) -> float:
    """The two-sided p-value of zero: 1 − the level whose interval just reaches it."""
    if effect == 0 or not effect == effect:
        return 1.0
    if half(1 - 1e-12) < abs(effect):
        return 1e-12
    from scipy.optimize import brentq

    return float(1 - brentq(lambda level: half(level) - abs(effect), 0.0, 1 - 1e-12, xtol=1e-10))


def image_noise(draws: np.ndarray) -> tuple[float, float]:
    """(the image noise the seeds share, each seed's own) of their mean, as variances, from
    the seeds' bootstrap draws on the same images (seeds × draws): the mean cross-covariance
    Ĉ = V_mean − (mean V_s − V_mean)/(S − 1), clipped at 0, and mean V_s − Ĉ."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ok = ~np.isnan(draws).any(axis=0)
        d = draws[:, ok]
        v_mean = float(np.var(d.mean(axis=0), ddof=1))
        v_each = float(np.mean(np.var(d, axis=1, ddof=1)))
    s = len(d)
    shared = max(0.0, v_mean - (v_each - v_mean) / (s - 1)) if s > 1 else v_each
    return shared, max(0.0, v_each - shared)


def p_value(d: dict) -> float:
    """An effect's two-sided p-value of zero (``combine``'s: the bootstrap's for one seed,
    the level at which its interval over seeds just reaches zero for several)."""
    return float(d.get("p", 1.0))


def holm(pvalues, alpha: float = 1 - LEVEL) -> list[bool]:
    """Holm's step-down: which of the hypotheses are rejected at family-wise ``alpha``."""
    order = np.argsort(pvalues, kind="stable")
    out = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (len(pvalues) - rank):
            break
        out[i] = True
    return out


def verdict(lo: float, hi: float) -> str:
    """agree: the interval excludes zero in the paper's direction (effects are written so
    that the paper's is positive); disagree: it excludes zero the other way."""
    if lo > 0:
        return "agree"
    if hi < 0:
        return "disagree"
    return "inconclusive"


def spearman(x, y, seed: int = 0) -> tuple[float, float]:
    """Spearman's ρ and its two-sided permutation p-value: one side permuted against the
    other, so every one of the n! pairings is tried (exact up to 7 points, Monte Carlo
    with 9999 draws beyond)."""
    y = np.asarray(y, float)
    res = stats.permutation_test(
        (np.asarray(x, float),),
        lambda a: stats.spearmanr(a, y).statistic,
        permutation_type="pairings",
        n_resamples=9999,
        random_state=seed,
    )
    return float(res.statistic), float(res.pvalue)
