"""Verdicts from replicates: seeds replicate every trial, another seed draws anew, and
seeds added to a job reuse the finished replicates (the same job and seed in two fresh
folders give the same numbers: test_safety, where one job runs twice at once)."""

import pytest
import yaml

from study import cli, config

JOB = {
    "name": "replicates",
    "device": "cpu",
    "data": {"workers": 2},
    "datasets": {
        "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
        "alphabet": {"params": {"train_per_class": 4, "test_per_class": 1}},
    },
    "pretrain": {"dataset": "shapes", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
    "finetune": {
        "datasets": ["alphabet"],
        "methods": ["scratch", "full"],
        "max_concurrent_trials": 1,
        "train": {"epochs": 1, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
    },
    "eval": {"batch_size": 64, "attacks": ["pgd10_linf_0.5"]},
    "analyses": {"enabled": False},
}


@pytest.mark.parametrize(
    "seeds,message",
    [
        ([], "seeds: give at least one seed"),
        ([0, 0], "seeds: seed 0 is listed twice"),
        ([0, 1.5], "seeds[1]: Input should be a valid integer"),
        ([0, "1"], "seeds[1]: Input should be a valid integer"),
    ],
)
def test_bad_seeds_are_refused_before_anything_is_created(tmp_path, capsys, seeds, message):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({**JOB, "seeds": seeds}))
    out = tmp_path / "out"
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_seeds_replicate_every_trial():
    from study import sweep

    cfg = config.parse({**JOB, "seeds": [0, 3]})
    pts = sweep.points(cfg)
    assert [(p["method"], p["seed"]) for p in pts] == [("scratch", 0), ("full", 0), ("scratch", 3), ("full", 3)]
    assert cfg.seed == 0 and cfg.for_seed(3).seed == 3 and config.parse(cfg.for_seed(3).resolved()).seed == 3


def test_an_added_seed_keeps_the_finished_replicates_and_draws_anew(tmp_path):
    """Seeds added to a job: seed 0's stages keep their keys (their models are found
    again, not retrained), seed 1's are new, and what seed 1 draws differs: the
    validation hold-out (the rest of what a seed draws: test_data's crops, the trial's
    torch seed)."""
    from study import sweep
    from study.stages import Job, Trained

    one, two = config.parse({**JOB, "seeds": [0]}), config.parse({**JOB, "seeds": [0, 1]})
    sources = {(s, "resnet18", "standard"): {"key": f"pre{s}", "ckpt": "x"} for s in (0, 1)}
    keys = {
        cfg.seeds[-1]: {
            (p["seed"], p["method"]): sweep.trained_for(Job(cfg, tmp_path, None), p, sources).key
            for p in sweep.points(cfg)
        }
        for cfg in (one, two)
    }
    assert all(keys[1][k] == v for k, v in keys[0].items())
    assert len(set(keys[1].values())) == 4
    pre = [
        Trained(Job(two.for_seed(s), tmp_path, None), "pretrain", {"stage": "pretrain", "seed": s}).key for s in (0, 1)
    ]
    assert pre[0] != pre[1]
    from study.data.loaders import holdout

    assert holdout(104, 0.1, two.for_seed(0).seed) == holdout(104, 0.1, 0) != holdout(104, 0.1, two.for_seed(1).seed)
