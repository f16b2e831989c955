"""Beyond ResNets: torchvision's ViT, Swin and ConvNeXt as registry entries (and a small
ViT for CPUs), each the same function as torchvision's network, four stages for the
analyses, weight import with clear refusals, and the whole study on a tiny job."""

import json

import pandas as pd
import pytest
import torch
import torchvision
import yaml

from study import config
from study.models import IMAGENET_MEAN, IMAGENET_STD, ModelError, build_model, load_checkpoint, load_trunk_weights

NEW = ["vit_b_16", "vit_tiny_p4", "swin_t", "convnext_tiny"]


@pytest.mark.parametrize("backbone", NEW)
def test_four_stages_one_row_per_image_or_token_and_f_feeds_g(backbone):
    from study.analyses import layer_rows

    torch.manual_seed(0)
    model = build_model(backbone, 5, resolution=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        layers, emb = model.layers(x), model.f(x)
    assert len(layers) == 4 and emb.shape == (2, model.g.in_features)
    for name, act in layers.items():
        rows = layer_rows(act)
        assert rows.shape[0] % 2 == 0 and rows.shape[0] >= 2, name  # per image, or per token/position of it
        if backbone.startswith("vit"):
            tokens = (32 // model.f.backbone.patch_size) ** 2
            assert act.shape[:2] == (2, tokens) and rows.shape == (2 * tokens, model.g.in_features)
        else:
            assert act.dim() == 4 and rows.shape[1] == act.shape[1]


@pytest.mark.parametrize(
    "backbone,make",
    [
        ("vit_b_16", lambda: torchvision.models.vit_b_16(image_size=64)),
        ("swin_t", torchvision.models.swin_t),
        ("convnext_tiny", torchvision.models.convnext_tiny),
    ],
)
def test_the_study_model_is_torchvision_s_network_on_normalised_input(tmp_path, backbone, make):
    torch.manual_seed(1)
    tv = make().eval()
    path = tmp_path / f"{backbone}.pth"
    torch.save(tv.state_dict(), path)
    model = build_model(backbone, 1000, resolution=64)
    assert load_trunk_weights(model, path, keep_classifier=True) == "torchvision"
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), tv((x - mean) / std), atol=1e-5)


def test_vit_weights_of_another_side_are_interpolated_and_other_families_refused_naming_both(tmp_path):
    vit = tmp_path / "vit_b_16_at_64.pth"
    torch.save(torchvision.models.vit_b_16(image_size=64).state_dict(), vit)
    at32 = build_model("vit_b_16", 3, resolution=32)
    load_trunk_weights(at32, vit)
    assert at32.f.backbone.encoder.pos_embedding.shape == (1, 1 + 2 * 2, 768)
    with torch.no_grad():  # and it runs on images of a third side (positions interpolated per call)
        assert at32(torch.rand(1, 3, 48, 48)).shape == (1, 3)
    with pytest.raises(ModelError, match=r"vit_b_16_at_64.pth holds a vit network, not a swin_t \(swin\)"):
        load_trunk_weights(build_model("swin_t", 3), vit)
    resnet = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), resnet)
    with pytest.raises(ModelError, match=r"resnet18.pth holds a resnet network, not a vit_tiny_p4 \(vit\)"):
        load_trunk_weights(build_model("vit_tiny_p4", 3), resnet)
    with pytest.raises(ModelError, match="does not fit vit_tiny_p4"):  # same family, another size
        load_trunk_weights(build_model("vit_tiny_p4", 3), vit)


def test_the_inference_copy_of_a_family_without_batchnorm_is_the_same_function():
    from study.fastcopy import inference_copy

    torch.manual_seed(2)
    for backbone in ("vit_tiny_p4", "convnext_tiny"):
        model = build_model(backbone, 4, resolution=32).eval()
        x = torch.rand(3, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(inference_copy(model)(x), model(x), atol=1e-5), backbone


def test_the_architectures_job_and_its_plan():
    from study import cli, plan

    raw = yaml.safe_load((cli.jobs_dir() / "architectures.yaml").read_text())
    cfg = config.parse(raw, check_paths=False)
    assert cfg.pretrain.backbones == ["resnet50", "vit_b_16", "swin_t", "convnext_tiny"]
    assert {cfg.resolution(k) for k in cfg.finetune.datasets} == {224}
    unit = {"train": 1e-3, "attack": 5e-4, "infer": 2e-4, "batch": 64}
    est = plan.estimate(cfg, {"device": "NVIDIA H100", "costs": {f"{b}@224": unit for b in cfg.pretrain.backbones}})
    assert est["trials"] == 3 * 7 * 4 * (9 + 3 + 9)  # three seeds
    assert [u for u in est["unknown"] if "@224" in u] == []


# -- the whole study on a tiny job: ConvNeXt-T at 32 px (the small ViT runs the tiny job of
# test_pipeline, on the two-node cluster, with every Table-1 method and the analyses) -------
JOB = {
    "name": "arch",
    "seed": 0,
    "device": "cpu",
    "data": {"workers": 1},
    "datasets": {
        "shapes": {"params": {"train_per_class": 3, "test_per_class": 1}},
        "alphabet": {"params": {"train_per_class": 3, "test_per_class": 1}},
    },
    # stage 1 imports a torchvision ConvNeXt-T file (random weights, written by the test):
    # Ray Train's loop is the same for every family and runs in test_distributed and the
    # tiny job; shapes stays the source data the analyses need
    "pretrain": {"dataset": "shapes", "backbones": ["convnext_tiny"]},
    "finetune": {
        "datasets": ["alphabet"],
        "methods": ["full"],
        "train": {"epochs": 1, "batch_size": 32, "lr_f": 0.01, "lr_g": 0.05},
    },
    "analyses": {
        "actors": 1,
        "images": 16,
        "snapshots": [0.5],
        "cca": {"images": 16, "max_rows": 128, "resamples": 0},
        "uap": {"steps": 2, "train_images": 16},
        "mmd": {"images": 16},
        "ll": {"images": 4, "steps": 1},
    },
    "eval": {
        "batch_size": 32,
        "max_images": 16,
        # AutoAttack in its cheaper version: the standard one spends minutes on ConvNeXt on a CPU
        "attacks": [
            "pgd10_linf_0.5",
            "fgsm_linf_0.5",
            {"name": "autoattack_linf_16.0", "max_images": 4, "version": "apgd"},
        ],
    },
}


def test_the_tiny_study_runs_on_convnext(tmp_path, run_study, mlflow_server):
    import mlflow

    job, out = tmp_path / "arch.yaml", tmp_path / "out"
    weights = tmp_path / "convnext_tiny.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.convnext_tiny().state_dict(), weights)
    job.write_text(yaml.safe_dump({**JOB, "pretrain": {**JOB["pretrain"], "weights": str(weights)}}))
    run_study(job, out, timeout=900)
    df = pd.read_csv(out / "results.csv")
    clean = df[df.attack.isna()]
    assert set(zip(clean.backbone, clean.method)) == {("convnext_tiny", "full")}
    attacked = df[df.attack.notna()]
    assert set(attacked.attack) == {"pgd10_linf_0.5", "fgsm_linf_0.5", "autoattack_linf_16.0[version=apgd]"}
    assert attacked.AAI.notna().all() and (attacked.AAI <= attacked.AOI + 1e-9).all()
    found = json.loads((out / "analyses" / "analyses.json").read_text())["seeds"]["0"]["datasets"]["alphabet"]
    # SVCCA over ConvNeXt's four stages, one row per position
    cca = found["cca"]["fine-tuned|pre-trained"]["layers"]
    assert list(cca) == ["stage1", "stage2", "stage3", "stage4"]
    assert all(0 <= v <= 1 + 1e-9 for v in [*cca.values(), *found["cca"]["chance"]["layers"].values()])
    assert {"uap", "uap_transfer", "mmd", "ll"} <= set(found)
    ckpts = sorted((out / "checkpoints").glob("*.pt"))  # the imported stage, the fine-tune, its snapshot
    assert {c.name.split("-")[0] for c in ckpts} == {"pretrain", "finetune"}
    for ckpt in ckpts:  # every checkpoint reloads as the architecture it holds
        assert load_checkpoint(ckpt).backbone_name == "convnext_tiny"
    report = (out / "report" / "index.md").read_text()
    assert "## Architectures" in report and "| convnext | convnext_tiny | full |" in report
    mlflow.set_tracking_uri(mlflow_server)
    try:
        runs = mlflow.search_runs(experiment_names=["arch"])
        trial = runs[(runs["tags.study.stage"] == "finetune") & (runs["tags.study.backbone"] == "convnext_tiny")]
        loaded = mlflow.pytorch.load_model(f"runs:/{trial.run_id.iloc[0]}/model").eval()
    finally:
        mlflow.set_tracking_uri(None)
    with torch.no_grad():
        assert loaded(torch.rand(2, 3, 32, 32)).shape == (2, 26)
