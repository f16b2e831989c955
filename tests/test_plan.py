"""`study plan`'s cost model (issue 43): costs timed at the job's batch sizes after warm-up,
the strong evaluation charged per member share, fixed costs counted, and a finished run
(`--from OUT`) setting the plan beside what each stage took and measuring its fixed costs."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from study import cli, config, costs, plan
from study.attacks import parse_attack

DEMO = cli.jobs_dir() / "demo.yaml"
UNIT = {"train": 4e-3, "attack": 1e-3, "infer": 4e-4}
TABLE = {"device": "NVIDIA GPU (measured elsewhere)", "costs": {"resnet10@28": UNIT, "resnet10@32": UNIT}}


class Clock:
    """A fake clock that moves one second per reading, and counts its readings."""

    def __init__(self):
        self.now, self.reads = 0.0, 0

    def __call__(self):
        self.reads += 1
        self.now += 1.0
        return self.now


def test_costs_are_timed_at_the_jobs_batch_sizes_after_warm_up(monkeypatch, tmp_path):
    cfg = config.load(DEMO)
    need = plan.needs(cfg)
    # stage 1: 256 over 2 workers of 1 CPU; stage 2: 128 with the trial's 2 CPUs; the evaluation's 130
    assert {
        ("resnet10", 28, 128, 1),
        ("resnet10", 28, 130, 1),
        ("resnet10", 32, 128, 2),
        ("resnet10", 32, 130, 2),
    } <= need
    calls, clock = [], Clock()
    median = costs.timed(lambda: calls.append(1), torch.device("cpu"), clock)
    assert len(calls) == costs.WARMUP + costs.REPEATS and clock.reads == 2 * costs.REPEATS  # warm-up untimed
    assert median == 1.0
    entry = costs.measure("resnet10", 8, torch.device("cpu"), batch=4, threads=1, clock=Clock())
    assert entry["batch"] == 4 and entry["threads"] == 1 and entry["torch"] == torch.__version__
    assert entry["train"] == entry["attack"] == entry["infer"] == 0.25  # one fake second over 4 images
    # what the file lacks, or measured under other versions, is measured here at the job's batch
    measured = []
    monkeypatch.setattr(
        costs,
        "measure",
        lambda b, side, dev, batch, threads: measured.append((b, side, batch, threads)) or {**UNIT, **costs.versions()},
    )
    old = {**UNIT, "torch": "0.0.1"}
    table = {"device": None, "costs": {costs.key("resnet10", 32, 128, 2): old}}
    costs.complete(
        table, {("resnet10", 32, 128, 2), ("resnet10", 32, 130, 2)}, torch.device("cpu"), tmp_path / "c.json", True
    )
    assert sorted(measured) == [("resnet10", 32, 128, 2), ("resnet10", 32, 130, 2)]
    assert (
        json.loads((tmp_path / "c.json").read_text())["costs"][costs.key("resnet10", 32, 130, 2)]["torch"]
        == torch.__version__
    )
    # an older file's CPU costs (timed at batch 8, or on another CPU) are measured again here
    measured.clear()
    old_cpu = {"device": "cpu (an older file)", "costs": {"resnet10@32": UNIT}}
    again = costs.complete(old_cpu, {("resnet10", 32, 130, 2)}, torch.device("cpu"), None, True)
    assert measured == [("resnet10", 32, 130, 2)] and "resnet10@32" not in again["costs"]
    # a file measured on another device (a GPU node) stands for every batch: nothing measured here
    measured.clear()
    costs.complete(json.loads(json.dumps(TABLE)), {("resnet10", 32, 130, 2)}, torch.device("cpu"), None, True)
    assert measured == []


def test_the_strong_evaluation_is_charged_per_member_share():
    strong = parse_attack("strong_linf_0.5[version=apgd]")
    shares = {"correct": 0.8, "survive": 0.9}
    # PGD-10 on the 80 % it gets right, broken ones leaving half-way; the others on the 72 % left
    assert strong.passes(shares) == pytest.approx(0.8 * 10 * 0.95 + 0.72 * (250 + 200))
    assert strong.passes(plan.EVERY_STEP) == strong.steps_at_most()
    assert parse_attack("fgsm_linf_2.0").passes(shares) == pytest.approx(0.8 * 0.95)


def test_fixed_costs_are_counted_stage_by_stage():
    cfg = config.load(DEMO)
    one = {"cpus": 2, "gpus": 0}
    zero = plan.estimate(cfg, {**TABLE, "fixed": dict.fromkeys(costs.FIXED_PRIOR, 0.0)}, cluster=one)
    some = plan.estimate(
        cfg, {**TABLE, "fixed": {**dict.fromkeys(costs.FIXED_PRIOR, 0.0), "fit": 100.0, "trial": 10.0}}, cluster=one
    )
    assert zero["fits"] == 2 and zero["trials"] == 21 and zero["at_once"] == 1  # 2-CPU trials on 2 CPUs
    assert some["stages"]["stage 1"]["wall"] - zero["stages"]["stage 1"]["wall"] == pytest.approx(200.0)
    assert some["stages"]["stage 1"]["seconds"] - zero["stages"]["stage 1"]["seconds"] == pytest.approx(
        400.0
    )  # 2 workers
    assert some["stages"]["sweep"]["wall"] - zero["stages"]["sweep"]["wall"] == pytest.approx(210.0)
    # on a bigger cluster the trials run side by side: the wall-clock falls, the device-hours do not
    wide = plan.estimate(cfg, {**TABLE, "fixed": {}}, cluster=plan.parse_cluster("16xCPU"))
    narrow = plan.estimate(cfg, {**TABLE, "fixed": {}}, cluster=one)
    assert wide["stages"]["sweep"]["wall"] < narrow["stages"]["sweep"]["wall"] / 4
    assert wide["stages"]["sweep"]["seconds"] == pytest.approx(narrow["stages"]["sweep"]["seconds"])
    with pytest.raises(Exception, match="N×GPU"):
        plan.parse_cluster("lots")


def _finished_run(tmp_path, phases):
    """A demo OUT as a finished run leaves it for `--from`: results.csv and timing.json."""
    out = tmp_path / "out"
    out.mkdir()
    rows = [
        {
            "job": "demo",
            "dataset": "alphabet",
            "backbone": "resnet10",
            "method": m,
            "seed": s,
            "attack": a,
            "AOI": 90.0,
            "AAI": aai,
            "DR": 1.0,
            "stage": f"{m}-{s}",
        }
        for m in ("full", "scratch")
        for s in (0, 1, 2)
        for a, aai in (("pgd10_linf_0.5", 81.0), ("fgsm_linf_2.0", 70.0))
    ]
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "timing.json").write_text(json.dumps({"job": "demo", "phases": phases}))
    return out


def test_plan_from_a_finished_run_says_its_error_and_measures_the_fixed_costs(tmp_path, capsys):
    phases = {
        "data": 17.0,
        "MLflow": 1.0,
        "stage 1": 187.0,
        "sweep": 900.0,
        "analyses": 91.0,
        "results and report": 8.0,
    }
    out = _finished_run(tmp_path, phases)
    table = tmp_path / "costs.json"
    table.write_text(json.dumps(TABLE))
    assert cli.main(["plan", str(DEMO), "--costs", str(table), "--from", str(out)]) == 0
    said = capsys.readouterr().out
    assert "plan/run" in said and "measured" in said and f"fixed costs measured from {out}" in said
    stored = json.loads(table.read_text())
    assert stored["fixed_from"] == str(out) and set(stored["fixed"]) == set(costs.FIXED_PRIOR) - {"actor"}
    # the attack shares come from the run: 90 % right, 90 % of them left by PGD-10
    assert "attacks on 90% of the images, 90% of them left by PGD-10" in said
    # planned again with what it measured, each stage's wall-clock is the run's
    est = plan.estimate(
        config.load(DEMO), costs.load(table), plan.pilot_shares(pd.read_csv(out / "results.csv")), plan.this_machine()
    )
    for stage, took in phases.items():
        assert est["stages"][stage]["wall"] == pytest.approx(took, rel=0.02), stage
    # a run without timing.json, or of another job, is refused by name before anything is measured
    (out / "timing.json").unlink()
    assert cli.main(["plan", str(DEMO), "--costs", str(table), "--from", str(out)]) == 2
    assert "timing.json" in capsys.readouterr().err
    (out / "timing.json").write_text(json.dumps({"job": "tiny", "phases": phases}))
    assert cli.main(["plan", str(DEMO), "--costs", str(table), "--from", str(out)]) == 2
    assert "not of demo" in capsys.readouterr().err
