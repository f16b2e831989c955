"""How much evidence a verdict needs: from a pilot run's per-image results, the seeds and
test images at which a claim's interval excludes zero at the pilot's effect with 80 %
probability (``study plan JOB --evidence OUT``), and what that costs by the plan's cost
model.

For claims 1 and 2 (a DR gap between two methods of a unit) the pilot gives, per unit:
the effect (the mean of its seeds' effects), the image noise of one seed's effect and of
the seeds' mean (the paired bootstrap, as the claims draw it), which separate into a part
the seeds share (they are tested on the same images) and a part of their own, and the
spread between training runs (the seeds' effects vary more than their own image noise
explains). The interval of ``study.stats.paired_effect`` at S seeds and n images is then
drawn many times from a normal model with those variances, and its power is the share of
draws that exclude zero in the effect's direction. A pilot of one seed cannot see the
spread between training runs; its answer assumes none and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from study import claims, stats
from study.methods import METHODS, RIVALS, TABLE1_ATTACK

POWER = 0.8
MAX_SEEDS = 20
DRAWS = 4000


@dataclass(frozen=True)
class Pilot:
    """What a pilot says of one claim's effect in one unit (variances in DR points², image
    variances per image: divided by n at n images)."""

    effect: float
    seeds: int
    images: int
    shared: float  # image noise the seeds share, × images
    own: float  # image noise each seed has of its own, × images
    between: float  # the spread between training runs (variance)


def pilot_of(reps: list[dict], effect, seed: int = 0) -> Pilot:
    """The variances of ``effect`` (study.claims' effect functions) over a pilot's seeds."""
    n, points, draws = stats.seed_effects(reps, effect, seed)
    s = len(reps)
    if s > 1:
        shared, own = (v * n for v in stats.image_noise(draws))
    else:
        shared, own = float(np.nanvar(draws[0], ddof=1)) * n, 0.0  # one seed: no way to split them
    between = max(0.0, float(np.var(points, ddof=1)) - own / n) if s > 1 else 0.0
    return Pilot(float(np.nanmean(points)), s, n, shared, own, between)


def planned(p: Pilot, at: str = "lower") -> float:
    """The effect a plan aims at: the pilot's point estimate (``at="point"``, optimistic),
    or by default its lower plausible value, one standard error of the pilot's own estimate
    nearer zero (0 where that crosses zero: the pilot cannot tell it from none)."""
    if at == "point":
        return p.effect
    se = np.sqrt(p.shared / p.images + (p.between + p.own / p.images) / p.seeds)
    return float(np.sign(p.effect) * max(0.0, abs(p.effect) - se))


def power(p: Pilot, seeds: int, images: int, draws: int = DRAWS, seed: int = 0, effect: float | None = None) -> float:
    """The share of intervals (``study.stats.combine``'s rule) at ``seeds`` × ``images``
    that exclude zero on the side of the effect (``effect``, default the pilot's), if the
    pilot's variances are the truth."""
    rng = np.random.default_rng([seed, seeds, images])
    z = rng.standard_normal((draws, seeds))
    common = rng.standard_normal((draws, 1))
    size = abs(p.effect if effect is None else effect)
    theta = (size + np.sqrt(p.between) * z + np.sqrt(p.own / images) * rng.standard_normal((draws, seeds))) + np.sqrt(
        p.shared / images
    ) * common
    half = np.sqrt(stats.Z**2 * p.shared / images + stats.t_factor(seeds) ** 2 * theta.var(axis=1, ddof=1) / seeds)
    return float(np.mean(theta.mean(axis=1) - half > 0))


def needed(p: Pilot, max_images: int, cost=None, effect: float | None = None) -> tuple[int, int] | None:
    """The cheapest (seeds, images) with ``power`` >= POWER, seeds 2..MAX_SEEDS and images
    up to ``max_images``; ``cost(seeds, images)`` ranks them (default: fewest seeds, then
    fewest images: a training run costs more than attacking images). None: not reachable."""
    cost = cost or (lambda s, n: (s, n))
    best = None
    for s in range(2, MAX_SEEDS + 1):
        if power(p, s, max_images, effect=effect) < POWER:
            continue
        lo, hi = 1, max_images  # the fewest images that reach it at s seeds
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if power(p, s, mid, effect=effect) >= POWER else (mid + 1, hi)
        if best is None or cost(s, lo) < cost(*best):
            best = (s, lo)
    return best


def pilots(df: pd.DataFrame, masks: dict) -> list[tuple[str, dict, str, Pilot]]:
    """(claim, unit, its label, Pilot) for every unit of a run with per-image results: claims
    1 and 2 on Table 1's attack (DR, and claim 2's AOI), claim 5 (DM's AAI against its
    closest rival, the comparison that binds, under the strongest evaluation the run has)
    and the corruption finding (relative corruption error)."""
    every = claims.units(df[df.attack == TABLE1_ATTACK]) if len(df) else []
    out = []
    for _, claim, a, b, what, effect in claims.PAIR_CLAIMS:
        for unit in claims.once(df, every, (a, b)):
            reps = claims.replicates_of(df, masks, unit, {a: a, b: b})
            if reps:
                out.append((f"{claim} ({what})", unit, claims.label(unit, every), pilot_of(reps, effect)))
    for unit in claims.once(df, every, ("dm_stage12", *RIVALS)):
        rivals = [m for m in RIVALS if len(claims.picks(df, unit, m, TABLE1_ATTACK))]
        if rivals and len(claims.picks(df, unit, "dm_stage12", TABLE1_ATTACK)):
            attack, reps = claims.strongest(df, masks, unit, {"dm": "dm_stage12", **{m: m for m in rivals}})
            if reps:
                found = {m: pilot_of(reps, claims.rate_gap("dm", m, 1)) for m in rivals}
                m = min(found, key=lambda k: found[k].effect)
                what = f"AAI DM@stage-1&2 − {METHODS[m].label}, the closest rival, under {attack}"
                out.append((f"{claims.DM_CLAIM} ({what})", unit, claims.label(unit, every), found[m]))
    item = claims.corruption_item(df)
    for unit in claims.once(df, every, ("scratch", "full")) if item else []:
        reps = claims.models_by_seed(df, masks, {m: (unit, m) for m in ("scratch", "full")}, item, claims.corrupted)
        if reps:
            effect = claims.relative_error_gap("full", "scratch")
            what = "relative corruption error full − standard"
            out.append((f"{claims.CORRUPTION_CLAIM} ({what})", unit, claims.label(unit, every), pilot_of(reps, effect)))
    return out


def lines(found: list[tuple[str, dict, str, Pilot]], max_images, hours=None, at: str = "lower") -> list[str]:
    """What each claim and unit needs, as lines: the pilot, then the counts and their price.
    ``max_images(unit)``: the most test images its dataset has; ``hours(unit, seeds,
    images)``: device-hours of the job at those counts (None: unknown), also what ranks
    the candidates (else the fewest seeds, then images). ``at``: ``planned``'s."""
    out = []
    for claim, unit, name, p in found:
        cap = max_images(unit)
        cost = None
        if hours is not None and hours(unit, 2, p.images) is not None:
            cost = lambda s, n, unit=unit: hours(unit, s, n)  # noqa: E731
        spread = f"spread between runs sd {np.sqrt(p.between):.1f}" if p.seeds > 1 else "spread between runs unknown"
        head = (
            f"{claim}, {name}: pilot {p.effect:+.1f} points over {p.seeds} seed{'s' if p.seeds > 1 else ''} × "
            f"{p.images} images ({spread})"
        )
        aim = planned(p, at)
        where = "its point estimate" if at == "point" else "its lower plausible value (one pilot se nearer 0)"
        head += f"; planned at {aim:+.1f}, {where}"
        got = needed(p, cap, cost, effect=aim) if aim == aim and aim != 0 else None
        if got is None:
            why = "the pilot cannot tell it from no effect: `--at point` plans at its estimate" if aim == 0 else ""
            out.append(
                f"{head}: not reachable within {MAX_SEEDS} seeds and {cap} images" + (f" ({why})" if why else "")
            )
            continue
        s, n = got
        price = hours(unit, s, n) if hours else None
        out.append(
            f"{head}: {int(POWER * 100)} % power at {s} seeds × {n} test images"
            + (" (to exclude zero below it: against the paper)" if p.effect < 0 else "")
            + (f" → {price:,.3g} device-hours for the job" if price is not None else "")
            + ("" if p.seeds > 1 else " (assuming no spread between training runs: run a pilot of 2+ seeds)")
        )
    return out
