"""The claims' intervals hold over training runs: a small version of
benchmarks/calibration.py on its hardest cells (few seeds, large training spread, where
an interval over test images alone covered the truth 75 % of the time)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import calibration  # noqa: E402

from study import claims, simulate, stats  # noqa: E402

STUDIES = 20  # null and effect studies per cell: 40 intervals a finding
# The simulation's own noise (binomial): with 40 intervals a true coverage of 0.95 reads
# below 0.85 with probability 0.01; with 20 null studies a true false-agree rate of 0.05
# reads above 0.2 with probability 0.016. The benchmark's 100 studies hold the bounds.
MARGIN_COVERAGE, MARGIN_FALSE_AGREE = 0.08, 0.15


@pytest.mark.parametrize("seeds", [2, 3])
def test_verdicts_cover_the_truth_and_rarely_agree_without_an_effect(seeds):
    """The benchmark's hardest scenario (a heavy-tailed training spread, strong sharing of
    the images' vulnerability, methods of different AOI): claim 1 (DR, AAI), claim 2, claim
    5 and the corruption finding, judged end to end."""
    rows = calibration.cell(seeds, calibration.SCENARIOS[2], STUDIES, seed=1)
    for r in rows:
        if r["coverage"] is not None:
            assert r["coverage"] >= calibration.MIN_COVERAGE - MARGIN_COVERAGE, r
        assert r["false_agree"] <= calibration.MAX_FALSE_AGREE + MARGIN_FALSE_AGREE, r


def test_one_seed_never_says_agree_in_the_benchmark():
    rows = calibration.cell(1, calibration.SCENARIOS[0], 10, seed=2)
    assert all(r["said_agree"] == 0 for r in rows) and all(r["power"] == 0 for r in rows)
    assert not [b for b in calibration.failures(rows) if "one seed" in b]


def test_one_seed_says_its_interval_covers_test_images_only():
    df, masks = simulate.study(simulate.masks_for(np.random.default_rng(0), 1, 200, 8.0, 0.0))
    claim = claims.by_id(claims.judge(df, {}, masks), "1-dr")
    assert claim["covers"] == stats.COVERS_IMAGES and claims.qualifier(claim) == "one training run"
    assert "one training run: the interval covers test images only" in claim["detail"]
    df, masks = simulate.study(simulate.masks_for(np.random.default_rng(0), 3, 200, 8.0, 0.0))
    claim = claims.by_id(claims.judge(df, {}, masks), "1-dr")
    assert claim["covers"] == stats.COVERS_RUNS and claims.qualifier(claim) == ""
    assert claim["datasets"][0]["df"] == 2


def test_seeds_with_different_numbers_of_images_share_the_first_ones():
    """An attack limited per seed, or a resumed run: the interval rests on the images every
    seed has (the first n), not an IndexError."""
    reps = simulate.masks_for(np.random.default_rng(0), 3, 120, 8.0, 3.0)
    reps[1] = {k: (c[:90], r[:90]) for k, (c, r) in reps[1].items()}

    def gap(models, idx):
        return stats.dr(*[a[idx] for a in models["full"]]) - stats.dr(*[a[idx] for a in models["scratch"]])

    got = stats.paired_effect(reps, gap)
    cut = stats.paired_effect([{k: (c[:90], r[:90]) for k, (c, r) in rep.items()} for rep in reps], gap)
    assert got["images"] == 90 and got == cut


def test_the_evidence_a_verdict_needs_is_what_a_new_study_of_that_size_gets():
    """A large pilot (20 seeds × 2000 images, a true gap of 8 DR points): the seeds and
    images study.evidence names give an 80 % chance of "agree"; 100 new simulated studies of
    that size, judged by study.claims.judge, agree 70-90 % of the time (the 100 studies'
    own noise is ±4 points, the pilot's estimate of the gap ±0.3)."""
    from study import evidence

    rng = np.random.default_rng(0)
    df, masks = simulate.study(simulate.masks_for(rng, 20, 2000, 8.0, 0.0))
    [(_, _, _, pilot)] = evidence.pilots(df, masks)
    assert pilot.seeds == 20 and pilot.images == 2000 and abs(pilot.effect - 8.0) < 1.0
    seeds, images = evidence.needed(pilot, 3000)  # the fewest seeds that reach it on at most 3000 images
    assert 2 <= seeds <= 5 and 200 <= images <= 3000
    assert abs(evidence.power(pilot, seeds, images) - evidence.POWER) < 0.05

    def verdict() -> str:
        df, masks = simulate.study(simulate.masks_for(rng, seeds, images, 8.0, 0.0))
        return claims.by_id(claims.judge(df, {}, masks), "1-dr")["datasets"][0]["verdict"]

    agree = sum(verdict() == "agree" for _ in range(100))
    assert 70 <= agree <= 90, (seeds, images, agree)
    tiny = evidence.Pilot(effect=0.2, seeds=3, images=300, shared=100.0, own=4000.0, between=36.0)
    assert evidence.needed(tiny, 10000) is None  # too small beside the spread between runs


def test_study_plan_evidence_prints_the_counts_and_their_cost(tmp_path, capsys):
    import json

    import yaml

    from study import cli

    pilot = tmp_path / "pilot"
    pilot.mkdir()
    df, masks = simulate.study(simulate.masks_for(np.random.default_rng(1), 3, 300, 20.0, 2.0))
    df.to_csv(pilot / "results.csv", index=False)
    (pilot / "per_image.json").write_text(json.dumps(masks))
    from conftest import SIM_JOB

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(SIM_JOB))
    costs = tmp_path / "costs.json"
    costs.write_text(
        json.dumps({"device": "cpu", "costs": {"resnet18@32": {"train": 1e-3, "attack": 5e-4, "infer": 2e-4}}})
    )
    argv = ["plan", str(tmp_path / "job.yaml"), "--costs", str(costs), "--no-measure", "--evidence", str(pilot)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "DR full − standard" in x)
    assert "pilot +" in line and "over 3 seeds × 300 images" in line and "80 % power at" in line
    assert "device-hours for the job" in line and "test images" in line
    assert (
        cli.main(
            ["plan", str(tmp_path / "job.yaml"), "--costs", str(costs), "--no-measure", "--evidence", str(tmp_path)]
        )
        == 2
    )  # no pilot there: one line, exit 2
    assert "no results.csv or per_image.json" in capsys.readouterr().err
