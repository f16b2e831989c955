"""The cluster path that can be checked here: cluster.yaml against Ray's own launcher
schema, no port open to the world, and `study plan` (trials and GPU-hours, no Ray)."""

import copy
import json
import subprocess
import sys

import pytest
import yaml

from study import cli, config, plan

ROOT = cli.jobs_dir().parent


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    else:
        yield str(node)


def test_cluster_yaml_passes_rays_validation_and_opens_no_port_to_the_world():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs first
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu1"]["node_config_typo"] = {}
    with pytest.raises(Exception, match="node_config_typo"):
        validate_config(prepare_config(broken))
    # Ray's AWS launcher opens SSH to 0.0.0.0/0 in any security group it makes itself;
    # it makes none when every node type names its own
    assert "security_group" not in raw["provider"]
    for name, node in raw["available_node_types"].items():
        assert node["node_config"].get("SecurityGroupIds"), name
    text = list(_strings(raw))  # comments are not config
    assert not any("0.0.0.0" in s or "::/0" in s for s in text)
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the job API: through `ray dashboard` only
    assert "mlflow server" in " ".join(raw["head_setup_commands"])
    # a job's driver may land on any node (--entrypoint-num-gpus): each one finds MLflow
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in " ".join(raw["worker_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=" in head
    assert any("uv sync --locked" in c for c in raw["setup_commands"])
    assert any("libturbojpeg0-dev" in c for c in raw["setup_commands"])


def test_plan_prints_trials_and_hours_without_ray(tmp_path):
    costs = tmp_path / "costs.json"
    unit = {"train": 1e-3, "attack": 5e-4, "infer": 2e-4, "batch": 64}
    costs.write_text(
        json.dumps({"device": "NVIDIA H100 80GB HBM3", "costs": {"resnet18@224": unit, "resnet18@32": unit}})
    )
    code = (
        "import sys; from study import cli; rc = cli.main(sys.argv[1:]); "
        "print('RAY', 'ray' in sys.modules); sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "plan", str(ROOT / "jobs" / "table1.yaml"), "--costs", str(costs), "--no-measure"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "stage 2: 441 trials" in out and "GPU-hours" in out and "RAY False" in out  # 147 × three seeds
    assert "not counted: nico" in out  # an ImageFolder of unknown size is said, not guessed


def test_plan_arithmetic_and_the_gpu_hour_limit(tmp_path):
    raw = {
        "name": "p",
        "datasets": {"alphabet": {"params": {"train_per_class": 10, "test_per_class": 4}}},
        "pretrain": {"backbones": ["resnet18"], "weights": "imagenet"},
        "finetune": {"datasets": ["alphabet"], "methods": ["scratch"], "train": {"epochs": 3}, "val_fraction": 0.1},
        "eval": {"attacks": ["pgd10_linf_0.5"]},
    }
    cfg = config.parse(raw)
    unit = {"train": 1.0, "attack": 0.5, "infer": 0.25, "batch": 8}
    fixed = {"trial": 7.0}
    est = plan.estimate(cfg, {"device": "gpu", "costs": {"resnet18@32": unit}, "fixed": fixed}, plan.EVERY_STEP)
    n_train, n_test = 260, 104
    expected = 3 * (n_train * 0.9 * 1.0 + n_train * 0.1 * 0.25)  # training, validation each epoch
    expected += n_test * 0.25 + n_test * (10 * 0.5 + 2 * 0.25)  # the clean pass, PGD-10
    assert est["trials"] == 1 and est["stages"]["sweep"]["seconds"] == pytest.approx(7.0 + expected)
    # the analyses and the fixed costs around the stages count too
    assert est["seconds"] > est["stages"]["sweep"]["seconds"] and est["wall"] > est["stages"]["sweep"]["wall"]
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps({"device": "gpu", "costs": {"resnet18@32": unit}}))
    job = tmp_path / "p.yaml"
    job.write_text(yaml.safe_dump({**raw, "limits": {"gpu_hours": 0.01, "costs": str(costs)}}))
    assert cli.main(["run", str(job), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()  # refused before anything started
    with pytest.raises(config.ConfigError, match="gpu_hours needs costs"):
        config.parse({**raw, "limits": {"gpu_hours": 5}})
    big = copy.deepcopy(raw)
    big["finetune"]["resources"] = {"gpus": 0.5}
    with pytest.raises(config.ConfigError, match="max_concurrent_trials"):
        config.parse({**big, "limits": {"gpus": 4}})
    big["finetune"]["max_concurrent_trials"] = 8
    config.parse({**big, "limits": {"gpus": 4}})


def test_plan_sizes_a_per_class_sample_of_a_published_dataset():
    """fashion_mnist and imagenet: their published sizes, or k per class of them."""
    raw = {
        "name": "p",
        "datasets": {
            "fashion_mnist": {"root": "/", "params": {"train_per_class": 2000}},
            "imagenet": {"root": "/", "params": {"train_per_class": 1, "test_per_class": 1}},
        },
        "pretrain": {"dataset": "fashion_mnist"},
    }
    cfg = config.parse(raw)
    assert plan.split_sizes(cfg, "fashion_mnist") == (20000, 10000)
    assert plan.split_sizes(cfg, "imagenet") == (1000, 1000)
