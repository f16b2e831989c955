"""Pre-trained weights by name (study.weights): the catalog, hf:// files and torchvision's
enums resolved offline from caches laid out as huggingface_hub and torch lay them out,
the sha256 pins, the errors, and `study weights list|fetch|verify`."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from study import cli, config, weights
from study.models import ModelError, build_model

REPO = "madrylab/robust-imagenet-models"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo: str, filename: str, data: bytes, commit: str = COMMIT) -> Path:
    """A file as huggingface_hub caches it: the content in blobs/<sha256>, a symlink to it
    in snapshots/<commit>/<filename>, and refs/main naming the commit."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    digest = hashlib.sha256(data).hexdigest()
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs" / digest).write_bytes(data)
    link = folder / "snapshots" / commit / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path("../" * len(Path(filename).parts)) / ".." / "blobs" / digest)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return link


def robustness_bytes(net: torch.nn.Module, mean, std) -> bytes:
    """A robustness-library checkpoint (Salman et al.'s format): the AttackerModel's state
    under "model", keys prefixed module.model. and module.normalizer."""
    state = {
        "module.normalizer.new_mean": torch.tensor(mean).view(3, 1, 1),
        "module.normalizer.new_std": torch.tensor(std).view(3, 1, 1),
    }
    state.update({f"module.model.{k}": v for k, v in net.state_dict().items()})
    return _saved({"model": state, "epoch": 90})


def _saved(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as a user sets it (huggingface_hub reads it at import: set both)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def robust18():
    torch.manual_seed(3)
    net = torchvision.models.resnet18().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    return net, robustness_bytes(net, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


@pytest.fixture
def hub(tmp_path, offline, robust18):
    """A hub cache holding Salman et al.'s L-inf 4/255 ResNet-18 (here: a random one in
    their format), a torchvision-format ResNet-18 and a README in another repo."""
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, REPO, "resnet18_linf_eps4.0.ckpt", robust18[1])
    torch.manual_seed(4)
    tv = torchvision.models.resnet18()
    put_in_hub_cache(cache, "someone/resnet18-tv", "weights/model.pth", _saved(tv.state_dict()))
    put_in_hub_cache(cache, "someone/resnet18-tv", "README.md", b"# a model card, not a checkpoint\n")
    put_in_hub_cache(cache, "someone/resnet50-tv", "model.pth", _saved(torchvision.models.resnet50().state_dict()))
    return cache, tv


def test_the_cache_fixture_is_laid_out_as_huggingface_hub_reads_it(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub[0])
    files = {(r.repo_id, f.file_name) for r in info.repos for rev in r.revisions for f in rev.files}
    assert (REPO, "resnet18_linf_eps4.0.ckpt") in files and not info.warnings
    assert {rev.commit_hash for r in info.repos for rev in r.revisions} == {COMMIT}


def test_catalog_names_and_hub_addresses_resolve_offline_to_the_same_file(hub, robust18):
    cache, _ = hub
    want = hashlib.sha256(robust18[1]).hexdigest()
    got = [
        weights.fetch(weights.parse(spec, "resnet18"), cache)
        for spec in (
            "salman/resnet18_linf_eps4.0",
            f"hf://{REPO}/resnet18_linf_eps4.0.ckpt",
            f"hf://{REPO}/resnet18_linf_eps4.0.ckpt@{COMMIT}",
            f"hf://{REPO}@main/resnet18_linf_eps4.0.ckpt",
        )
    ]
    assert {g.path for g in got} == {
        cache / f"models--madrylab--robust-imagenet-models/snapshots/{COMMIT}/resnet18_linf_eps4.0.ckpt"
    }
    assert {g.sha256 for g in got} == {want} and {g.revision for g in got} == {COMMIT}
    src = got[0].source
    assert (src.arch, src.entry["norm"], src.entry["eps"], src.published) == ("resnet18", "linf", 4.0, 52.49)
    assert got[1].source.published == 52.49  # the hub address of a catalog file knows its numbers too
    model = build_model("resnet18", 1000)
    assert weights.load(model, got[0], keep_classifier=True) == "robustness"
    net = robust18[0]
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), net((x - mean) / std), atol=1e-5)
    # a torchvision-format file on the hub, in a folder of its repo
    tv_file = weights.fetch(weights.parse("hf://someone/resnet18-tv/weights/model.pth", "resnet18"), cache)
    assert tv_file.revision == COMMIT
    target = build_model("resnet18", 5)
    assert weights.load(target, tv_file) == "torchvision"
    assert torch.equal(target.f.backbone.conv1.weight, hub[1].conv1.weight)


def test_pins_wrong_names_and_wrong_files_are_refused_with_what_to_do(hub):
    cache, _ = hub
    src = weights.parse("salman/resnet18_linf_eps4.0", "resnet18")
    right = weights.fetch(src, cache).sha256
    assert weights.fetch(src, cache, pin=right.upper()).sha256 == right
    with pytest.raises(weights.WeightsError, match=f"has sha256 {right}, not the pinned {'0' * 64}"):
        weights.fetch(src, cache, pin="0" * 64)
    with pytest.raises(
        weights.WeightsError,
        match=r"unknown weights 'salman/resnet18_linf_eps4' \(nearest: "
        r"salman/resnet18_linf_eps4.0",
    ):
        weights.parse("salman/resnet18_linf_eps4", "resnet18")
    with pytest.raises(weights.WeightsError, match="holds a resnet50, not a resnet18"):
        weights.parse("salman/resnet50_l2_eps3", "resnet18")
    with pytest.raises(weights.WeightsError, match="no IMAGENET1K_V2 weights for resnet18 .has: IMAGENET1K_V1"):
        weights.parse("IMAGENET1K_V2", "resnet18")
    readme = weights.fetch(weights.parse("hf://someone/resnet18-tv/README.md", "resnet18"), cache)
    with pytest.raises(
        ModelError,
        match=r"hf://someone/resnet18-tv/README.md \(.*README.md\): cannot be read "
        r"as a weights-only checkpoint",
    ):
        weights.load(build_model("resnet18", 3), readme)
    r50 = weights.fetch(weights.parse("hf://someone/resnet50-tv/model.pth", "resnet18"), cache)
    with pytest.raises(ModelError, match=r"hf://someone/resnet50-tv/model.pth \(.*\) does not fit resnet18"):
        weights.load(build_model("resnet18", 3), r50)
    # offline, nothing cached: it says how to get the file
    with pytest.raises(
        weights.WeightsError,
        match=r"not in the hub cache .* HF_HUB_OFFLINE is set: run "
        r"`study weights fetch salman/resnet18_l2_eps3`",
    ):
        weights.fetch(weights.parse("salman/resnet18_l2_eps3"), cache)
    with pytest.raises(
        weights.WeightsError,
        match=r"hf://someone/resnet18-tv/nothing.pth is not on the hub|"
        r"not in the hub cache",
    ):
        weights.fetch(weights.parse("hf://someone/resnet18-tv/nothing.pth"), cache)


def test_torchvision_enums_come_from_torch_s_cache_and_its_hash_prefix_is_checked(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    src = weights.parse("IMAGENET1K_V1", "resnet18")
    assert src.enum == "ResNet18_Weights.IMAGENET1K_V1" and src.published == pytest.approx(69.758)
    assert weights.parse("imagenet", "resnet50").enum == "ResNet50_Weights.IMAGENET1K_V2"  # torchvision's DEFAULT
    with pytest.raises(weights.WeightsError, match=r"not in .*torch/hub/checkpoints and downloads are off"):
        weights.fetch(src)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "resnet18-f37072fd.pth").write_bytes(_saved(torchvision.models.resnet18().state_dict()))
    with pytest.raises(weights.WeightsError, match="is damaged: its sha256 does not start with f37072fd"):
        weights.fetch(src)  # a stand-in, not torchvision's file: the name's hash prefix tells


def test_imagenet_asks_torchvision_for_the_backbone_s_default_file_and_its_hash(tmp_path, monkeypatch):
    """`weights: imagenet` downloads torchvision's DEFAULT file of the backbone into a job's
    cache, checked against the hash prefix in its name (no network here: the download is
    replaced by one that records what it was asked and fails as an unreachable host does)."""
    import torch.hub

    asked = []

    def unreachable(url, dst, hash_prefix=None, progress=True):
        asked.append((url, Path(dst), hash_prefix))
        raise OSError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(
        weights.WeightsError,
        match=r"imagenet: could not download https://download.pytorch.org/"
        r"models/resnet50-11ad3fa6.pth \(Name or service not known\)",
    ):
        weights.fetch(weights.parse("imagenet", "resnet50"), tmp_path / "cache")
    assert asked == [
        (
            "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
            tmp_path / "cache" / "torchvision" / "resnet50-11ad3fa6.pth",
            "11ad3fa6",
        )
    ]


def test_job_files_take_names_and_pins_and_the_plan_resolves_without_downloading(tmp_path, offline):
    raw = {
        "name": "w",
        "datasets": {"alphabet": {}},
        "pretrain": {
            "backbones": ["resnet18"],
            "weights": {
                "standard": "IMAGENET1K_V1",
                "pgd3_linf_4.0": {"from": "salman/resnet18_linf_eps4.0", "sha256": "A" * 64},
            },
        },
        "finetune": {"datasets": ["alphabet"], "methods": ["full", "at_stage1"]},
    }
    cfg = config.parse(raw)
    assert cfg.pretrain.weights_entry("pgd3_linf_4.0") == ("salman/resnet18_linf_eps4.0", "a" * 64)
    assert cfg.resolved()["pretrain"]["weights"]["pgd3_linf_4.0"] == {
        "from": "salman/resnet18_linf_eps4.0",
        "sha256": "a" * 64,
    }
    assert config.parse(cfg.resolved()).pretrain.weights_entry("standard") == ("IMAGENET1K_V1", None)
    from study import plan, results

    lines = "\n".join(plan.weights_lines(cfg))
    assert (
        "resnet18 (pgd3_linf_4.0): salman/resnet18_linf_eps4.0 -> hf://madrylab/robust-imagenet-models/"
        "resnet18_linf_eps4.0.ckpt (L-inf eps 4/255; published clean 52.49 %; not cached" in lines
    )
    assert "pinned sha256 aaaaaaaaaaaa" in lines and "ResNet18_Weights.IMAGENET1K_V1" in lines
    assert results.source_data(cfg, "full") == "imagenet"
    bad = [
        (
            {"pgd3_linf_4.0": {"from": "salman/resnet18_linf_eps4.0", "sha256": "xyz"}, "standard": "imagenet"},
            "pretrain.weights: pgd3_linf_4.0: sha256 is 64 hexadecimal digits, got .xyz.",
        ),
        (
            {"standard": "imagenet", "pgd3_linf_4.0": "salman/resnet50_linf_eps4.0"},
            "pretrain.weights.pgd3_linf_4.0: salman/resnet50_linf_eps4.0 holds a resnet50, not a resnet18",
        ),
        ("salman/resnet18_linf_eps4", "pretrain.weights: unknown weights 'salman/resnet18_linf_eps4' (nearest"),
    ]
    for weights_, message in bad:
        with pytest.raises(config.ConfigError, match=message.replace("(", r"\(")):
            config.parse({**raw, "pretrain": {"backbones": ["resnet18"], "weights": weights_}})


def test_an_imported_stage_is_keyed_and_recorded_by_its_file_s_sha256(tmp_path, hub, mlflow_server, capsys):
    """Stage 1 from a catalog name: the stage's identity, record and MLflow run carry the
    file's sha256 (and the hub commit); a wrong pin stops `study run` before it writes."""
    import mlflow

    from study import pretrain
    from study.stages import Job

    cache, _ = hub
    raw = {
        "name": "imported",
        "device": "cpu",
        "datasets": {"alphabet": {"params": {"train_per_class": 2}}},
        "pretrain": {"backbones": ["resnet18"], "weights": "salman/resnet18_linf_eps4.0", "weights_cache": str(cache)},
    }
    job = Job(config.parse(raw), tmp_path / "out", torch.device("cpu"), progress=False)
    digest = weights.fetch(weights.parse("salman/resnet18_linf_eps4.0"), cache).sha256
    mlflow.set_tracking_uri(mlflow_server)
    try:
        mlflow.set_experiment("imported-weights")
        with mlflow.start_run():
            stage = pretrain.pretrain(job, "resnet18", "standard")
        run = mlflow.get_run(stage.record["run_id"])
    finally:
        mlflow.set_tracking_uri(None)
    assert stage.ident["sha256"] == digest and stage.ident["weights"] == "salman/resnet18_linf_eps4.0"
    rec = stage.record
    assert (rec["weights_sha256"], rec["weights_revision"], rec["weights_format"]) == (digest, COMMIT, "robustness")
    assert run.data.params["weights_sha256"] == digest and run.data.tags["study.weights.sha256"] == digest
    assert run.data.params["weights_from"] == f"hf://{REPO}/resnet18_linf_eps4.0.ckpt"
    # the same entry, another file behind it: another stage
    other = Job(
        config.parse({**raw, "pretrain": {**raw["pretrain"], "weights": "hf://someone/resnet18-tv/weights/model.pth"}}),
        tmp_path / "out",
        torch.device("cpu"),
    )
    assert pretrain.identity(other, "resnet18", "standard")["sha256"] != digest
    job_file = tmp_path / "pinned.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                **raw,
                "pretrain": {**raw["pretrain"], "weights": {"from": "salman/resnet18_linf_eps4.0", "sha256": "0" * 64}},
            }
        )
    )
    assert cli.main(["run", str(job_file), "--out", str(tmp_path / "pinned")]) == 2
    assert not (tmp_path / "pinned").exists()  # refused before any work: no new OUT left behind
    # a file that cannot load into the backbone (another network's, or not a checkpoint at all)
    # is refused as early, before the data is prepared or MLflow started
    for bad, says in (("resnet50.pth", "does not fit resnet18"), ("garbage.pth", "garbage.pth")):
        path = tmp_path / bad
        if bad == "garbage.pth":
            path.write_bytes(b"\x00not a checkpoint" * 64)
        else:
            torch.save(torchvision.models.resnet50().state_dict(), path)
        job_file.write_text(yaml.safe_dump({**raw, "pretrain": {**raw["pretrain"], "weights": str(path)}}))
        out = tmp_path / f"late-{bad}"
        capsys.readouterr()
        assert cli.main(["run", str(job_file), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and says in err, err
        assert not out.exists(), bad  # no OUT left behind


def test_weights_list_and_fetch_on_the_command_line(hub, capsys):
    assert cli.main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "salman/resnet18_linf_eps4.0" in out and "L-inf eps 4/255" in out and "52.49" in out
    assert "salman/wide_resnet50_2_l2_eps3" in out and "ResNet50_Weights.IMAGENET1K_V2" in out
    assert "Do Adversarially Robust ImageNet Models Transfer Better?" in out and "robust-models-transfer" in out
    assert len([line for line in out.splitlines() if line.startswith("salman/") and "hf://" in line]) == 45
    assert cli.main(["weights", "fetch", "salman/resnet18_linf_eps4.0", "--cache", str(hub[0])]) == 0
    out = capsys.readouterr().out
    assert f"snapshots/{COMMIT}/resnet18_linf_eps4.0.ckpt (hub commit {COMMIT})" in out
    assert "pin it in a job: weights: {from: salman/resnet18_linf_eps4.0, sha256: " in out
    assert cli.main(["weights", "fetch", "salman/resnet18_linf_eps4"]) == 2
    assert "nearest: salman/resnet18_linf_eps4.0" in capsys.readouterr().err


def _imagenet_val(root: Path, per_class: int = 1) -> Path:
    """ROOT/val with 1000 wnid-like class folders of tiny images."""
    rng = np.random.default_rng(0)
    for c in range(1000):
        folder = root / "val" / f"n{c:08d}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{j}.png")
    return root


def test_verify_measures_the_accuracy_the_test_knows_and_fails_against_the_published_one(tmp_path, offline, capsys):
    """A ResNet-18 whose classifier always says class 0 (zero weights, a bias for class 0):
    on the first 10 images of a class-interleaved sample (classes 0..9) it gets exactly 10 %."""
    root = _imagenet_val(tmp_path / "imagenet")
    net = torchvision.models.resnet18()
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.bias[0] = 10.0
    cache = tmp_path / "hub"
    put_in_hub_cache(
        cache, REPO, "resnet18_linf_eps4.0.ckpt", robustness_bytes(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    args = ["--data", str(root), "--images", "10", "--cache", str(cache), "--resolution", "32"]
    assert cli.main(["weights", "verify", "salman/resnet18_linf_eps4.0", *args, "--attack"]) == 1
    out = capsys.readouterr().out
    assert "clean 10.00 % [1.79, 40.42] (Wilson 95 %); published 52.49 %" in out and "FAILED" in out
    assert "robust under pgd10_linf_4.0: 10.00 %; not published" in out
    hf = f"hf://{REPO}/resnet18_linf_eps4.0.ckpt"
    assert cli.main(["weights", "verify", hf, *args, "--expect", "10"]) == 0
    assert "consistent with the published number" in capsys.readouterr().out
    assert cli.main(["weights", "verify", hf, "--data", str(tmp_path / "nowhere"), "--cache", str(cache)]) == 2
    assert "nowhere/val: no ImageNet validation folder" in capsys.readouterr().err
