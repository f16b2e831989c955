"""Verdicts from replicates: the same job and seed give the same numbers in two fresh
folders, another seed gives other numbers, and seeds added to a job reuse the finished
replicates."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from study import cli, config

JOB = {
    "name": "replicates", "device": "cpu", "data": {"workers": 2},
    "datasets": {"shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
                 "alphabet": {"params": {"train_per_class": 4, "test_per_class": 1}}},
    "pretrain": {"dataset": "shapes", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
    "finetune": {"datasets": ["alphabet"], "methods": ["scratch", "full"], "max_concurrent_trials": 1,
                 "train": {"epochs": 1, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05}},
    "eval": {"batch_size": 64, "attacks": ["pgd10_linf_0.5"]},
    "analyses": {"enabled": False},
}


@pytest.mark.parametrize("seeds,message", [([], "seeds: give at least one seed"),
                                           ([0, 0], "seeds: seed 0 is listed twice"),
                                           ([0, 1.5], "seeds[1]: Input should be a valid integer"),
                                           ([0, "1"], "seeds[1]: Input should be a valid integer")])
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


def _run(tmp_path, name, seeds, out, env, weights):
    """The job with its backbone imported from ``weights``: stage 1 on Ray Train is
    test_pipeline's and test_distributed's (two workers give one worker's model)."""
    job = tmp_path / f"{name}.yaml"
    job.write_text(yaml.safe_dump({**JOB, "seeds": seeds, "pretrain": {"weights": str(weights)}}))
    done = subprocess.run([sys.executable, "-m", "study.cli", "run", str(job), "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_same_seed_same_numbers_other_seed_other_numbers(tmp_path, ray_local, mlflow_server):
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": mlflow_server}
    import torch
    import torchvision

    weights = tmp_path / "imagenet_like.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    first, second = tmp_path / "first", tmp_path / "second"
    _run(tmp_path, "a", [0], first, env, weights)
    _run(tmp_path, "b", [0], second, env, weights)
    for name in ("results.csv", "per_image.json", "report/claims.json"):  # nothing here is a timing
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    trained = {p: p.stat().st_mtime_ns for p in (first / "checkpoints").glob("*.pt")}
    log = _run(tmp_path, "c", [0, 1], first, env, weights)  # a seed added: seed 0's models are reused
    assert "pretrain resnet18 (standard): done before" in log
    assert all(p.stat().st_mtime_ns == t for p, t in trained.items())
    df = pd.read_csv(first / "results.csv")
    assert sorted(df.seed.unique()) == [0, 1]
    zero, one = (df[df.seed == s].drop(columns=["seed", "stage"]).reset_index(drop=True) for s in (0, 1))
    assert not zero.equals(one)  # another seed, other models and numbers
    old = pd.read_csv(second / "results.csv")
    cols = ["dataset", "method", "attack", "AOI", "AAI", "DR", "val_acc"]
    pd.testing.assert_frame_equal(df[df.seed == 0][cols].reset_index(drop=True), old[cols])
    claims = json.loads((first / "report" / "claims.json").read_text())
    assert claims[0]["datasets"] and claims[0]["datasets"][0]["seeds"] == 2

