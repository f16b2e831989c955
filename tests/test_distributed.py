"""Stage 1 on Ray Train: one worker on the session's local Ray, against two workers on a
fake 2-node cluster with one of them killed mid-run; MLflow's epoch history exactly once."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from study import distributed, tracking
from study.engine import TrainSettings

EPOCHS = 4


def _cfg(beton, **kw):
    settings = TrainSettings(epochs=kw.pop("epochs", EPOCHS), batch_size=64, lr_f=0.05, lr_g=0.05, warmup_epochs=0)
    return distributed.worker_config(
        beton=beton,
        dataset="alphabet",
        resolution=32,
        num_classes=26,
        backbone="resnet10",  # half a ResNet-18: the same DDP path, half the work
        objective=kw.pop("objective", "standard"),
        train=settings.model_dump(),
        seed=0,
        use_gpu=False,
        desc=kw.pop("desc", "test"),
        **kw,
    )


def train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray titles them ray::RayTrainWorker...)."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(p.info["pid"])
    return sorted(pids)


def kill_after_first_checkpoint(storage: Path, name: str, killed: list, timeout=300):
    """SIGKILLs one training worker mid-run, as soon as Ray Train has registered a
    checkpoint (its checkpoint-manager snapshot appears in storage): a report that the
    controller has not yet taken in dies with the worker, so an earlier kill would
    rightly restart from scratch."""

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (storage / name / "checkpoint_manager_snapshot.json").is_file():
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _run(mlflow_uri, name):
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("ray-train-tests") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("ray-train-tests")
    return client, client.create_run(exp_id, run_name=name).info.run_id


def _assert_each_epoch_once(client, run_id, epochs):
    for key in ("train_loss", "train_acc", "workers_in_sync"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), (key, steps)


@pytest.fixture(scope="module")
def one_worker(ray_local, small_alphabet, tmp_path_factory):
    """The reference: one worker on the session's local Ray, trained once for the module."""
    storage = tmp_path_factory.mktemp("train-one")
    state = distributed.fit(
        _cfg(small_alphabet["train"].beton, desc="one"), name="one", storage=str(storage), workers=1
    )
    return state, storage


def test_one_worker_learns(one_worker):
    one, _ = one_worker
    h = one["history"]
    assert [m["epoch"] for m in h] == list(range(1, EPOCHS + 1))
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"]
    assert one["epoch"] == EPOCHS and all(m["restarts"] == 0 for m in h)


TWO_NODES = r"""
import json, sys, threading
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
sys.path.insert(0, sys.argv[1])
from test_distributed import _cfg, kill_after_first_checkpoint
from study import distributed, tracking

beton, storage, uri, run_id = sys.argv[2:6]
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
try:
    ray.init(address=cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    killed = []
    watcher = kill_after_first_checkpoint(Path(storage), "nodes", killed)
    state = distributed.fit(_cfg(beton, desc="nodes", run_id=run_id, tracking_uri=uri),
                            name="nodes", storage=storage, workers=2, max_failures=2)
    watcher.join(timeout=1)
    print("RESULT " + json.dumps({"history": state["history"], "killed": killed,
                                   "epoch": state["epoch"]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def test_two_workers_on_a_fake_two_node_cluster_match_one_and_a_killed_worker_resumes(
    one_worker, small_alphabet, tmp_path, mlflow_server
):
    """DDP over two Ray nodes (ray.cluster_utils.Cluster), one worker SIGKILLed mid-run.
    A separate process: the session's Ray stays as it is, the cluster lives and dies with
    the subprocess."""
    client, run_id = _run(mlflow_server, "two-nodes-killed")
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(Path(__file__).parent),
            str(small_alphabet["train"].beton),
            str(tmp_path / "storage"),
            mlflow_server,
            run_id,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    h, one = res["history"], one_worker[0]["history"]
    assert [m["epoch"] for m in h] == list(range(1, EPOCHS + 1)) and res["epoch"] == EPOCHS
    # same progress as one worker: the loss falls to a similar level (one global batch size)
    assert h[-1]["train_loss"] < 0.7 * h[0]["train_loss"]
    assert abs(one[-1]["train_loss"] - h[-1]["train_loss"]) < 0.35 * one[0]["train_loss"]
    # DDP kept the workers' weights identical at every epoch, before and after the restart
    assert all(m["workers_in_sync"] == 1.0 for m in h)
    # a worker was killed mid-run; the group came back from a checkpoint, not from scratch
    assert res["killed"], "no worker was found to kill"
    assert h[0]["restarts"] == 0 and h[-1]["restarts"] >= 1
    _assert_each_epoch_once(client, run_id, EPOCHS)


def test_sync_history_logs_each_epoch_once(mlflow_server):
    client, run_id = _run(mlflow_server, "sync")
    history = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    logged = tracking.History(run_id, mlflow_server)
    assert logged.sync(history[:2]) == 2
    assert logged.sync(history) == 1  # only epoch 3 is new
    assert tracking.History(run_id, mlflow_server).sync(history) == 0  # a resumed process
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == [1, 2, 3] and sorted(logged.logged()) == [1, 2, 3]


def test_fingerprint_tells_weights_apart():
    from study.models import build_model

    torch.manual_seed(0)
    a = build_model("resnet18", 3)
    b = build_model("resnet18", 3)
    b.load_state_dict(a.state_dict())
    assert distributed.fingerprint(a) == distributed.fingerprint(b)
    with torch.no_grad():
        b.g.bias[0] += 1e-3
    assert distributed.fingerprint(a) != distributed.fingerprint(b)


@pytest.mark.parametrize("epoch,res", [(0, 160), (2, 160), (4, 176), (6, 192), (9, 192)])
def test_progressive_resizing_follows_ffcv_imagenet(epoch, res):
    spec = {"min_res": 160, "max_res": 192, "start_ramp": 2, "end_ramp": 6, "step": 16}
    assert distributed.resolution_at(epoch, spec, 224) == res
    assert distributed.resolution_at(epoch, None, 224) == 224


def test_the_local_ray_drops_only_the_autoscaling_requests_transient_warning(monkeypatch):
    """Ray Train's controller warns, with a traceback, when its autoscaling request times out
    on a busy machine; the local Ray's setup hook drops that record and no other."""
    import logging

    import ray

    from study.runtime import local_ray as runtime

    runtime.quiet_ray_process()
    runtime.quiet_ray_process()  # idempotent: one filter
    logger = logging.getLogger(runtime.AUTOSCALING_LOGGER)
    assert logger.filters.count(runtime._not_autoscaling_noise) == 1

    class Kept(logging.Handler):  # what reaches the logger's handlers, propagation aside
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    kept = Kept()
    logger.addHandler(kept)
    try:
        try:
            raise TimeoutError("GetTimeoutError")
        except TimeoutError:
            logger.warning("Failed to send resource request for train-1. If this only happens ...", exc_info=True)
        logger.warning("Failed to cancel resource request for train-1.")
        logger.error("a real error")
    finally:
        logger.removeHandler(kept)
    assert kept.messages == ["Failed to cancel resource request for train-1.", "a real error"]
    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = runtime.LocalRay()  # what a run owns: no module state
    local.ensure(None, 2)
    assert seen["runtime_env"] == {"worker_process_setup_hook": "study.runtime.local_ray.quiet_ray_process"}
    assert seen["dashboard_host"] == "127.0.0.1" and local.started


def test_the_processes_the_study_starts_get_the_telemetry_switches(monkeypatch):
    """No usage reports from a private machine: every MLflow server the study starts (a
    run's and `study ui`'s) gets MLflow's switch in its environment; a local Ray's daemons
    inherit Ray's from the driver while they start, and the driver's environment is left
    as it was after."""
    import os

    from study import tracking
    from study.runtime import local_ray

    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    assert tracking.server_env()["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_DISABLE_TELEMETRY" not in os.environ  # the server's, not this process's
    with local_ray._on_loopback():  # what ray.init runs inside
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert "RAY_USAGE_STATS_ENABLED" not in os.environ


def test_the_one_private_mlflow_api_still_caches_artifact_clients_by_run_id(mlflow_server, tmp_path):
    """MLflow keeps each run's artifact client, with the server's address inside, in a
    private cache keyed by run id alone; study.tracking clears it (its one private MLflow
    call) when a server goes, so a later server for the same store is not bypassed. This
    pins that cache's shape: an MLflow that moves it fails here, not in a report."""
    from mlflow.tracking._tracking_service import utils

    from study.tracking import connect

    client, run_id = _run(mlflow_server, "artifact-cache")
    (tmp_path / "a.txt").write_text("a")
    client.log_artifact(run_id, str(tmp_path / "a.txt"))
    assert run_id in utils._artifact_repos_cache
    connect._forget_artifact_repos()
    assert run_id not in utils._artifact_repos_cache
