import copy
from pathlib import Path

import pytest
import yaml

from study import cli, config
from study.weights import parse as parse_weights

BASE = {
    "name": "t",
    "datasets": {
        "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
        "alphabet": {"params": {"train_per_class": 2, "test_per_class": 1}},
    },
    "pretrain": {"dataset": "shapes", "backbones": ["resnet18"], "train": {"epochs": 1}},
    "finetune": {"datasets": ["alphabet"], "methods": ["scratch", "partial", "full"]},
    "eval": {"batch_size": 64},
}


def _with(path, value):
    raw = copy.deepcopy(BASE)
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("pretrain", "backbones"), ["resnet18", "resnet9"], "pretrain.backbones[1]: unknown backbone 'resnet9'"),
        (("finetune", "methods"), ["full", "half"], "finetune.methods[1]: unknown method 'half'"),
        (
            ("finetune", "methods"),
            ["full", "dm_stage12"],
            "finetune.methods: dm_stage12 start(s) from an adversarially pre-trained backbone",
        ),
        (("finetune", "methods"), ["full", "full"], "finetune.methods: entry 'full' is listed twice"),
        (
            ("finetune", "space"),
            {"lr_f": {"loguniform": [0.001, 0.1]}},
            "finetune: space.lr_f: a range needs search: random",
        ),
        (("finetune", "space"), {"lr_f": {"loguniform": [0, 0.1]}}, "finetune.space.lr_f"),
        (("finetune", "space"), {"lam": [-1.0]}, "finetune.space.lam[0]: Input should be greater than or equal to 0"),
        (("finetune", "space"), {"lr_g": []}, "finetune.space.lr_g: an empty list"),
        (("finetune", "num_samples"), 4, "finetune: num_samples is for search: random"),
        (("finetune", "at"), "standard", "finetune: at: AT@stage-2 needs an adversarial objective"),
        (("finetune", "at"), "pgd3_linf_-2", "finetune.at: attack 'pgd3_linf_-2': eps must not be negative"),
        (("finetune", "kd"), {"teacher": "pgd3_linf_4.0"}, "finetune.kd.teacher: 'pgd3_linf_4.0' is not one of"),
        (
            ("finetune", "methods"),
            ["full", "kd_stage2"],
            "finetune.kd.teacher: KD@stage-2 distils the robust source's features",
        ),
        (("finetune", "backbones"), ["resnet50"], "finetune.backbones[0]: 'resnet50' is not pre-trained"),
        (("finetune", "val_fraction"), 0.0, "finetune.val_fraction: Input should be greater than 0"),
        (
            ("pretrain", "weights"),
            {"standard": "imagenet", "pgd3_linf_-4": "imagenet"},
            "pretrain.weights.pgd3_linf_-4: attack 'pgd3_linf_-4': eps must not be negative",
        ),
        (
            ("pretrain", "weights"),
            {"standard": "imagenet", "pgd3_linf_4.0": "/nonexistent.ckpt"},
            "pretrain.weights.pgd3_linf_4.0: weights file not found",
        ),
        (("datasets", "mnist"), {}, "datasets.mnist: unknown dataset 'mnist'"),
        (("pretrain", "train", "lr"), -0.1, "pretrain.train.lr: Input should be greater than or equal to 0"),
        (("pretrain", "train", "lr"), "0.1", "pretrain.train.lr: Input should be a valid number"),
        (("pretrain", "train", "epochs"), 0, "pretrain.train.epochs: Input should be greater than 0"),
        (
            ("datasets", "alphabet", "params", "train_per_class"),
            -5,
            "datasets.alphabet: train_per_class: must be positive, got -5",
        ),
        (("datasets", "shapes", "params", "min_scale"), 0.8, "datasets.shapes: min_scale must be in (0, 0.5]"),
        (("datasets", "pets"), {"root": "/nonexistent/pets"}, "datasets.pets.root: data root does not exist"),
        (("datasets", "cifar10"), {}, "datasets.cifar10.root: dataset 'cifar10' needs a data root"),
        (("finetune", "datasets"), ["pets"], "finetune.datasets[0]: 'pets' is not a key of datasets"),
        (("pretrain", "train", "optimiser"), "sgd", "pretrain.train.optimiser: unknown field"),
        (("pretrain", "weights"), "/nonexistent.pth", "pretrain.weights: weights file not found"),
        (("eval", "attacks"), ["pgd10_linf_0.5", "cw_linf_1"], "eval.attacks[1]: unknown attack 'cw_linf_1'"),
        (("eval", "attacks"), ["pgd10_linf_-0.5"], "eval.attacks[0]: attack 'pgd10_linf_-0.5': eps must not"),
        (
            ("eval", "attacks"),
            [{"name": "pgd10_linf_0.5", "eps": "0.5"}],
            "eval.attacks[0]: attack 'pgd10_linf_0.5': eps must be a number, got '0.5'",
        ),
        (
            ("eval", "attacks"),
            [{"name": "autoattack_linf_0.5", "restarts": 2}],
            "eval.attacks[0]: attack 'autoattack_linf_0.5': unknown option 'restarts'",
        ),
        (("eval", "attacks"), ["fgsm_linf_2", "fgsm_linf_2.0"], "eval.attacks: attack 'fgsm_linf_2.0' is listed twice"),
        (
            ("pretrain", "objectives"),
            ["standard", "pgd3_linf_-4"],
            "pretrain.objectives[1]: attack 'pgd3_linf_-4': eps must not be negative",
        ),
        (("pretrain", "objectives"), ["trades_linf_8"], "pretrain.objectives[0]: unknown attack 'trades_linf_8'"),
        (
            ("pretrain", "objectives"),
            ["autoattack_linf_4.0"],
            "pretrain.objectives[0]: objective 'autoattack_linf_4.0': AutoAttack evaluates",
        ),
        (
            ("pretrain", "objectives"),
            [{"name": "pgd3_l2_3.0", "restarts": 2}],
            "pretrain.objectives[0]: objective 'pgd3_l2_3.0': restarts and max_images are evaluation options",
        ),
        (
            ("pretrain", "objectives"),
            ["pgd3_linf_4", "pgd3_linf_4.0"],
            "pretrain.objectives: objective 'pgd3_linf_4.0' is listed twice",
        ),
        (("pretrain", "scaling"), {"workers": 3}, "pretrain.train.batch_size: 128 is not divisible by"),
        (("pretrain", "scaling"), {"workers": 0}, "pretrain.scaling.workers: Input should be greater than 0"),
        (("finetune", "source"), "pgd3_linf_4.0", "finetune.source: 'pgd3_linf_4.0' is not one of pretrain.objectives"),
        (
            ("pretrain", "progressive"),
            {"min_res": 192, "max_res": 160, "start_ramp": 1, "end_ramp": 2},
            "pretrain.progressive: progressive needs min_res <= max_res",
        ),
        (("finetune", "methods_for"), {"shapes": ["full"]}, "finetune.methods_for.shapes: 'shapes' is not one of"),
        (
            ("finetune", "methods_for"),
            {"alphabet": ["fine"]},
            "finetune.methods_for.alphabet[0]: unknown method 'fine'",
        ),
        (
            ("finetune", "methods_for"),
            {"alphabet": ["dm_stage12"]},
            "finetune.methods: dm_stage12 start(s) from an adversarially pre-trained backbone",
        ),
        (
            ("eval", "attacks"),
            [{"name": "pgd10_linf_0.5", "datasets": ["pets"]}],
            "eval.attacks[0].datasets: 'pets' is not a key of datasets",
        ),
        (
            ("datasets", "shapes", "params", "by"),
            "colour",
            "datasets.shapes: by must be one of shape_texture, shape, texture",
        ),
        # meaningless numbers (issue 35): refused with the field's name
        (("eval", "attacks"), ["fgsm_linf_300"], "eval.attacks[0]: attack 'fgsm_linf_300': an L-inf eps is in 1/255"),
        (("eval", "attacks"), ["pgd10_l2_1e9"], "eval.attacks[0]: pgd10_l2_1000000000.0: an L2 eps of 1e+09 exceeds"),
        (("pretrain", "train", "lr"), float("inf"), "pretrain.train.lr: Input should be a finite number"),
        (("finetune", "train"), {"lr_f": 0.0, "lr_g": 0.0}, "finetune.train: every learning rate of what scratch"),
        (("pretrain", "train"), {"epochs": 1, "lr": 0.0}, "pretrain.train.lr: every learning rate is 0"),
        (
            ("pretrain", "weights"),
            "hf://owner/repo/../resnet18.pth",
            "pretrain.weights: hf://owner/repo/../resnet18.pth: a file path in a repository has no '..'",
        ),
    ],
)
def test_bad_configs_give_one_line_naming_the_field(path, value, message):
    with pytest.raises(config.ConfigError) as err:
        config.parse(_with(path, value))
    text = str(err.value)
    assert "\n" not in text
    if message:
        assert text.startswith(message), text
    else:
        assert "train_per_class" in text


def test_good_config_resolves_and_hashes():
    cfg = config.parse(BASE)
    assert cfg.resolution("alphabet") == 32
    assert cfg.finetune.train_for("full").settings().lr_f == 0.1
    assert cfg.hash() == config.parse(copy.deepcopy(BASE)).hash()
    assert cfg.hash() != config.parse(_with(("seed",), 1)).hash()
    over = config.parse(_with(("finetune", "overrides"), {"scratch": {"lr": 0.5}}))
    assert over.finetune.train_for("scratch").settings().lr_g == 0.5
    assert over.finetune.train_for("full").settings().lr_g == 0.1


def test_methods_and_attacks_limited_per_dataset():
    raw = _with(
        ("datasets", "near"), {"name": "shapes", "params": {"by": "shape", "train_per_class": 2, "test_per_class": 1}}
    )
    raw["finetune"] |= {"datasets": ["alphabet", "near"], "methods_for": {"near": ["full"]}}
    raw["eval"]["attacks"] = [
        "fgsm_linf_0.5",
        {"name": "pgd10_linf_0.5", "methods": ["full"], "datasets": ["alphabet"]},
    ]
    cfg = config.parse(raw)
    assert cfg.finetune.methods_of("near") == ["full"]
    assert cfg.finetune.methods_of("alphabet") == ["scratch", "partial", "full"]
    from study import sweep

    assert [(p["dataset"], p["method"]) for p in sweep.points(cfg)] == [
        ("alphabet", "scratch"),
        ("alphabet", "partial"),
        ("alphabet", "full"),
        ("near", "full"),
    ]
    suite = lambda s, d: [a.name for a in cfg.eval.suite(s, d)]  # noqa: E731
    assert suite("full", "alphabet") == ["fgsm_linf_0.5", "pgd10_linf_0.5"]
    assert suite("full", "near") == suite("scratch", "alphabet") == ["fgsm_linf_0.5"]


def test_demo_job_file_is_valid():
    cfg = config.load(cli.jobs_dir() / "demo.yaml")
    assert cfg.finetune.methods == ["scratch", "partial", "full", "at_stage2", "dm_stage12"]
    assert cfg.robust_objective() == "fgsm_linf_2.0" and cfg.source_objective() == "standard"
    names = [a.name for a in cfg.eval.suite()]  # Tables 1 and 2 need exactly these
    table2 = ["pgd10_linf_0.5", "pgd10_linf_2.0", "fgsm_linf_0.5", "fgsm_linf_2.0"]  # AutoAttack: in the strong one
    corrupted = [f"corruption_{n}_{s}" for n in ("gaussian_noise", "motion_blur", "fog") for s in (1, 3, 5)]
    # and the strong evaluation for Table 5's worst case (AutoAttack's APGD-CE and -DLR in
    # it), and three corruptions on alphabet
    # and the public backbone's threat on alphabet: crafted on f0 alone, applied to every model
    assert names == table2 + ["strong_linf_0.5[version=apgd]", "feature_linf_2.0", "surrogate_linf_2.0"] + corrupted
    threat = [a.name for a in cfg.eval.suite("scratch", "alphabet", 1) if a.kind in ("feature", "surrogate")]
    assert threat == ["feature_linf_2.0", "surrogate_linf_2.0"]
    # the white-box attack at their eps, on every seed's alphabet models: what their share is of
    assert "pgd10_linf_2.0" in [a.name for a in cfg.eval.suite("full", "alphabet", 2)]
    assert not [a for a in cfg.eval.suite("full", "letters", 0) if a.kind in ("feature", "surrogate")]
    # claim 5 rests on it: every seed of both defenses, on at least 100 images
    for seed in cfg.replicate_seeds():
        for method in ("at_stage2", "dm_stage12"):
            strong = [a for a in cfg.eval.suite(method, "alphabet", seed) if a.kind == "strong"]
            assert len(strong) == 1 and min(strong[0].max_images, cfg.eval.max_images) >= 100
    assert not any(a.kind == "corruption" for a in cfg.eval.suite("full", "letters", 0))
    # a real source task, three training runs of stage 2, three targets for the MMD claim
    assert cfg.pretrain.dataset == "fashion_mnist" and cfg.replicate_seeds() == [0, 1, 2] and not cfg.pretrain.replicate
    assert len(cfg.finetune.datasets) == 3


def test_a_bad_attack_is_refused_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import study.models

    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(study.models, "load_checkpoint", never)
    monkeypatch.setattr(study.models, "build_model", never)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with(("eval", "attacks"), [{"name": "fgsm_linf_1", "eps": "1"}])))
    out = tmp_path / "out"
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    assert "eval.attacks[0]" in capsys.readouterr().err and not out.exists()


def test_cli_unknown_backbone_exits_2_before_anything_starts(tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with(("pretrain", "backbones"), ["resnet9"])))
    out = tmp_path / "out"
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "resnet9" in err and "pretrain.backbones[0]" in err
    assert not out.exists()  # nothing started, nothing written


def test_cli_existing_out_is_not_touched_by_a_bad_job(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("precious")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with(("pretrain", "train", "lr"), -1)))
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    assert (out / "results.csv").read_text() == "precious" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("where", ["file", "read-only", "ui"])
def test_a_bad_out_is_one_line_and_exit_2_and_loses_nothing(tmp_path, capsys, where):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(BASE))
    if where == "file":
        out = tmp_path / "results.csv"
        out.write_text("precious")
        argv, says = ["run", str(job), "--out", str(out)], "exists and is not a folder"
    elif where == "read-only":  # sysfs is read-only even for root
        out = Path("/sys/study-out")
        argv, says = ["run", str(job), "--out", str(out)], "cannot write there"
    else:
        out = tmp_path / "never-ran"
        argv, says = ["ui", "--out", str(out)], "no MLflow store at"
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and says in err and "Traceback" not in err, err
    if where == "file":
        assert out.read_text() == "precious"
    assert where == "file" or not out.exists()


def test_cli_missing_job_and_bad_yaml(tmp_path):
    assert cli.main(["run", str(tmp_path / "nope.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    assert cli.main(["run", str(bad)]) == 2


def test_cli_data_prepare_twice(tmp_path, capsys):
    args = [
        "data",
        "prepare",
        "alphabet",
        "--out",
        str(tmp_path),
        "--param",
        "train_per_class=2",
        "--param",
        "test_per_class=1",
        "--workers",
        "1",
    ]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("written") == 2
    assert cli.main(args) == 0
    assert capsys.readouterr().out.count("already prepared, nothing to do") == 2
    assert cli.main(["data", "prepare", "imagenet", "--out", str(tmp_path)]) == 2
    assert cli.main(["data", "prepare", "nope", "--out", str(tmp_path)]) == 2


def test_cuda_asked_for_without_a_gpu_is_a_usage_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_with(("device",), "cuda")))
    out = tmp_path / "out"
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    assert "device: cuda" in capsys.readouterr().err and not out.exists()


def test_cluster_pretraining_job_is_valid_given_its_data(tmp_path):
    """jobs/pretrain_imagenet.yaml: everything but the shared ImageNet mount checks out."""
    from pathlib import Path

    raw = yaml.safe_load((Path(__file__).parents[1] / "jobs" / "pretrain_imagenet.yaml").read_text())
    with pytest.raises(config.ConfigError, match="datasets.imagenet.root: data root does not exist"):
        config.parse(copy.deepcopy(raw))
    raw["datasets"]["imagenet"]["root"] = str(tmp_path)
    cfg = config.parse(raw)
    names = cfg.pretrain.objective_names()
    assert len(cfg.pretrain.backbones) == 5 and len(names) == 15
    assert names[0] == "standard" and "pgd3_linf_8.0[rel_step=2.0]" in names
    assert "pgd3_l2_5.0[rel_step=2.0]" in names and "pgd3_l2_0.01[rel_step=2.0]" in names
    assert cfg.pretrain.scaling.use_gpu and cfg.finetune is None


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4", "table4_cifar10", "table5", "table5_eq4"])
def test_paper_table_jobs_are_valid_given_their_data(tmp_path, name):
    """The paper's job files validate once the data roots and weights they name exist
    (here: empty stand-ins under tmp_path), and their sweeps have the paper's shape."""
    from study import sweep

    text = (cli.jobs_dir() / f"{name}.yaml").read_text().replace("/mnt/shared", str(tmp_path))
    raw = yaml.safe_load(text)
    for spec in raw["datasets"].values():
        if "root" in spec:
            (tmp_path / spec["root"]).mkdir(parents=True, exist_ok=True)
    weights = raw["pretrain"].get("weights")  # by name (torchvision's enums, the catalog): no files
    if weights is not None:
        entries = list(weights.values()) if isinstance(weights, dict) else [weights]
        kinds = {parse_weights(w).kind for w in entries}
        assert kinds == ({"torchvision", "hub"} if name.startswith("table5") else {"torchvision"})
    cfg = config.parse(raw)
    pts = sweep.points(cfg)
    expected = {
        "table1": 7 * (9 + 3 + 9),
        "table2": 7 * (9 + 9),
        "table3": 5 * 7 * (1 + 4),
        "table4": 2 * (4 + 4),
        "table4_cifar10": 2 * (4 + 4),
        "table5": 7 * (4 * 6 + 3 * 4),
        "table5_eq4": 7 * (4 * 6 + 3 * 4),
    }
    assert len(pts) == 3 * expected[name]  # three seeds: the claims' intervals cover training runs
    assert cfg.replicate_seeds() == [0, 1, 2]
    if name.startswith("table5"):
        assert cfg.robust_objective() == "pgd3_linf_4.0" and cfg.source_objective() == "standard"
        assert cfg.pretrain.weights_for("pgd3_linf_4.0") == "salman/resnet18_linf_eps4.0"
        assert cfg.finetune.dm.form == ("eq4" if name == "table5_eq4" else "code")
    # the authors' pipeline resizes every dataset to 256 and crops 224: alphabet and CIFAR-10 too
    assert {k: cfg.resolution(k) for k in cfg.finetune.datasets} == {k: 224 for k in cfg.finetune.datasets}
