"""Stage 2's trial list (grid and random search), and the sweep on a local Ray: a driver
killed mid-sweep, then the job run again, finishes the remaining trials only."""

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from study import config, sweep

BASE = {
    "name": "t",
    "datasets": {
        "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
        "alphabet": {"params": {"train_per_class": 2, "test_per_class": 1}},
    },
    "pretrain": {"dataset": "shapes", "objectives": ["standard", "fgsm_linf_2.0"]},
    "finetune": {
        "datasets": ["alphabet"],
        "methods": ["scratch", "partial", "full", "dm_stage12"],
        "train": {"lr_f": 0.01, "lr_g": 0.1},
        "space": {"lr_f": [0.01, 0.03], "lr_g": [0.1], "lam": [0.0, 1.0, 500.0]},
    },
}


def _cfg(**finetune):
    raw = copy.deepcopy(BASE)
    raw["finetune"].update(finetune)
    return config.parse(raw)


def test_grid_points():
    pts = sweep.points(_cfg())
    by = {}
    for p in pts:
        by.setdefault(p["method"], []).append(p)
    assert len(by["scratch"]) == len(by["full"]) == 2  # the lr_f grid
    assert len(by["partial"]) == 1  # f is frozen: its rate changes nothing
    assert len(by["dm_stage12"]) == 6 and {p["lam"] for p in by["dm_stage12"]} == {0.0, 1.0, 500.0}
    assert all(p["lam"] is None for m in ("scratch", "partial", "full") for p in by[m])
    assert len({json.dumps(p, sort_keys=True) for p in pts}) == len(pts) == 11
    assert sweep.points(_cfg()) == pts  # stable


def test_an_override_wins_over_the_space():
    pts = sweep.points(_cfg(overrides={"scratch": {"lr": 0.2}}))
    scratch = [p for p in pts if p["method"] == "scratch"]
    assert [(p["lr_f"], p["lr_g"]) for p in scratch] == [(0.2, 0.2)]


def test_random_search_is_seeded_and_within_range():
    cfg = _cfg(
        search="random",
        num_samples=5,
        methods=["full"],
        space={"lr_f": {"loguniform": [0.001, 0.1]}, "optimizer": ["sgd", "adam"]},
    )
    pts = sweep.points(cfg)
    assert len(pts) == 5 and all(0.001 <= p["lr_f"] <= 0.1 for p in pts)
    assert {p["optimizer"] for p in pts} <= {"sgd", "adam"}
    assert pts == sweep.points(cfg)


def test_stage_identity_separates_trials(tmp_path):
    from study.stages import Job

    cfg = _cfg()
    job = Job(cfg, tmp_path, None)
    sources = {(0, "resnet18", n): {"key": n, "ckpt": "x"} for n in ("standard", "fgsm_linf_2.0")}
    keys = [sweep.trained_for(job, p, sources).key for p in sweep.points(cfg)]
    assert len(set(keys)) == len(keys)
    dm = [p for p in sweep.points(cfg) if p["method"] == "dm_stage12"][0]
    assert sweep.trained_for(job, dm, sources).ident["source_stage"] == "fgsm_linf_2.0"  # stage 1&2


def test_kd_distils_the_robust_source_unless_told_otherwise(tmp_path):
    """Shafahi et al.'s KD@stage-2: the student starts from the standard backbone and is
    pulled toward the robust source's features; kd.teacher names another."""
    from study.stages import Job

    sources = {(0, "resnet18", n): {"key": f"key-{n}", "ckpt": "x"} for n in ("standard", "fgsm_linf_2.0")}
    for kd, teacher in (({}, "fgsm_linf_2.0"), ({"teacher": "standard"}, "standard")):
        cfg = _cfg(methods=["kd_stage2"], kd=kd)
        stage = sweep.trained_for(Job(cfg, tmp_path, None), sweep.points(cfg)[0], sources)
        obj = stage.ident["objective"]
        assert (obj["teacher"], obj["teacher_key"]) == (teacher, f"key-{teacher}")
        assert stage.ident["source_stage"] == "key-standard"


def test_stage_keys_stay_put_across_versions(tmp_path):
    """A stage's key is what finds its finished model again: these keys were those of the
    version before replicates, so an OUT folder of that version is reused, not retrained;
    a job option like ``deterministic`` (how kernels run, not what is trained) is no part
    of them. A change here makes every user retrain: it must be deliberate."""
    from study import objectives, pretrain
    from study.stages import Job, Trained

    for cfg in (_cfg(), config.parse({**copy.deepcopy(BASE), "deterministic": True})):
        job = Job(cfg, tmp_path, None)
        keys = {
            objectives.objective_name(o): Trained(
                job, "pretrain", pretrain.identity(job, "resnet18", objectives.objective_name(o))
            ).key
            for o in cfg.pretrain.objective_specs()
        }
        assert keys == {"standard": "9c1c9f3b0cd743e6", "fgsm_linf_2.0": "b7fc4e1ae4f04fe3"}
        sources = {(0, "resnet18", n): {"key": k, "ckpt": "x"} for n, k in keys.items()}
        assert [sweep.trained_for(job, p, sources).key for p in sweep.points(cfg)][::3] == [
            "2037a66bb2442dcb",
            "733b55b12e8e2b8b",
            "2c2e3298cba2724b",
            "020382068c1d172f",
        ]

    # the partial fine-tune: BatchNorm now trains by default (a new key); with partial_bn:
    # frozen, what every earlier version did, it keeps its old key
    job = Job(_cfg(partial_bn="frozen"), tmp_path, None)
    partial = [p for p in sweep.points(job.cfg) if p["method"] == "partial"]
    assert [sweep.trained_for(job, p, sources).key for p in partial] == ["3675fa8e9cc0d520"]
    job = Job(_cfg(), tmp_path, None)
    assert [sweep.trained_for(job, p, sources).key for p in partial] != ["3675fa8e9cc0d520"]


# -- the driver dies mid-sweep ------------------------------------------------------------
def _job(tmp_path: Path) -> Path:
    """Stage 1 trains a ResNet-10 on Ray Train (one worker), stage 2 two trials."""
    pre = {
        "dataset": "shapes",
        "backbones": ["resnet10"],
        "scaling": {"workers": 1},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01},
    }
    raw = {
        "name": "killed",
        "seed": 0,
        "device": "cpu",
        "data": {"workers": 1},
        "datasets": {
            "shapes": {"params": {"train_per_class": 4, "test_per_class": 1}},
            "alphabet": {"params": {"train_per_class": 6, "test_per_class": 2}},
        },
        "pretrain": pre,
        "finetune": {
            "datasets": ["alphabet"],
            "methods": ["scratch", "full"],
            "train": {"epochs": 2, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
            "max_concurrent_trials": 1,
        },
        "eval": {"batch_size": 64, "max_images": 26, "attacks": ["fgsm_linf_0.5"]},
        "analyses": {"enabled": False},  # the sweep is what this test kills; test_pipeline runs them
    }
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _finished(out: Path) -> dict:
    """stage record -> its modification time, for trials trained and attacked."""
    done = {}
    for rec in (out / "checkpoints").glob("finetune-*.json"):
        if rec.name.endswith(".eval.json"):
            continue
        ev = rec.with_name(rec.stem + ".eval.json")
        if ev.is_file() and json.loads(ev.read_text()).get("logged"):
            done[rec.name] = rec.stat().st_mtime_ns
    return done


def _listening(tree) -> set:
    """(process name, address, port) of every listening socket of ``tree``'s processes."""
    import psutil

    found = set()
    for p in tree:
        with __import__("contextlib").suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((p.name(), c.laddr.ip, c.laddr.port))
    return found


def _loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_two_local_runs_listen_on_loopback_only_a_killed_one_leaves_nothing_and_both_end_alike(tmp_path):
    """Two runs of one job on one host at once, each starting its own Ray (Ray Train in
    stage 1, Tune in stage 2) and MLflow server, as on a laptop (no RAY_ADDRESS, no
    tracking URI): every socket of their process trees listens on 127.0.0.1 and neither
    meets the other's Ray. One is SIGKILLed (its process group) mid-sweep: no process of it
    is left; one of its finished trials' checkpoints is then damaged; its rerun resumes,
    trains that trial again and ends with the same results.csv as the other run, beside
    which `study report` ran while it was live (it must leave the run alone)."""
    import contextlib

    import psutil

    job = _job(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    out, alone = tmp_path / "out", tmp_path / "alone"

    def cmd(o):
        return [sys.executable, "-m", "study.cli", "run", str(job), "--out", str(o), "--quiet"]

    def start(o):
        return subprocess.Popen(
            cmd(o), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )

    # The run left alone starts once the first has finished stage 1: both Rays then run side
    # by side, and the one left alone, a whole stage behind, is still live when the first is
    # killed after its first trial (started together, it could have finished by then).
    procs = [start(out)]
    proc = procs[0]
    seen, sockets = {}, set()
    try:
        deadline = time.monotonic() + 900  # a bound for a hang, not a speed check: slow hosts vary 2x
        while time.monotonic() < deadline and len(_finished(out)) < 1 and proc.poll() is None:
            if len(procs) == 1 and any((out / "checkpoints").glob("pretrain-*.json")):
                procs.append(start(alone))
            with contextlib.suppress(psutil.Error):
                tree = _tree(proc.pid)
                seen.update({p.pid: p for p in tree})
                sockets |= _listening(tree + (_tree(procs[1].pid) if len(procs) > 1 else []))
            time.sleep(0.5)
        assert len(procs) == 2, "the first run finished a trial before its stage-1 record was seen"
        other = procs[1]
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        before = _finished(out)
        assert len(before) == 1  # of its two trials
        names, ports = {name for name, *_ in sockets}, {port for *_, port in sockets}
        mlflow_port = json.loads((out / "mlflow-server.json").read_text())["port"]
        assert {"gcs_server", "raylet"} <= names and mlflow_port in ports, sockets  # Ray's and MLflow's, seen
        # every socket on the loopback: Ray's, MLflow's, and Ray Train's torch.distributed
        # rendezvous store (study.runtime._store_on_loopback)
        assert [s for s in sockets if s[0].startswith("ray::RayTrainWorker")], sockets  # seen while it trained
        outside = [s for s in sockets if not _loopback(s[1])]
        assert not outside, sorted(outside)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep
        proc.wait(30)
        first = proc.stdout.read().decode()
        # a user looks at the live run: the report uses its MLflow server and stops nothing
        assert other.poll() is None
        record = (alone / "mlflow-server.json").read_text()
        look = [sys.executable, "-m", "study.cli", "report", "--from", str(alone), "--out", str(tmp_path / "rep")]
        looked = subprocess.run(look, env=env, capture_output=True, text=True, timeout=600)
        said = looked.stdout + looked.stderr
        assert looked.returncode in (0, 2) and "stopping the MLflow server" not in said and "Traceback" not in said, (
            said
        )
        assert (alone / "mlflow-server.json").read_text() == record
        assert other.wait(600) == 0
        logs = [first, other.stdout.read().decode()]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    left = list(seen.values())
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]  # Ray, its workers, the MLflow server: all gone
    # and a finished trial's checkpoint is damaged meanwhile (truncated to a third)
    damaged = out / "checkpoints" / (sorted(before)[0].removesuffix(".json") + ".pt")
    blob = damaged.read_bytes()
    damaged.write_bytes(blob[: len(blob) // 3])
    rerun = subprocess.run(cmd(out), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    logs.append(rerun.stdout + rerun.stderr)
    assert "restoring the sweep" in rerun.stdout
    said = [line for line in rerun.stdout.splitlines() if "does not match its record" in line]
    assert len(said) == 1 and damaged.name in said[0] and "training it again" in said[0], rerun.stdout[-3000:]
    kept = damaged.with_name(damaged.name + ".damaged")  # nothing the user had is deleted
    assert kept.read_bytes() == blob[: len(blob) // 3]
    after = _finished(out)
    assert len(after) == 2 and after[sorted(before)[0]] != before[sorted(before)[0]]  # trained again
    # the killed, damaged and resumed run ends as the one left alone; each met its own Ray only
    assert (out / "results.csv").read_bytes() == (alone / "results.csv").read_bytes()
    assert all("Found multiple active Ray instances" not in x for x in logs), [x[-2000:] for x in logs]


def test_asha_stops_weak_trials_early(tmp_path, ray_local):
    """The sweep's Tuner with the job's ASHA scheduler: trials whose validation accuracy
    trails stop at a rung, the best runs every epoch."""
    from ray import tune

    def _toy_trial(config):  # nested: pickled by value, Ray workers cannot import tests/
        p = config["point"]
        for epoch in range(1, 9):  # a learning curve whose height is the point's "quality"
            tune.report({"val_acc": p["quality"] * epoch})

    ft = _cfg(scheduler={"type": "asha", "grace_period": 2, "reduction_factor": 2}, max_concurrent_trials=2).finetune
    # strongest first: ASHA judges a trial at a rung against those that reached it before,
    # so in this order every later (weaker) trial meets a better one there
    pts = [{"quality": q} for q in (8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0)]
    tuner = sweep.make_tuner(tune.with_resources(_toy_trial, {"cpu": 1}), pts, ft, str(tmp_path), "asha", max_epochs=8)
    grid = tuner.fit()
    epochs = {r.config["point"]["quality"]: r.metrics["training_iteration"] for r in grid}
    assert epochs[8.0] == 8 and min(epochs.values()) < 8, epochs
