"""Verdicts from replicates: the same job and seed give the same numbers in two fresh
folders, another seed gives other numbers, and seeds added to a job reuse the finished
replicates."""

import json
import re

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


def _job(tmp_path, name, seeds, weights):
    """The job with its backbone imported from ``weights``: stage 1 on Ray Train is
    test_pipeline's and test_distributed's (two workers give one worker's model)."""
    job = tmp_path / f"{name}.yaml"
    job.write_text(yaml.safe_dump({**JOB, "seeds": seeds, "pretrain": {"weights": str(weights)}}))
    return job


def test_same_seed_same_numbers(tmp_path, run_study):
    """The tiny job twice, into two fresh folders: the same results.csv (timings are not in
    it), per-image results and claims.json, byte for byte."""
    import torch
    import torchvision

    weights = tmp_path / "imagenet_like.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    first, second = tmp_path / "first", tmp_path / "second"
    said = run_study(_job(tmp_path, "a", [0], weights), first)
    run_study(_job(tmp_path, "b", [0], weights), second)
    # where the time went, and the claims' lines marked as resting on one training run
    assert "[study] time: data " in said and ", stage 1 " in said and ", sweep " in said and "; total " in said
    assert re.search(r"\[study\] claim: \w+ \(one training run\): Fine-tuned models have a higher DR", said)
    for name in ("results.csv", "per_image.json", "report/claims.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    claims = json.loads((first / "report" / "claims.json").read_text())
    assert claims[0]["datasets"] and claims[0]["datasets"][0]["seeds"] == 1
    assert claims[0]["covers"] == "test images" and claims[0]["datasets"][0]["covers"] == "test images"
    assert "one training run" in (first / "results.md").read_text()
    assert "one training run" in (first / "report" / "index.html").read_text()


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
