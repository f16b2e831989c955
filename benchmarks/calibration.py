"""Are the verdicts safe and decisive? Simulated studies with a known truth
(study.simulate) judged end to end by the function that judges every run
(study.claims.judge): claim 1 on DR and AAI, claim 2 (DR), claim 5 (DM against four equal
or weaker rivals, under the strong evaluation) and the corruption finding (relative
error), in one study each time.

The harder simulator: every method its own AOI and per-seed clean masks that differ
(a share of each model's image difficulties its own), image vulnerability shared by all
models and seeds weakly (0.2) or strongly (0.8), a training spread that is none, normal
(sd 3 DR points) or heavy-tailed (Student's t on 3 degrees of freedom, sd 6); 300 or 1000
test images; 1, 2, 3, 5 and 10 seeds. Each cell runs a null study (no effect anywhere,
equal AOIs) and an effect study (8 points in the paper's direction for every finding).

    uv run python benchmarks/calibration.py [--studies 100] [--workers 2] [--quick]
        [--scenario I ...] [--seeds S ...]      (some cells again, with more studies)

Prints per cell and finding: coverage of the truth (both studies), "agree" when there is
no effect (false agree), "disagree" when the paper's direction holds or nothing does
(false disagree), and power ("agree" at the 8-point effect). Exits 1 when a cell of two or
more seeds misses coverage >= 0.93 or false agree <= 0.05, when power at 8 points, no
spread and 300 images is below 0.40 at 3 seeds or 0.85 at 5 (claim 1's DR), or when a
one-seed cell says "agree" at all (one training run says suggests / contradicts).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from study import claims, simulate
from study.methods import RIVALS, STRONG_ATTACK, TABLE1_ATTACK

SEEDS = (1, 2, 3, 5, 10)
SCENARIOS = (  # (name, images, spread, heavy tail, shared)
    ("300 img, no spread, weak sharing", 300, 0.0, None, 0.2),
    ("300 img, no spread, strong sharing", 300, 0.0, None, 0.8),
    ("300 img, heavy-tailed spread 6, strong sharing", 300, 6.0, 3.0, 0.8),
    ("1000 img, normal spread 3, weak sharing", 1000, 3.0, None, 0.2),
)
FINDINGS = ("1-dr", f"1-aai:{TABLE1_ATTACK}", "2-dr", "5", "corruption")
GAP, BASE = 8.0, 30.0
MIN_COVERAGE, MAX_FALSE_AGREE = 0.93, 0.05
MIN_POWER = {3: 0.40, 5: 0.85}  # claim 1's DR at 8 points, no spread, 300 images


def design(effect: bool) -> tuple[dict, dict, dict, dict]:
    """(DR per method, AOI per method, relative corruption error, the truth per finding)."""
    g = GAP if effect else 0.0
    aoi = {"scratch": 0.82, "full": 0.78, "partial": 0.74} if effect else {"scratch": 0.8, "full": 0.8, "partial": 0.8}
    aoi |= {"dm_stage12": aoi["full"], **{m: aoi["full"] for m in RIVALS}}
    rival_aai = aoi["full"] * (1 - BASE / 100)
    dr = {"scratch": BASE, "full": BASE + g, "partial": BASE + 2 * g, **{m: BASE for m in RIVALS}}
    dr["dm_stage12"] = 100 * (1 - (rival_aai + g / 100) / aoi["dm_stage12"])  # g AAI points above each rival
    truth = {
        "1-dr": g,
        f"1-aai:{TABLE1_ATTACK}": 100
        * (aoi["scratch"] * (1 - dr["scratch"] / 100) - aoi["full"] * (1 - dr["full"] / 100)),
        "2-dr": g,
        "5": g,
        "corruption": g,
    }
    return dr, aoi, {"scratch": 20.0, "full": 20.0 + g}, truth


def one_study(args) -> dict:
    """finding -> (lo, hi, verdict) of one simulated study."""
    seed, seeds, images, spread, tail, shared, effect = args
    rng = np.random.default_rng(seed)
    dr, aoi, error, _ = design(effect)
    per_seed = simulate.models_for(rng, seeds, images, dr, spread, aoi, shared, tail=tail, clean_jitter=0.3)
    corrupted = simulate.corrupted_models(rng, per_seed, error)
    df, masks = simulate.study(per_seed, attacks=(TABLE1_ATTACK, STRONG_ATTACK), corrupted=corrupted)
    judged = claims.judge(df, {}, masks)
    out = {}
    for cid in FINDINGS:
        d = claims.by_id(judged, cid)["datasets"][0]
        out[cid] = (d["lo"], d["hi"], d["verdict"])
    return out


def cell(seeds: int, scenario: tuple, studies: int, pool=None, seed: int = 0) -> list[dict]:
    """One row per finding: coverage, false agree, false disagree and power of one cell."""
    name, images, spread, tail, shared = scenario
    jobs = [
        ([seed, seeds, images, int(spread * 10), int(shared * 10), e, k], seeds, images, spread, tail, shared, e)
        for e in (False, True)
        for k in range(studies)
    ]
    got = list(pool.map(one_study, jobs, chunksize=4)) if pool is not None else [one_study(j) for j in jobs]
    rows = []
    for cid in FINDINGS:
        tally = {"covered": 0, "false_agree": 0, "false_disagree": 0, "power": 0, "said_agree": 0}
        for job, res in zip(jobs, got):
            lo, hi, verdict = res[cid]
            truth = design(job[-1])[3][cid]
            tally["covered"] += lo <= truth <= hi
            tally["false_agree"] += truth == 0 and verdict == "agree"
            tally["false_disagree"] += verdict == "disagree"
            tally["power"] += job[-1] and verdict == "agree"
            tally["said_agree"] += verdict == "agree"
        rows.append(
            {
                "scenario": name,
                "seeds": seeds,
                "finding": cid,
                # claim 5's headline is DM against its closest rival, chosen after the fact: its
                # verdict rests on one Holm-corrected interval per rival, so no one interval to cover
                "coverage": None if cid == "5" else tally["covered"] / len(jobs),
                "false_agree": tally["false_agree"] / studies,
                "false_disagree": tally["false_disagree"] / len(jobs),
                "power": tally["power"] / studies,
                "said_agree": tally["said_agree"],
                "studies": studies,
            }
        )
    return rows


def failures(rows: list[dict]) -> list[str]:
    bad = []
    for r in rows:
        where = f"{r['scenario']}, {r['seeds']} seeds, {r['finding']}"
        if r["seeds"] == 1 and r["said_agree"]:
            bad.append(f"{where}: one seed said agree {r['said_agree']} times")
        low = r["coverage"] is not None and r["coverage"] < MIN_COVERAGE
        if r["seeds"] >= 2 and (low or r["false_agree"] > MAX_FALSE_AGREE):
            bad.append(f"{where}: coverage {r['coverage']}, false agree {r['false_agree']:.3f}")
        need = MIN_POWER.get(r["seeds"])
        if need and r["finding"] == "1-dr" and r["scenario"] == SCENARIOS[0][0] and r["power"] < need:
            bad.append(f"{where}: power {r['power']:.2f} < {need}")
    return bad


def table(rows: list[dict]) -> str:
    lines = [
        "| scenario | seeds | finding | coverage | false agree | false disagree | power |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['seeds']} | {r['finding']} | "
            f"{'—' if r['coverage'] is None else format(r['coverage'], '.3f')} | {r['false_agree']:.3f} | "
            f"{r['false_disagree']:.3f} | {r['power']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=100, help="simulated studies per cell, each null and effect")
    ap.add_argument("--workers", type=int, default=2, help="processes")
    ap.add_argument("--quick", action="store_true", help="the first scenario only")
    ap.add_argument("--scenario", type=int, action="append", help="only these scenarios (0-3), to check cells again")
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="only these seed counts")
    args = ap.parse_args()
    from tqdm.auto import tqdm

    scenarios = SCENARIOS[:1] if args.quick else SCENARIOS
    scenarios = [SCENARIOS[i] for i in args.scenario] if args.scenario else scenarios
    grid = [(s, sc) for sc in scenarios for s in args.seeds]
    start, rows = time.monotonic(), []
    with ProcessPoolExecutor(args.workers) as pool:
        for s, sc in tqdm(grid, desc="cells", file=sys.stderr):
            rows += cell(s, sc, args.studies, pool)
    print(
        f"{args.studies} null and {args.studies} effect studies per cell (effect: {GAP:g} points in the paper's "
        f"direction), judged by study.claims.judge; 95 % intervals; {time.monotonic() - start:.0f} s\n"
    )
    print(table(rows))
    bad = failures(rows)
    print(
        f"\nbounds: coverage >= {MIN_COVERAGE} and false agree <= {MAX_FALSE_AGREE} at 2+ seeds; power at 3 / 5 "
        f"seeds >= {MIN_POWER[3]} / {MIN_POWER[5]}; one seed never agrees: "
        + ("every cell within" if not bad else f"{len(bad)} outside:\n  " + "\n  ".join(bad))
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
