"""Side by side: one `study run` per OUT (a second stops at once naming the first; the
same job and seed in two fresh folders give the same numbers), one writer per dataset
folder (two jobs sharing data.dir write each .beton once), and the splits every training
run read, as MLflow dataset inputs."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study import locks
from study.files import config_hash


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
        f"from study import locks; import os; c = locks.exclusive({str(tmp_path / 'k')!r}); c.__enter__(); os._exit(9)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9  # dies holding it, without unwinding
    with locks.exclusive(tmp_path / "k"):  # the kernel dropped it
        pass


def test_a_second_run_into_a_held_out_stops_at_once_and_the_first_is_as_a_solo_run(tmp_path, ray_local, mlflow_server):
    """One job run twice at once into two fresh folders (and a third time into the first's
    folder, which stops at once): the same seed gives the same results.csv (timings are
    not in it), per-image results and claims.json, byte for byte; each run says where its
    time went and marks its verdicts as resting on one training run."""
    import mlflow

    raw = {
        "name": "twice",
        "seed": 0,
        "device": "cpu",
        "data": {"workers": 1},
        "datasets": {"alphabet": {"params": {"train_per_class": 4, "test_per_class": 1}}},
        "pretrain": {"backbones": ["resnet18"], "weights": str(_weights(tmp_path))},
        "finetune": {
            "datasets": ["alphabet"],
            "methods": ["scratch", "full"],
            "max_concurrent_trials": 1,
            "train": {"epochs": 1, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
        },
        "eval": {"batch_size": 64, "attacks": ["pgd10_linf_0.5"]},
        "analyses": {"enabled": False},
    }
    job, out = tmp_path / "twice.yaml", tmp_path / "out"
    job.write_text(yaml.safe_dump(raw))
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "MLFLOW_TRACKING_URI": mlflow_server,
    }
    first = subprocess.Popen(_cmd(job, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    solo = tmp_path / "solo"  # the same job alone into another OUT, meanwhile: what the first must give
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
        assert second.returncode == 2 and time.monotonic() - t0 < 30
        assert f"is in use by another study run (pid {first.pid} on {socket.gethostname()}" in second.stderr
        assert "[study] data" not in second.stdout  # it prepared nothing, wrote nothing
        said = first.communicate(timeout=600)[0]
        assert first.returncode == 0, said[-3000:]
        assert alone.wait(600) == 0, alone.stdout.read()[-3000:]
    finally:
        for p in (first, alone):
            if p.poll() is None:
                p.kill()
    for name in ("results.csv", "per_image.json", "report/claims.json"):
        assert (out / name).read_bytes() == (solo / name).read_bytes(), name
    # where the time went, and the claims' lines marked as resting on one training run
    assert "[study] time: data " in said and ", stage 1 " in said and ", sweep " in said and "; total " in said
    assert re.search(r"\[study\] claim: \w+ \(one training run\): Fine-tuned models have a higher DR", said)
    checked = json.loads((out / "report" / "claims.json").read_text())
    assert checked[0]["datasets"] and checked[0]["datasets"][0]["seeds"] == 1
    assert checked[0]["covers"] == "test images" and checked[0]["datasets"][0]["covers"] == "test images"
    assert "one training run" in (out / "results.md").read_text()
    assert "one training run" in (out / "report" / "index.html").read_text()

    # the trial's run names the splits it read, with the manifests' config hashes
    train = json.loads((out / "data" / "alphabet" / "train.json").read_text())
    test = json.loads((out / "data" / "alphabet" / "test.json").read_text())
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


def test_two_jobs_sharing_a_data_dir_write_each_beton_once(tmp_path, mlflow_server):
    data = tmp_path / "shared-data"
    jobs = []
    for name in ("one", "two"):
        raw = {
            "name": name,
            "seed": 0,
            "device": "cpu",
            "data": {"workers": 1, "dir": str(data)},
            "datasets": {"shapes": {"params": {"train_per_class": 100, "test_per_class": 10}}},
            "pretrain": {"backbones": ["resnet18"], "weights": str(_weights(tmp_path)), "dataset": "shapes"},
        }
        job = tmp_path / f"{name}.yaml"
        job.write_text(yaml.safe_dump(raw))
        jobs.append(
            subprocess.Popen(
                _cmd(job, tmp_path / f"out-{name}"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": mlflow_server},
            )
        )
    logs = []
    for p in jobs:
        logs.append(p.communicate(timeout=600)[0])
        assert p.returncode == 0, logs[-1][-3000:]
    written = [
        line
        for log in logs
        for line in log.splitlines()
        if line.startswith("[study] data shapes/") and ", written (" in line
    ]
    reused = [line for log in logs for line in log.splitlines() if "already prepared" in line]
    assert len(written) == 2 and len(reused) == 2, "\n".join(logs)
    assert sorted(p.name for p in (data / "shapes").glob("*.beton")) == ["test.beton", "train.beton"]


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
    tracking.stop_orphan(out, said.append)
    assert stray.wait(20) is not None
    assert len(said) == 1 and f"pid {stray.pid}" in said[0] and "killed run" in said[0]
    # nothing to stop: the record's process is gone; a live process that is not that server
    tracking.stop_orphan(out, said.append)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = {**record, "pid": other.pid, "created": psutil.Process(other.pid).create_time()}
        (out / tracking.SERVER_RECORD).write_text(json.dumps(mine))
        tracking.stop_orphan(out, said.append)
        assert other.poll() is None and len(said) == 1
    finally:
        other.kill()


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
