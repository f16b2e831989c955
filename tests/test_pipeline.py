"""The whole study end to end on a tiny job, submitted the way users submit jobs (`ray job
submit --working-dir .`) to a real two-node Ray cluster on 127.0.0.1 (`ray start --head`
and a second `ray start --address`): data, pre-training on Ray Train, a sweep of five
fine-tuning trials on Ray Tune (Table 1's three methods, two lr of f where it trains), the
analyses on two actors, MLflow (a real local server), results and the report; then the
models loaded back from MLflow and the report rebuilt from it."""

import contextlib
import os

import pandas as pd
import pytest
import yaml

from study import claims, cli
from study.data.loaders import make_loader
from study.engine import accuracy

JOB = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"workers": 1},
    "datasets": {
        "shapes": {"params": {"train_per_class": 3, "test_per_class": 1}},
        "alphabet": {"params": {"train_per_class": 5, "test_per_class": 2}},
    },
    # the small ViT (study.backbones): a transformer through every stage; ResNets run in the
    # sweep, replicate and demo tests. DDP over the cluster's two nodes.
    "pretrain": {
        "dataset": "shapes",
        "backbones": ["vit_tiny_p4"],
        "scaling": {"workers": 2, "cpus_per_worker": 1},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    },
    "finetune": {
        "datasets": ["alphabet"],
        "methods": ["scratch", "partial", "full"],
        "train": {"epochs": 2, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
        "space": {"lr_f": [0.01, 0.02]},
    },
    "analyses": {
        "actors": 2,
        "images": 26,
        "snapshots": [0.25, 0.5],
        "cca": {"images": 26, "max_rows": 256},
        "uap": {"steps": 3, "train_images": 32},
        "mmd": {"images": 26},
        "ll": {"images": 8, "steps": 1},
    },
    "eval": {
        "batch_size": 64,
        "max_images": 40,
        "attacks": [
            "pgd10_linf_0.5",
            "fgsm_linf_0.5",
            "pgd3_linf_16.0",
            {"name": "autoattack_linf_16.0", "max_images": 6},
            # the strong evaluation (PGD-10, PGD-50 x 5 restarts, AutoAttack) on a few images
            {"name": "strong_linf_0.5", "max_images": 4, "methods": ["full"]},
            # the public backbone's threat: crafted once on the stage-1 ViT, applied to every fine-tune
            "feature_linf_2.0",
            "surrogate_linf_2.0",
        ],
        # common corruptions on the target (shapes' stage-1 backbone is left out)
        "corruptions": {"names": ["gaussian_noise", "glass_blur"], "severities": [1, 5], "datasets": ["alphabet"]},
    },
}
ATTACKS = ["pgd10_linf_0.5", "fgsm_linf_0.5", "pgd3_linf_16.0", "autoattack_linf_16.0"]
STRONG = {"full"}
CORRUPTIONS = [f"corruption_{n}_{s}" for n in ("gaussian_noise", "glass_blur") for s in (1, 5)]
TRANSFER = ["feature_linf_2.0", "surrogate_linf_2.0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_cluster):
    """The tiny job through `ray job submit --working-dir . --runtime-env
    jobs/runtime_env.yaml`, followed to its end; the cluster's nodes stop after the module."""
    from conftest import tracked_checkout

    from study.runtime.locks import prepare_out

    root = tmp_path_factory.mktemp("tiny")
    job = root / "tiny.yaml"
    job.write_text(yaml.safe_dump(JOB))
    out = root / "out"
    # the working directory: the checkout's tracked files, and an earlier run's OUT inside it
    # holding a file over Ray's 100 MiB upload limit (sparse: nothing is written to disk)
    checkout = tracked_checkout(root / "checkout")
    prepare_out(checkout / "demo-out")
    (checkout / "demo-out" / "checkpoints").mkdir()
    with open(checkout / "demo-out" / "checkpoints" / "big.pt", "wb") as fh:  # not a pattern of runtime_env.yaml
        fh.truncate(101 * 2**20)
    done = ray_cluster["submit"]("study", "run", str(job), "--out", str(out), "--quiet", cwd=checkout)
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
    return job, out


def test_results_table(tiny_run):
    _, out = tiny_run
    df = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert (
        list(df.columns)
        == (  # results.csv's columns, pinned: users' files read them
            "job dataset backbone method source source_data seed lam lr_f lr_g optimizer val_acc val_acc_1 "
            "val_AAI f_l1 selected chosen attack images AOI AOI_lo AOI_hi AAI AAI_lo AAI_hi DR DR_lo DR_hi flags "
            "paper_AOI paper_AAI paper_DR stage"
        ).split()
    )
    assert (df.job == "tiny").all()
    attacked = df.dropna(subset=["AAI"])
    assert (df.seed == 0).all() and (attacked.AAI_lo <= attacked.AAI).all() and (attacked.AAI <= attacked.AAI_hi).all()
    # the pre-training objective: the backbone's own, or the one a fine-tune started from
    sources = df.drop_duplicates(["dataset", "method"]).set_index("method").source
    assert sources.pretrain == "standard" and sources.full == sources.partial == "standard"
    data = df.drop_duplicates(["dataset", "method"]).set_index("method").source_data
    assert data.full == data.pretrain == "shapes" and pd.isna(data.scratch)
    assert pd.isna(sources.scratch)
    models = [
        ["shapes", "pretrain", None],
        ["alphabet", "scratch", 0.01],
        ["alphabet", "scratch", 0.02],
        ["alphabet", "partial", 0.01],
        ["alphabet", "full", 0.01],
        ["alphabet", "full", 0.02],
    ]
    clean = df[df.attack.isna()]
    got = [[d, s, None if pd.isna(lr) else lr] for d, s, lr in clean[["dataset", "method", "lr_f"]].values]
    assert got == models
    # the source accuracy on every test image (50), the fine-tunes' on the attacks' 40
    assert clean.images.tolist() == [50, 40, 40, 40, 40, 40]
    assert clean.stage.is_unique
    # model selection: one trial per method, the best validation accuracy of its rivals
    tuned = clean[clean.method != "pretrain"]
    assert tuned.val_acc.notna().all() and tuned.groupby("method").selected.sum().eq(1).all()
    for _, g in tuned.groupby("method"):
        assert g[g.selected].val_acc.iloc[0] == g.val_acc.max()
    attacked = df[df.attack.notna()]
    assert attacked.stage.drop_duplicates().tolist() == clean.stage.tolist()
    for _, group in attacked.groupby("stage", sort=False):
        strong, target = group.method.iloc[0] in STRONG, group.dataset.iloc[0] == "alphabet"
        assert group.attack.tolist() == ATTACKS + ["strong_linf_0.5"] * strong + (TRANSFER + CORRUPTIONS) * target
        assert group.images.tolist() == [40, 40, 40, 6] + [4] * strong + [40] * 6 * target
        corrupted = group[group.attack.str.startswith("corruption_")]
        assert (corrupted["flags"] == "ok").all() and corrupted.AOI.nunique() <= 1  # the same clean images
        group = group[~group.attack.str.startswith("corruption_")]
        assert (group.AAI <= group.AOI).all()
        some = group.AOI > 0  # DR is undefined (empty) where nothing was right to begin with
        dr = 100 * (group.AOI - group.AAI) / group.AOI
        assert ((group.DR - dr).abs()[some] < 0.02).all() and group.DR[~some].isna().all()
    assert df.AOI.between(0, 100).all()
    assert attacked["flags"].notna().all() and clean["flags"].isna().all()  # "ok" or the failed flags
    # the paper's alphabet numbers sit beside ours: Table 1 (PGD-10 at 0.5/255), Table 2 (FGSM)
    full = df[(df.method == "full") & (df.attack == "pgd10_linf_0.5") & df.selected].iloc[0]
    assert (full.paper_AOI, full.paper_AAI, full.paper_DR) == (99.94, 2.9, 97.1)
    assert df[(df.method == "scratch") & (df.attack == "fgsm_linf_0.5")].paper_AAI.iloc[0] == 99.87
    assert df[df.dataset == "shapes"].paper_AOI.isna().all()
    md = (out / "results.md").read_text()
    assert "## Table 1" in md and "## Table 2" in md and "## Sanity checks" in md
    assert "## Stage 1: pre-trained backbones on the source task" in md
    assert "## Stage 2 sweep: every trial" in md and md.count("| ✓ |") == 3
    assert "AAI worst case" in md and "*worst case*: the strong evaluation" in md
    assert "| shapes | vit_tiny_p4 | standard |" in md
    assert "full fine-tune | " in md and "(2.90)" in md and "(75.83)" in md
    sanity = pd.read_csv(out / "sanity.csv")
    assert {
        "in_ball",
        "in_range",
        "eps0_aai_eq_aoi",
        "pgd_le_fgsm",
        "autoattack_le_pgd",
        "monotone_eps",
        "no_vanishing_gradients",
        "pgd_near_worst",
    } <= set(sanity.flag)
    for name in ("in_ball", "in_range", "aai_le_aoi", "eps0_aai_eq_aoi"):  # these must hold
        assert sanity[sanity.flag == name].passed.all(), name
    assert (out / "mlflow.db").is_file() and (out / "mlartifacts").is_dir()


def test_mlflow_runs_and_models_give_the_reported_aoi(tiny_run):
    import mlflow

    from study.tracking import LocalServer

    _, out = tiny_run
    df = pd.read_csv(out / "results.csv")
    table = df[df.attack.isna()].set_index("stage")["AOI"]  # the clean rows
    with LocalServer(out) as server:
        mlflow.set_tracking_uri(server.uri)
        try:
            _check_models(out, table)
        finally:
            mlflow.set_tracking_uri(None)


def _check_models(out, table):
    import mlflow

    exp = mlflow.get_experiment_by_name("tiny")
    runs = mlflow.search_runs([exp.experiment_id])
    parents = runs[runs["tags.mlflow.parentRunId"].isna()]
    children = runs[runs["tags.mlflow.parentRunId"].notna()]
    assert len(parents) == 1 and len(children) == 6  # stage 1, and one per trial
    assert set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    for _, run in children.iterrows():
        client = mlflow.MlflowClient()
        history = client.get_metric_history(run.run_id, "train_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        names = [a.path for a in client.list_artifacts(run.run_id)]
        assert {"config.yaml", "attacks.csv", "attacks.json", "sanity.json"} <= set(names)
        for attack in ATTACKS:  # each attack once, as AOI/AAI/DR metrics of the model's run
            assert len(client.get_metric_history(run.run_id, f"AAI/{attack}")) == 1
        assert run["tags.study.sanity"] == "pass" or run["tags.study.sanity"].startswith("fail: ")
        assert run["metrics.sanity/in_ball"] == 1.0
        assert run["params.backbone"] == "vit_tiny_p4"
        dataset, stage = run["tags.study.dataset"], run["tags.study.stage_key"]
        if run["tags.study.stage"] == "finetune":
            assert run["tags.study.method"] in ("scratch", "partial", "full")
            assert [m.step for m in client.get_metric_history(run.run_id, "val_acc")] == [1, 2]
        model = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
        beton = out / "data" / dataset / "test.beton"
        loader = make_loader(beton, train=False, resolution=32, batch_size=64, workers=1)
        cap = None if run["tags.study.stage"] == "pretrain" else 40  # stage 1: every test image
        assert abs(accuracy(model, loader, max_images=cap) - table[stage]) <= 0.5
        assert abs(run["metrics.AOI"] - table[stage]) <= 0.01


def test_running_again_skips_finished_stages(tiny_run, capsys):
    job, out = tiny_run
    before = pd.read_csv(out / "results.csv")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    evals = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.eval.json")}
    assert cli.main(["run", str(job), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "pretrain vit_tiny_p4 (standard): done before, reusing" in printed
    assert "sweep: all 5 trials done before, reusing" in printed  # Ray is not even started
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")} == mtimes
    assert evals == {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.eval.json")}
    assert len(evals) == 6  # no attack ran again
    pd.testing.assert_frame_equal(before, pd.read_csv(out / "results.csv"))


def test_study_ui_serves_the_store_and_sigterm_leaves_no_server_behind(tiny_run):
    """As a process manager or `timeout` stops it: SIGTERM to the study process alone.
    Its server and the server's workers end with it, and the port is free again."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import psutil

    from study.tracking import free_port

    _, out = tiny_run
    port = free_port()
    study = [sys.executable, "-m", "study.cli", "ui", "--out", str(out), "--port", str(port)]
    proc = subprocess.Popen(study, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body, deadline = None, time.monotonic() + 240  # a bound for a hang: a loaded host took over 60 s
        while time.monotonic() < deadline:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search",
                    data=b'{"max_results": 10}',
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=2) as r:
                    body = r.read().decode()
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None and '"tiny"' in body
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the mlflow server and its workers
        proc.send_signal(signal.SIGTERM)  # the study process only, not its group
        assert proc.wait(timeout=60) != 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
        with pytest.raises(ConnectionRefusedError):  # nothing listens on it any more
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as s:  # and it can be served again (the old connections may linger in TIME_WAIT)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if proc.poll() is None:  # a failed check: take the server down too (its own session)
            left = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for p in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


def test_study_ui_without_a_store_is_an_error(tmp_path):
    assert cli.main(["ui", "--out", str(tmp_path)]) == 2  # a usage error, as everywhere in the CLI


def test_analyses_ran_on_parallel_actors_and_the_report_rebuilds_from_mlflow(tiny_run, tmp_path):
    import json

    _, out = tiny_run
    found = json.loads((out / "analyses" / "analyses.json").read_text())
    a = found["seeds"]["0"]["datasets"]["alphabet"]
    assert set(a) == {"cca", "uap", "uap_transfer", "mmd", "ll"}
    pairs = {"fine-tuned|pre-trained", "fine-tuned|standard", "pre-trained|standard", "chance"}
    assert set(a["cca"]) == pairs | {"bottom_draws"}  # the bootstrap over images of the CCA claim
    assert all(0 <= a["cca"][p]["bottom"] <= 1 and 0 <= a["cca"][p]["all"] <= 1 for p in pairs)
    assert all(0 <= v <= 1 + 1e-9 for p in pairs for v in a["cca"]["bottom_draws"][p])
    # SVCCA over the ViT's four stages, one row per patch token
    assert all(list(a["cca"][p]["layers"]) == ["block_q1", "block_q2", "block_q3", "block_q4"] for p in pairs)
    assert "chance bottom" in (out / "report" / "index.md").read_text()  # the analyses table shows it
    assert set(a["uap"]) == {"full", "scratch"} and set(a["ll"]) == {"pre-trained", "standard", "fine-tuned"}
    for u in a["uap"].values():  # the bound holds, and the snapshots along training were attacked
        assert u["max_abs"] <= u["eps_pixels"] and (out / "analyses" / os.path.basename(u["png"])).is_file()
        steps = [p["step"] for p in u["along_training"]]
        total = steps[-1]  # 25 % and 50 % of the training steps, then the final model
        assert total >= 4 and steps == [round(0.25 * total), round(0.5 * total), total]
    # two actors, and their tasks overlapped in time
    tasks = found["tasks"]
    assert found["actors"] == 2 and len({t["pid"] for t in tasks}) == 2
    assert len({t["node"] for t in tasks}) == 2  # one actor on each node (1 CPU each)
    spans = sorted((t["started"], t["ended"]) for t in tasks)
    assert any(b[0] < a_[1] for a_, b in zip(spans, spans[1:]))
    page = (out / "report" / "index.html").read_text()
    checked = json.loads((out / "report" / "claims.json").read_text())
    # every finding: claim 1 on DR and on AAI under each Table 2 attack the job ran (PGD-10 and
    # FGSM at 0.5/255), 2 (DR, AOI), 3 (two halves), CCA, 4, capacity, source, 5 and 5's others
    # and the two corruption findings (the architecture one says what it needs: one backbone here),
    # and the public backbone's threat under each transfer item: exposed, and closed by each defense
    assert len(checked) == 21 and page.count('class="claim"') == 21 and page.count("<figure") == 7
    assert {c["id"] for c in checked} >= {"1-aai:fgsm_linf_0.5", "cca", "capacity", "source", "5-others"}
    corruption = claims.by_id(checked, "corruption")
    assert corruption["datasets"] and corruption["datasets"][0]["images"] == 40
    assert "resnet50" in claims.by_id(checked, "corruption-architecture")["detail"]
    md = (out / "report" / "index.md").read_text()
    assert "## Common corruptions" in md and "| gaussian_noise | glass_blur |" in md
    assert (out / "report" / "figc_corruptions.png").stat().st_size > 10_000
    # the threat: its table, its figure, and both findings (the defenses' says what it needs)
    # the share is of Table 1's PGD-10: the job runs no PGD-10 at the items' 2/255
    assert "## The public backbone's threat" in md and "share of pgd10_linf_0.5's damage" in md
    assert (out / "report" / "figt_transfer.png").stat().st_size > 10_000
    exposed = claims.by_id(checked, "transfer-exposed:feature_linf_2.0")
    assert exposed["datasets"] and exposed["datasets"][0]["what"] == "DR full − standard"
    closed = claims.by_id(checked, "transfer-closed:surrogate_linf_2.0:dm_stage12")
    assert closed["verdict"] == "inconclusive" and "no full fine-tune and DM@stage-1&2" in closed["detail"]
    index = json.loads((out / "transfer" / "index.json").read_text())
    assert len(index) == 2 and len({e["source"] for e in index.values()}) == 1  # one f₀, crafted once each
    # study report: the same page rebuilt from what MLflow holds
    rebuilt = tmp_path / "report"
    assert cli.main(["report", "--from", str(out), "--experiment", "tiny", "--out", str(rebuilt)]) == 0
    again = (rebuilt / "index.md").read_text()
    first = (out / "report" / "index.md").read_text()
    assert again.split("## Figures")[0].replace("tiny", "") == first.split("## Figures")[0].replace("tiny", "")
    assert sorted(p.name for p in rebuilt.glob("fig*.png")) == sorted(p.name for p in (out / "report").glob("fig*.png"))
    assert cli.main(["report", "--from", str(tmp_path / "no-store"), "--out", str(rebuilt)]) == 2
