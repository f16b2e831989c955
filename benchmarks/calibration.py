"""Does a claim's 95 % interval cover the truth, and how often does it say "agree" when
there is no effect? Simulated studies (study.simulate: a full fine-tune and a standard
model on the same test images, each training run's DR spread around its method's mean)
judged by the very function that judges the claims (study.claims.judge, claim 1: DR full
− standard), for 2, 3, 5 and 10 seeds × a training spread of 0, 3, 6 and 10 DR points ×
a true gap of 0 and 8 points.

    uv run python benchmarks/calibration.py [--studies 200] [--images 300]

Prints per cell the coverage of the true gap (both gaps together) and the false-agree
rate (gap 0), and exits 1 when a cell misses the bounds (coverage >= 0.93, false agree
<= 0.05).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from study import claims, simulate

SEEDS = (2, 3, 5, 10)
SPREADS = (0.0, 3.0, 6.0, 10.0)
GAPS = (0.0, 8.0)
MIN_COVERAGE, MAX_FALSE_AGREE = 0.93, 0.05


def judged(rng: np.random.Generator, seeds: int, images: int, gap: float, spread: float) -> dict:
    """Claim 1's unit entry (effect, lo, hi, verdict, covers) on one simulated study."""
    df, masks = simulate.study(simulate.masks_for(rng, seeds, images, gap, spread))
    return claims.by_id(claims.judge(df, {}, masks), "1-dr")["datasets"][0]


def cell(seeds: int, spread: float, studies: int, images: int, seed: int = 0, bar=None) -> dict:
    """Coverage (over both gaps) and the false-agree rate (gap 0) of one cell."""
    rng = np.random.default_rng([seed, seeds, int(spread * 10)])
    covered, false_agree = 0, 0
    for gap in GAPS:
        for _ in range(studies):
            d = judged(rng, seeds, images, gap, spread)
            covered += d["lo"] <= gap <= d["hi"]
            false_agree += gap == 0 and d["verdict"] == "agree"
            if bar is not None:
                bar.update(1)
    return {
        "seeds": seeds,
        "spread": spread,
        "coverage": covered / (studies * len(GAPS)),
        "false_agree": false_agree / studies,
        "studies": studies,
    }


def table(cells: list[dict]) -> str:
    lines = [
        '| seeds | training spread (DR points) | coverage of the true gap | "agree" when the gap is 0 |',
        "|---|---|---|---|",
    ]
    for c in cells:
        lines.append(f"| {c['seeds']} | {c['spread']:g} | {c['coverage']:.3f} | {c['false_agree']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=200, help="simulated studies per cell and gap")
    ap.add_argument("--images", type=int, default=300, help="shared test images per study")
    args = ap.parse_args()
    from tqdm.auto import tqdm

    start = time.monotonic()
    grid = [(s, sp) for s in SEEDS for sp in SPREADS]
    with tqdm(total=len(grid) * len(GAPS) * args.studies, desc="simulated studies", file=sys.stderr) as bar:
        cells = []
        for s, sp in grid:
            bar.set_postfix_str(f"{s} seeds, spread {sp:g}")
            cells.append(cell(s, sp, args.studies, args.images, bar=bar))
    print(
        f"{args.studies} studies per cell and gap (true gap 0 and 8 DR points), {args.images} shared test "
        f"images, 95 % intervals of study.claims.judge; {time.monotonic() - start:.0f} s\n"
    )
    print(table(cells))
    bad = [c for c in cells if c["coverage"] < MIN_COVERAGE or c["false_agree"] > MAX_FALSE_AGREE]
    print(
        f"\nbounds: coverage >= {MIN_COVERAGE}, false agree <= {MAX_FALSE_AGREE}: "
        + ("every cell within" if not bad else f"{len(bad)} cell(s) outside")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
