"""Common corruptions: the library's own output, repeatable per (seed, image, corruption,
severity), bad input refused before any work, the numbers built on them, and their claims."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from study import claims, config, corruptions
from study.evaluate import mask_bits

# the corruptions whose output depends on the random draw (the others are deterministic
# functions of the image: blurs, contrast, brightness, jpeg, pixelate, saturate)
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "speckle_noise",
    "spatter",
}


def _images(n=3, side=32, seed=0):
    return (np.random.default_rng(seed).random((n, side, side, 3)) * 255).astype(np.uint8)


def test_each_corruption_is_the_library_s_own_output_for_the_same_image_severity_and_seed():
    from imagecorruptions import corrupt, get_corruption_names

    assert corruptions.SUBSETS["all"] == tuple(get_corruption_names("all"))
    assert corruptions.COMMON == tuple(get_corruption_names("common"))
    images = _images(2)
    for name in corruptions.SUBSETS["all"]:
        ours = corruptions.corrupt_images(images, 5, name, 3, seed=7)
        for i, img in enumerate(images):
            s = corruptions.image_seed(7, 5 + i, name, 3)
            np.random.seed(s)
            kw = {"seed": s} if name in corruptions.OWN_SEED else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = corrupt(img, severity=3, corruption_name=name, **kw)
            assert np.array_equal(ours[i], theirs), name


_TWICE = """
import hashlib, sys, numpy as np
from study import corruptions
img = (np.random.default_rng(0).random((2, 32, 32, 3)) * 255).astype(np.uint8)
seed = int(sys.argv[1])
for name in corruptions.SUBSETS["all"]:
    out = corruptions.corrupt_images(img, 0, name, 4, seed)
    print(name, hashlib.sha256(out.tobytes()).hexdigest())
"""


def _digests(seed: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _TWICE, str(seed)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(line.split() for line in done.stdout.splitlines())


def test_the_same_seed_gives_the_same_images_in_a_new_process_and_other_seeds_other_images():
    first, again, other = _digests(0), _digests(0), _digests(1)
    assert first == again  # impulse_noise (scikit-image) and glass_blur (numba) included
    assert {n for n in first if first[n] != other[n]} == RANDOM
    # and within one process the global numpy generator is left as the caller had it
    np.random.seed(3)
    want = np.random.rand()
    np.random.seed(3)
    corruptions.corrupt_images(_images(1), 0, "gaussian_noise", 2, 0)
    assert np.random.rand() == want


def test_accuracy_counts_right_answers_on_corrupted_images_and_the_clean_ones_on_the_same():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)).eval()
    x = torch.from_numpy(_images(10)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)  # every clean image right
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    item = corruptions.Corruption("gaussian_noise", 5)
    rec = corruptions.accuracy(model, batches, item, seed=0)
    assert rec["AOI"] == 100.0 and rec["images"] == 10 and rec["attack"] == "corruption_gaussian_noise_5"
    xc = torch.cat([corruptions.corrupt_batch(b, first, item, 0) for b, first in ((x[:6], 0), (x[6:], 6))])
    with torch.no_grad():
        want = model(xc).argmax(1) == y
    assert rec["robust"].tolist() == want.tolist()
    assert rec["AAI"] == pytest.approx(100 * want.float().mean().item())
    assert 0 < rec["max_delta"] <= 1
    capped = corruptions.accuracy(model, batches, item, max_images=7, seed=0)
    assert capped["images"] == 7 and capped["robust"].tolist() == want[:7].tolist()  # the same images, cut


def test_mce_and_relative_mce_by_hand():
    names = ["corruption_fog_1", "corruption_fog_3", "corruption_snow_1"]
    ref = dict(zip(names, [80.0, 60.0, 70.0]))  # errors 20, 40, 30; clean error 10
    acc = dict(zip(names, [85.0, 55.0, 85.0]))  # errors 15, 45, 15; clean error 5
    e = corruptions.corruption_errors(acc, 95.0, ref, 90.0)
    assert e["CE"]["fog"] == pytest.approx(100 * 60 / 60) and e["CE"]["snow"] == pytest.approx(50.0)
    # relative: (15-5 + 45-5) / (20-10 + 40-10) = 50/40; snow: 10/20
    assert e["relative_CE"]["fog"] == pytest.approx(125.0) and e["relative_CE"]["snow"] == pytest.approx(50.0)
    assert e["mCE"] == pytest.approx(75.0) and e["relative_mCE"] == pytest.approx(87.5)


JOB = {
    "name": "c",
    "datasets": {
        "shapes": {"params": {"train_per_class": 3, "test_per_class": 1}},
        "fashion": {"name": "fashion_mnist", "resolution": 28},
        "alphabet": {"params": {"train_per_class": 3, "test_per_class": 1}},
    },
    "pretrain": {"dataset": "shapes", "backbones": ["resnet10"]},
    "finetune": {"datasets": ["alphabet", "fashion"], "methods": ["scratch", "full"]},
    "eval": {"attacks": ["pgd10_linf_0.5"], "corruptions": {"names": "common", "datasets": ["alphabet"]}},
}


def _cli(tmp_path, corruptions_spec, capsys):
    from study import cli

    job = {**JOB, "eval": {**JOB["eval"], "corruptions": corruptions_spec}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    code = cli.main(["run", str(path), "--out", str(out)])
    return code, capsys.readouterr().err, out


@pytest.mark.parametrize(
    "spec,says",
    [
        ({"names": ["gaussian_noise", "fogg"]}, "unknown corruption 'fogg'; known: gaussian_noise, shot_noise"),
        ({"names": "commons"}, "unknown corruption subset 'commons'"),
        ({"severities": [1, 6]}, "corruption severities are integers 1-5, got [1, 6]"),
        ({"severities": [0]}, "corruption severities are integers 1-5"),
        # Fashion-MNIST at its own 28 px: the library needs 32
        ({"names": ["fog"], "datasets": ["fashion"]}, "fog cannot run on 'fashion' at 28 px"),
        ({"names": ["fog"]}, "fog cannot run on 'fashion' at 28 px"),
    ],
)
def test_bad_corruptions_exit_2_with_one_line_before_any_work(tmp_path, capsys, spec, says):
    code, err, out = _cli(tmp_path, spec, capsys)
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and says in lines[0] and "eval.corruptions" in lines[0], err
    assert not out.exists()  # nothing prepared, no MLflow started


def test_the_suite_gets_one_item_per_corruption_and_severity_where_it_applies():
    cfg = config.parse(JOB, check_paths=False)
    items = cfg.eval.suite("full", "alphabet", 0)
    assert [a.name for a in items[:2]] == ["pgd10_linf_0.5", "corruption_gaussian_noise_1"]
    assert len(items) == 1 + 15 * 5 and {a.kind for a in items[1:]} == {"corruption"}
    assert [a.name for a in cfg.eval.suite("full", "fashion", 0)] == ["pgd10_linf_0.5"]
    assert corruptions.parse("corruption_zoom_blur_2") == corruptions.Corruption("zoom_blur", 2)
    assert corruptions.parse("pgd10_linf_0.5") is None


# -- the claims, on simulated masks ---------------------------------------------------------
ITEMS = ["corruption_fog_1", "corruption_fog_3", "corruption_snow_2"]


def _frame(models: dict, seeds=(0, 1, 2), n=400, rng=None) -> tuple[pd.DataFrame, dict]:
    """Results rows and per-image masks of models (name -> (backbone, method, clean p, p
    under corruption)) on one target, every seed."""
    rng = rng or np.random.default_rng(0)
    rows, masks = [], {}
    for seed in seeds:
        for backbone, method, clean_p, corrupt_p in models.values():
            stage = f"{backbone}-{method}-{seed}"
            base = {
                "job": "j",
                "dataset": "alphabet",
                "backbone": backbone,
                "method": method,
                "source_data": None if method == "scratch" else "imagenet",
                "source": None if method == "scratch" else "standard",
                "seed": seed,
                "selected": True,
                "chosen": True,
                "stage": stage,
                "images": n,
            }
            correct = rng.random(n) < clean_p
            rows.append({**base, "attack": "pgd10_linf_0.5", "AOI": 100 * correct.mean(), "AAI": 0.0})
            masks[stage] = {"pgd10_linf_0.5": {"correct": mask_bits(torch.tensor(correct)), "robust": "0" * n}}
            for item in ITEMS:
                robust = rng.random(n) < corrupt_p
                rows.append({**base, "attack": item, "AOI": 100 * correct.mean(), "AAI": 100 * robust.mean()})
                masks[stage][item] = {
                    "correct": mask_bits(torch.tensor(correct)),
                    "robust": mask_bits(torch.tensor(robust)),
                }
    from study.results import frame

    return frame(rows), masks


def test_the_corruption_claim_follows_the_gap_in_corruption_error():
    worse = {"std": ("resnet50", "scratch", 0.9, 0.7), "full": ("resnet50", "full", 0.9, 0.55)}
    df, masks = _frame(worse)
    got = claims.by_id(claims.judge(df, {}, masks), "corruption")
    (unit,) = got["datasets"]
    assert got["verdict"] == "agree" and unit["seeds"] == 3 and unit["images"] == 400
    assert unit["effect"] == pytest.approx(15, abs=3) and unit["covers"] == "test images and training runs"
    same = {"std": ("resnet50", "scratch", 0.9, 0.6), "full": ("resnet50", "full", 0.9, 0.6)}
    df, masks = _frame(same, rng=np.random.default_rng(1))
    assert claims.by_id(claims.judge(df, {}, masks), "corruption")["verdict"] == "inconclusive"
    plain = df[~df.attack.str.startswith("corruption_")]
    missing = claims.by_id(claims.judge(plain, {}, masks), "corruption")
    assert missing["verdict"] == "inconclusive" and "eval.corruptions" in missing["detail"]


def test_the_architecture_claim_compares_each_contender_with_resnet50_on_relative_error():
    models = {
        "r50": ("resnet50", "full", 0.9, 0.5),  # loses 40 points
        "swin": ("swin_t", "full", 0.8, 0.7),  # loses 10
        "vit": ("vit_b_16", "full", 0.9, 0.5),  # as much as ResNet-50
    }
    df, masks = _frame(models)
    got = claims.by_id(claims.judge(df, {}, masks), "corruption-architecture")
    per = {d["what"]: d for d in got["datasets"]}
    assert set(per) == {"relative corruption error resnet50 − swin_t", "relative corruption error resnet50 − vit_b_16"}
    assert per["relative corruption error resnet50 − swin_t"]["verdict"] == "agree"
    assert per["relative corruption error resnet50 − swin_t"]["effect"] == pytest.approx(30, abs=4)
    assert per["relative corruption error resnet50 − vit_b_16"]["verdict"] == "inconclusive"
    assert got["verdict"] == "inconclusive"  # one of two contenders: not more than half
    alone = df[df.backbone != "resnet50"]
    says = claims.by_id(claims.judge(alone, {}, masks), "corruption-architecture")
    assert not says["datasets"] and "resnet50" in says["detail"]


def test_the_report_has_the_corruption_table_and_figure(tmp_path):
    from study.report import page

    models = {"std": ("resnet10", "scratch", 0.9, 0.7), "full": ("resnet10", "full", 0.9, 0.55)}
    df, masks = _frame(models, seeds=(0,))
    grid = corruptions.example_grid(_images(1)[0], ["fog", "snow"], [1, 3])
    examples = {"grid": grid, "names": ["fog", "snow"], "severities": [1, 3], "dataset": "alphabet"}
    page.build(df, {}, tmp_path, masks=masks, examples=examples)
    md = (tmp_path / "index.md").read_text()
    assert "## Common corruptions (Hendrycks & Dietterich 2019)" in md
    assert "| model | clean | mean under corruption | mCE | relative mCE | fog | snow |" in md
    assert "one training run" in md and "figc_corruptions.png" in md
    assert (tmp_path / "figc_corruptions.png").stat().st_size > 10_000
    assert grid.shape == (2, 2, 32, 32, 3)
    checked = json.loads((tmp_path / "claims.json").read_text())
    assert {c["id"] for c in checked} >= {"corruption", "corruption-architecture"}


def test_plan_counts_the_corruptions_two_passes_and_the_host_s_corrupting_per_image():
    from study import plan

    raw = {
        "name": "p",
        "datasets": {"alphabet": {"params": {"train_per_class": 10, "test_per_class": 4}}},
        "pretrain": {"backbones": ["resnet18"], "weights": "imagenet"},
        "finetune": {"datasets": ["alphabet"], "methods": ["scratch"], "train": {"epochs": 3}, "val_fraction": 0.1},
        "eval": {"attacks": ["pgd10_linf_0.5"]},
    }
    unit = {"train": 1.0, "attack": 0.5, "infer": 0.25, "batch": 8}
    costs = {"device": "gpu", "costs": {"resnet18@32": unit}}
    without = plan.estimate(config.parse(raw), costs)["seconds"]
    raw["eval"]["corruptions"] = {"names": ["fog", "snow"], "severities": [1, 5], "max_images": 50}
    added = plan.estimate(config.parse(raw), costs)["seconds"] - without
    assert added == pytest.approx(4 * 50 * (2 * 0.25 + corruptions.Corruption("fog", 3).host_seconds(32)))
