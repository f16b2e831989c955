"""Side by side: one `study run` per OUT (a second stops at once naming the first; the
same job and seed in two fresh folders give the same numbers), one writer per dataset
folder (two jobs sharing data.dir write each .beton once), and the splits every training
run read, as MLflow dataset inputs."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study.files import config_hash
from study.runtime import locks


def _weights(tmp_path: Path) -> Path:
    import torch
    import torchvision

    path = tmp_path / "imagenet_like.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _cmd(job: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "study.cli", "run", str(job), "--out", str(out), "--quiet"]


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    with locks.exclusive(tmp_path / "out") as me:
        assert me["pid"] == os.getpid() and me["host"] == socket.gethostname()
        with pytest.raises(locks.Busy, match=rf"out is in use by another study run \(pid {os.getpid()} on "):
            with locks.exclusive(tmp_path / "out"):
                pass
    with locks.exclusive(tmp_path / "out"):  # released with its holder
        pass
    code = (
        "from study.runtime import locks; import os; "
        f"c = locks.exclusive({str(tmp_path / 'k')!r}); c.__enter__(); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # dies holding it, without unwinding
    with locks.exclusive(tmp_path / "k"):  # the kernel dropped it
        pass


def test_a_run_into_a_held_out_stops_before_it_imports_anything_heavy(tmp_path):
    """The refusal comes before the job is read and before torch, Ray or MLflow load: a
    second run stops at once however slow the host."""
    job = tmp_path / "job.yaml"
    job.write_text("name: x\n")  # never read: the refusal comes first
    code = (
        "import sys; from study.cli import main; rc = main(['run', sys.argv[1], '--out', sys.argv[2]]); "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'pandas', 'study.config') if m in sys.modules)); "
        "sys.exit(rc)"
    )
    locks.check_free(tmp_path / "out")  # no lock file yet: free
    with locks.exclusive(tmp_path / "out"):
        cmd = [sys.executable, "-c", code, str(job), str(tmp_path / "out")]
        done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout.strip() == "[]", done.stdout + done.stderr
    assert f"is in use by another study run (pid {os.getpid()} on {socket.gethostname()}" in done.stderr
    locks.check_free(tmp_path / "out")  # released: free again


@pytest.fixture(scope="module")
def twice(tmp_path_factory, ray_local, mlflow_server):
    """One job run twice at once, into two fresh folders that share one data.dir (on the
    session's Ray and MLflow server), and a third time into the first's folder while the
    first holds it. The job: Table 1's standard model and full fine-tune, TRADES@stage-2,
    and DM in the authors' form at two λ; attacked by PGD-10 on cross-entropy and on C&W's
    margin. Returns the folders, what the first run printed, the third run and the first's pid."""
    root = tmp_path_factory.mktemp("twice")
    weights = _weights(root)
    raw = {
        "name": "twice",
        "seed": 0,
        "device": "cpu",
        "data": {"workers": 1, "dir": str(root / "shared-data")},
        "datasets": {"alphabet": {"params": {"train_per_class": 4, "test_per_class": 1}}},
        "pretrain": {"backbones": ["resnet18"], "weights": {"standard": str(weights), "fgsm_linf_2.0": str(weights)}},
        "finetune": {
            "datasets": ["alphabet"],
            "methods": ["scratch", "full", "trades_stage2", "dm_stage12"],
            "max_concurrent_trials": 1,
            "train": {"epochs": 1, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
            "space": {"lam": [1.0, 100.0]},
            "dm": {"form": "code", "steps": 2},
            "trades": {"beta": 6.0, "attack": "pgd2_linf_2.0"},
        },
        "eval": {"batch_size": 64, "attacks": ["pgd10_linf_0.5", "pgd10_linf_0.5[loss=cw]"]},
        "analyses": {"enabled": False},
    }
    job, out, solo = root / "twice.yaml", root / "out", root / "solo"
    job.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_server,
    }
    first = subprocess.Popen(_cmd(job, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    alone = subprocess.Popen(_cmd(job, solo), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while (
            f'"pid": {first.pid}' not in (out / locks.OUT_LOCK).read_text()
            if (out / locks.OUT_LOCK).is_file()
            else True
        ):
            assert time.monotonic() < deadline and first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.2)
        t0 = time.monotonic()
        second = subprocess.run(_cmd(job, out), env=env, capture_output=True, text=True, timeout=120)
        second.seconds = time.monotonic() - t0
        said = [p.communicate(timeout=900)[0] for p in (first, alone)]  # a bound for a hang
        for p, log in zip((first, alone), said):
            assert p.returncode == 0, log[-3000:]
    finally:
        for p in (first, alone):
            if p.poll() is None:
                p.kill()
    return {"out": out, "solo": solo, "data": root / "shared-data", "said": said, "second": second, "pid": first.pid}


def test_a_second_run_into_a_held_out_stops_at_once(twice):
    second = twice["second"]
    assert second.returncode == 2 and second.seconds < 30
    assert f"is in use by another study run (pid {twice['pid']} on {socket.gethostname()}" in second.stderr
    assert "[study] data" not in second.stdout  # it prepared nothing, wrote nothing


def test_the_same_job_and_seed_in_two_fresh_folders_give_the_same_numbers(twice):
    """The same results.csv (timings are not in it), per-image results and claims.json,
    byte for byte; each run says where its time went and marks its verdicts as resting on
    one training run."""
    out, said = twice["out"], twice["said"][0]
    for name in ("results.csv", "per_image.json", "report/claims.json"):
        assert (out / name).read_bytes() == (twice["solo"] / name).read_bytes(), name
    assert "[study] time: data " in said and ", stage 1 " in said and ", sweep " in said and "; total " in said
    assert re.search(r"\[study\] claim: \w+ \(one training run\): Fine-tuned models have a higher DR", said)
    # each trial's line says the image counts its AOI and each AAI rest on
    assert re.search(r"AOI \d+\.\d+ on \d+ images, AAI pgd10_linf_0\.5 \d+\.\d+ on \d+", said), said[-3000:]
    checked = json.loads((out / "report" / "claims.json").read_text())
    assert checked[0]["datasets"] and checked[0]["datasets"][0]["seeds"] == 1
    assert checked[0]["covers"] == "test images" and checked[0]["datasets"][0]["covers"] == "test images"
    assert "one training run" in (out / "results.md").read_text()
    assert "one training run" in (out / "report" / "index.html").read_text()


def test_two_runs_sharing_a_data_dir_write_each_beton_once(twice):
    logs = twice["said"]
    written = [
        line
        for log in logs
        for line in log.splitlines()
        if line.startswith("[study] data alphabet/") and ", written (" in line
    ]
    reused = [line for log in logs for line in log.splitlines() if "already prepared" in line]
    assert len(written) == 2 and len(reused) == 2, "\n".join(logs)
    assert sorted(p.name for p in (twice["data"] / "alphabet").glob("*.beton")) == ["test.beton", "train.beton"]


def test_each_training_run_names_the_splits_it_read(twice, mlflow_server):
    """The trial's MLflow run names its splits as dataset inputs, with the manifests'
    config hashes."""
    import mlflow

    train = json.loads((twice["data"] / "alphabet" / "train.json").read_text())
    test = json.loads((twice["data"] / "alphabet" / "test.json").read_text())
    mlflow.set_tracking_uri(mlflow_server)
    try:
        runs = mlflow.search_runs(experiment_names=["twice"])
        trial = runs[runs["tags.study.stage"] == "finetune"].run_id.iloc[0]
        inputs = mlflow.get_run(trial).inputs.dataset_inputs
    finally:
        mlflow.set_tracking_uri(None)
    got = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(got) == {"training", "validation", "evaluation"}
    assert {d.name for d in got.values()} == {"alphabet"}
    assert got["evaluation"].digest == test["config_hash"]
    for part in ("training", "validation"):
        assert got[part].digest == config_hash(
            {"split": train["config_hash"], "part": part, "val_fraction": 0.1, "seed": 0}
        )
    profiles = {k: json.loads(d.profile) for k, d in got.items()}
    assert profiles["training"]["count"] + profiles["validation"]["count"] == train["count"] == 104
    assert profiles["evaluation"] == {"count": 26, "num_classes": 26, "split": "test", "dataset": "alphabet"}


def test_trades_dm_and_the_cw_attack_run_through_the_sweep(twice):
    """TRADES@stage-2 as one more method of the sweep, and PGD on C&W's margin loss as one
    more attack: both run, both are named apart, and the paper's tables keep
    cross-entropy PGD's numbers. DM in the authors' form at two λ: each λ's model is
    attacked on the validation images, and one λ is chosen from those numbers."""
    import pandas as pd

    out = twice["out"]
    df = pd.read_csv(out / "results.csv")
    tuned = ("scratch", "full", "trades_stage2", "dm_stage12")
    got = {(m, a) for m, a in df[["method", "attack"]].dropna().values}
    assert got == {(m, a) for m in tuned for a in ("pgd10_linf_0.5", "pgd10_linf_0.5[loss=cw]")}
    dm = df[(df.method == "dm_stage12") & df.attack.isna()]
    assert len(dm) == 2 and dm.val_AAI.notna().all() and dm.chosen.sum() == 1
    assert df[(df.method == "full") & df.attack.isna()].val_AAI.isna().all()  # λ methods only
    assert df[df.attack.isna() & (df.method != "scratch")].f_l1.gt(0).all()  # the size of their features
    trades = json.loads(
        next((out / "checkpoints").glob("finetune-alphabet-resnet18-trades_stage2-*[!l].json")).read_text()
    )
    assert trades["history"][0]["train_loss"] > 0
    md = (out / "results.md").read_text()
    table5 = md.split("## Table 5")[1].split("\n## ")[0]
    assert "TRADES@stage-2" in table5
    ce = df[(df.method == "trades_stage2") & (df.attack == "pgd10_linf_0.5")].iloc[0]
    assert (
        f"| TRADES@stage-2 |  | {ce.AOI:.2f} [" in table5 and f"| {ce.AAI:.2f} [" in table5
    )  # cross-entropy PGD's row
    assert f"| DM@stage-1&2 | {dm[dm.chosen].lam.iloc[0]:g} |" in table5
    assert md.split("## Stage 2 sweep")[1].count("| ✓ λ chosen |") == 1
    assert "loss=cw" not in md.split("## Stage 2 sweep")[0]  # no paper table shows the CW attack


def test_an_mlflow_server_a_killed_run_left_behind_is_stopped_by_the_next_run(tmp_path):
    """A server that outlived its run (started without the parent-death guard, as on a
    platform without it): the record it left names it, and the next run stops it before
    starting its own; a record whose process is gone, or another program, is left alone."""
    import psutil

    from study import tracking

    out = tmp_path / "out"
    out.mkdir()
    port = tracking.free_port()
    stray = subprocess.Popen(
        tracking.server_command(out, port), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    record = {
        "pid": stray.pid,
        "port": port,
        "host": socket.gethostname(),
        "created": psutil.Process(stray.pid).create_time(),
    }
    (out / tracking.SERVER_RECORD).write_text(json.dumps(record))
    said = []
    with pytest.raises(tracking.TrackingError, match="only the process holding it"):
        tracking.stop_orphan(out, None, said.append)  # a reader may stop nothing
    assert stray.poll() is None
    # the next run: a fresh process that holds OUT
    code = (
        "import sys; from study import tracking; from study.runtime import locks\n"
        "with locks.exclusive(sys.argv[1]) as hold:\n"
        "    tracking.stop_orphan(sys.argv[1], hold)"
    )
    nxt = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert nxt.returncode == 0 and f"pid {stray.pid}" in nxt.stdout and "killed run" in nxt.stdout, nxt
    assert stray.wait(20) is not None
    hold = locks.exclusive(out)
    hold_of = hold.__enter__()
    # nothing to stop: the record's process is gone; a live process that is not that server
    tracking.stop_orphan(out, hold_of, said.append)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = {**record, "pid": other.pid, "created": psutil.Process(other.pid).create_time()}
        (out / tracking.SERVER_RECORD).write_text(json.dumps(mine))
        tracking.stop_orphan(out, hold_of, said.append)
        assert other.poll() is None and not said
    finally:
        other.kill()
        hold.__exit__(None, None, None)


def test_a_report_on_a_live_runs_out_uses_its_server_and_stops_nothing(tmp_path):
    """`study report --from OUT` while a live run holds OUT (issue 46): the run's MLflow
    server is used as it is, never stopped, and OUT's server record is not rewritten."""
    import psutil

    from study import cli, tracking

    out = tmp_path / "out"
    out.mkdir()
    (out / tracking.DB_NAME).write_bytes(b"")  # the live run's store (the server below has its own)
    port = tracking.free_port()
    live = subprocess.Popen(
        tracking.server_command(tmp_path / "store", port),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    holder = subprocess.Popen(  # the live run: holds OUT until told to stop
        [
            sys.executable,
            "-c",
            "import sys; from study.runtime import locks; h = locks.exclusive(sys.argv[1]); "
            "h.__enter__(); print('held', flush=True); sys.stdin.read()",
            str(out),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.dumps(
            {
                "pid": live.pid,
                "port": port,
                "host": socket.gethostname(),
                "created": psutil.Process(live.pid).create_time(),
            }
        )
        (out / tracking.SERVER_RECORD).write_text(record)
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        cmd = [sys.executable, "-m", "study.cli", "report", "--from", str(out), "--out", str(tmp_path / "rep")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert "stopping the MLflow server" not in done.stdout + done.stderr
        assert "no finished job run" in done.stderr and done.returncode == 2, done.stdout + done.stderr
        assert live.poll() is None  # the live run's server is serving still
        assert (out / tracking.SERVER_RECORD).read_text() == record and not (out / tracking.LOG_NAME).exists()
        assert not (tmp_path / "rep").exists()  # a failed report writes nothing
        assert cli.main(["ui", "--out", str(out)]) == 0  # the ui names the live server, starts none
    finally:
        holder.communicate("")
        os.killpg(live.pid, signal.SIGKILL)
        live.wait()


def test_two_runs_creating_one_experiment_at_once_both_get_it(mlflow_server, monkeypatch):
    """The race two runs of one job meet on a shared server: both look the experiment up,
    find none, and create it; the loser of the creation takes the winner's experiment."""
    import mlflow

    from study import tracking

    mlflow.set_tracking_uri(mlflow_server)
    try:
        winner = mlflow.create_experiment("raced")  # the other run, between our look-up and creation
        looked = mlflow.get_experiment_by_name
        calls = []

        def late(name):  # the first look-up happened before the other run created it
            calls.append(name)
            return None if len(calls) == 1 else looked(name)

        monkeypatch.setattr(mlflow, "get_experiment_by_name", late)
        assert tracking.get_or_create_experiment("raced") == winner and len(calls) == 2
    finally:
        mlflow.set_tracking_uri(None)
