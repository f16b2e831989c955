"""Known answers of the analyses, and the report page (rendered in headless Chromium)."""

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from study import analyses, claims, stats
from study.report import cells, sources, tables
from study.report import page as report_page


def test_svcca_known_answers():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 12, generator=g) @ torch.randn(12, 12, generator=g)
    assert analyses.svcca(a, a) == pytest.approx(1.0, abs=1e-9)
    m = torch.randn(12, 12, generator=g) + 3 * torch.eye(12)  # invertible
    c = torch.randn(2000, 8, generator=g) + a[:, :8]
    # plain CCA (keep every direction) cannot see an invertible linear map
    assert analyses.svcca(a @ m, c, keep=1.0) == pytest.approx(analyses.svcca(a, c, keep=1.0), abs=1e-6)
    assert analyses.svcca(a @ m, a, keep=1.0) == pytest.approx(1.0, abs=1e-6)
    noise = torch.randn(2000, 12, generator=g)
    assert analyses.svcca(a, noise) < 0.1  # independent: only sampling noise, ~ sqrt(d / n)
    with pytest.raises(ValueError, match="same rows"):
        analyses.svcca(a, a[:10])


def test_cca_reports_its_chance_level():
    """The SVCCA task's chance level: the first pair with one side's rows shuffled. Two
    models that compute the same thing score ~1, their chance level far below, and the
    level is the noise floor of the rows and units at hand (not zero)."""
    from types import SimpleNamespace

    from study.config import CCASpec

    class Net(torch.nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(seed)
            self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)

        def layers(self, x):
            h = self.a(x).relu()
            return {"layer1": h, "layer2": self.b(h).relu()}

    nets = {"x": Net(0), "y": Net(0), "z": Net(1)}
    g = torch.Generator().manual_seed(0)
    batch = [(torch.rand(24, 3, 8, 8, generator=g), torch.zeros(24, dtype=torch.long))]
    analyst = analyses.Analyst.__new__(analyses.Analyst)
    analyst.seed, analyst.spec = 0, SimpleNamespace(cca=CCASpec(images=24, max_rows=600))
    analyst.model, analyst.batches = (lambda name: nets[name]), (lambda *a, **k: batch)
    out = analyst._cca("alphabet", {"one": "x", "same": "y", "other": "z"})
    assert out["one|same"]["bottom"] == pytest.approx(1.0, abs=1e-6)
    chance = out["chance"]
    assert set(chance["layers"]) == {"layer1", "layer2"} and 0.0 < chance["bottom"] < 0.6
    assert chance["all"] < out["one|other"]["all"] < 1.0
    # the CCA claim: the fine-tuned model computes what the pre-trained one does, not the
    # standard model's; bootstrap draws of the images for every pair and seed
    from study import claims

    analyst.spec = SimpleNamespace(cca=CCASpec(images=24, max_rows=600, resamples=40))
    trio = {"fine-tuned": "x", "pre-trained": "y", "standard": "z"}
    seeds = {}
    for seed in (0, 1):
        analyst.seed = seed
        seeds[str(seed)] = {"datasets": {"alphabet": {"cca": analyst._cca("alphabet", trio)}}}
    draws = seeds["0"]["datasets"]["alphabet"]["cca"]["bottom_draws"]
    assert draws["images"] == 24 and all(len(draws[k]) == 40 for k in ("fine-tuned|pre-trained", "chance"))
    judged = claims.by_id(claims.judge(pd.DataFrame(), {"seeds": seeds}, {}), "cca")
    assert judged["verdict"] == "agree" and "above chance" in judged["detail"]
    assert "24 images, 2 seeds" in judged["detail"]
    swapped = {"fine-tuned": "x", "pre-trained": "z", "standard": "y"}  # closer to the standard model
    analyst.seed = 0
    one = {"seeds": {"0": {"datasets": {"alphabet": {"cca": analyst._cca("alphabet", swapped)}}}}}
    assert claims.by_id(claims.judge(pd.DataFrame(), one, {}), "cca")["verdict"] == "contradicts"  # one seed


def test_uap_transfer_and_mmd_run_with_imported_weights_when_the_source_data_is_there(tmp_path):
    """Imported weights (the paper's ImageNet models) with the source task named beside
    them: claims 3 and 4 get their UAP-transfer and MMD tasks; without it, neither."""
    from study import config
    from study.stages import Job

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    raw = {
        "name": "t",
        "datasets": {
            "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
            "alphabet": {"params": {"train_per_class": 2, "test_per_class": 1}},
        },
        "pretrain": {"weights": str(weights), "dataset": "shapes"},
        "finetune": {"datasets": ["alphabet"], "methods": ["scratch", "full"]},
    }
    models = {"alphabet": {"pretrained": "p.pt", "full": "f.pt", "scratch": "s.pt"}}
    job = Job(config.parse(raw), tmp_path, None)
    kinds = lambda j: sorted({t["kind"] for t in analyses._plan(j, models, 0)})  # noqa: E731
    assert "uap_transfer" not in kinds(job)  # the source's .beton files are not written yet
    for split in ("train", "test"):
        job.beton("shapes", split).parent.mkdir(parents=True, exist_ok=True)
        job.beton("shapes", split).write_bytes(b"")
    assert kinds(job) == ["cca", "ll", "mmd", "uap", "uap_transfer"]
    del raw["pretrain"]["dataset"]
    assert kinds(Job(config.parse(raw), tmp_path, None)) == ["cca", "ll", "uap"]


def test_layer_rows_are_spatial_positions():
    act = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).reshape(2, 3, 2, 2)
    rows = analyses.layer_rows(act)
    assert rows.shape == (8, 3) and rows[1].tolist() == act[0, :, 0, 1].tolist()


def test_mmd_known_answers():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 5, generator=g), torch.randn(300, 5, generator=g)
    same = analyses.mmd2(x, y)
    shifted = analyses.mmd2(x, y + 1.0)
    assert abs(same) < 0.01 and shifted > 0.1 and shifted > 20 * abs(same)
    assert analyses.mmd2(x, y + 3.0) > shifted  # further apart, larger


def test_gap_perturbation_never_exceeds_its_bound():
    gen = analyses.GapGenerator(side=16, eps=4 / 255)
    with torch.no_grad():
        for p in gen.parameters():
            p.mul_(50.0)  # saturate tanh: the bound must still hold
        d = gen()
    assert d.shape == (3, 16, 16) and float(d.abs().max()) <= 4 / 255
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))
    x = torch.rand(32, 3, 16, 16)
    delta = analyses.train_uap(model, [(x, torch.zeros(32, dtype=torch.long))], target=2, eps=8 / 255, steps=30)
    assert float(delta.abs().max()) <= 8 / 255
    eff = analyses.uap_effect(model, [(x, torch.zeros(32, dtype=torch.long))], delta, target=2)
    assert 0 <= eff["success"] <= 100 and eff["images"] == 32
    with pytest.raises(ValueError, match="eps must be positive"):
        analyses.GapGenerator(side=8, eps=0)


def _bits(n: int, correct: int, robust: int, rng) -> dict:
    """Per-image masks of one model: ``correct`` of ``n`` images right, ``robust`` of them still right."""
    order = rng.permutation(n)
    c, r = np.zeros(n, bool), np.zeros(n, bool)
    c[order[:correct]], r[order[:robust]] = True, True
    return {"correct": "".join("1" if v else "0" for v in c), "robust": "".join("1" if v else "0" for v in r)}


def _fake_results(models=None, n=200, seeds=(0, 1), rng_seed=0, **unit):
    """Result rows and per-image masks as a job writes them: one target, ``models``
    (method -> (AOI, AAI) in percent), per seed; ``unit``: job, dataset, backbone and
    source_data other than the default."""
    from study import results

    models = models or {
        "scratch": (90, 80),
        "partial": (60, 5),
        "full": (92, 40),
        "at_stage2": (85, 60),
        "dm_stage12": (88, 85),
    }
    rng = np.random.default_rng(rng_seed)
    rows, masks = [], {}
    for seed in seeds:
        for method, (aoi, aai) in models.items():
            where = {"dataset": "alphabet", "backbone": "resnet18", **unit}
            stage = "-".join([*map(str, unit.values()), method, str(seed)])
            m = _bits(n, round(aoi * n / 100), round(aai * n / 100), rng)
            masks[stage] = {"pgd10_linf_0.5": m}
            base = {
                **where,
                "method": method,
                "selected": True,
                "seed": seed,
                "stage": stage,
                "lam": 1e-3 if method.startswith("dm") else None,
            }
            rec = {"correct": m["correct"], "robust": m["robust"]}
            rows.append({**base, "AOI": aoi, "images": n})
            rows.append(
                {
                    **base,
                    "attack": "pgd10_linf_0.5",
                    "AOI": aoi,
                    "AAI": aai,
                    "DR": 100 * (aoi - aai) / aoi,
                    "images": n,
                    **results.intervals(rec, seed),
                }
            )
    return results.frame(rows), masks


def test_claims_are_judged_by_their_paired_intervals():
    from study import claims

    def verdicts(models, **kw):
        df, masks = _fake_results(models, **kw)
        return [c["verdict"] for c in claims.judge(df, {}, masks)]

    clear = verdicts({"scratch": (90, 80), "full": (92, 40)})
    assert clear[0] == "agree"
    assert verdicts({"scratch": (92, 40), "full": (90, 80)})[0] == "disagree"
    assert verdicts({"scratch": (90, 60), "full": (90, 60)}, n=100)[0] == "inconclusive"  # noise
    df, masks = _fake_results({"scratch": (90, 80), "full": (92, 40)}, seeds=(0,))
    one = claims.by_id(claims.judge(df, {}, masks), "1-dr")
    assert one["datasets"][0]["seeds"] == 1 and one["datasets"][0]["images"] == 200
    assert one["datasets"][0]["lo"] < one["datasets"][0]["effect"] < one["datasets"][0]["hi"]
    two = {"seeds": {"0": {"datasets": {"alphabet": {"mmd": {"mmd2": 0.1}}, "near": {"mmd": {"mmd2": 0.5}}}}}}
    df2 = pd.concat([df, df.assign(dataset="near", DR=df.DR * 1.5)])
    mmd = claims.by_id(claims.judge(df2, two, masks), "4-mmd")
    assert mmd["verdict"] == "inconclusive" and "at least 3" in mmd["detail"]  # two points give ρ = ±1
    three = {
        "seeds": {
            "0": {
                "datasets": {
                    d: {"mmd": {"mmd2": m}}
                    for d, m in (("alphabet", 0.1), ("near", 0.5), ("far", 0.9), ("farther", 1.3), ("farthest", 1.7))
                }
            }
        }
    }
    df5 = pd.concat(
        [
            df.assign(dataset=d, DR=df.DR + 10 * i)
            for i, d in enumerate(("alphabet", "near", "far", "farther", "farthest"))
        ]
    )
    ranked = claims.by_id(claims.judge(df5, three, masks), "4-mmd")
    assert ranked["rho"] == pytest.approx(1.0) and ranked["p"] < 0.05 and ranked["verdict"] == "agree"
    df3 = df5[df5.dataset.isin(["alphabet", "near", "far"])]
    small = claims.by_id(claims.judge(df3, three, masks), "4-mmd")  # ρ = 1 over three: p = 2/3! at best
    assert (
        small["rho"] == pytest.approx(1.0) and small["p"] == pytest.approx(1 / 3) and small["verdict"] == "inconclusive"
    )
    assert "smallest possible p is 2/3! = 0.333" in small["detail"] and "2/5!" not in ranked["detail"]


def test_a_merged_report_never_mixes_jobs_backbones_or_source_data():
    """Frames of a Table 1 job, a Table 3 job (two backbones) and a Table 4 job (another
    source), merged as `study report` merges jobs: each table row and each claim rests
    on one job's models of one backbone and source."""
    from study import claims

    parts = [
        _fake_results(
            {"scratch": (90, 80), "partial": (60, 5), "full": (92, 40)},
            seeds=(0,),
            rng_seed=1,
            job="table1",
            dataset=d,
            source_data="imagenet",
        )
        for d in ("pets", "flowers")
    ]
    parts += [
        _fake_results(
            {"full": (95 if b == "resnet50" else 93, 10)},
            seeds=(0,),
            rng_seed=2,
            job="table3",
            dataset=d,
            backbone=b,
            source_data="imagenet",
        )
        for b in ("resnet18", "resnet50")
        for d in ("pets", "flowers")
    ]
    parts += [
        _fake_results({"full": (70, 50)}, seeds=(0,), rng_seed=3, job="table4", dataset="pets", source_data="cifar10")
    ]
    df = pd.concat([p[0] for p in parts], ignore_index=True)
    masks = {k: v for _, m in parts for k, v in m.items()}
    every = claims.units(df)
    assert len(every) == 7 and {u["job"] for u in every} == {"table1", "table3", "table4"}

    t1 = tables.table1(df)  # Table 1 compares: only the units with more than the full fine-tune
    assert t1.count("**pets") == 1 and t1.count("**flowers") == 1 and "job table1" in t1
    assert "| full fine-tune | 92.00" in t1 and "95.00" not in t1 and "70.00" not in t1
    rows = [r for r in tables.table3(df).splitlines() if r.startswith("| table")]
    assert sorted(r.split(" | ")[:4] + [r.split(" | ")[4].split(" (")[0]] for r in rows) == [
        ["| table1", "resnet18", "imagenet", "2", "92.00"],
        ["| table3", "resnet18", "imagenet", "2", "93.00"],
        ["| table3", "resnet50", "imagenet", "2", "95.00"],
        ["| table4", "resnet18", "cifar10", "1", "70.00"],
    ]
    t4 = [r for r in tables.table4(df).splitlines() if r.startswith("| table")]
    assert len(t4) == 7 and [r for r in t4 if "cifar10" in r] == [
        "| table4 | cifar10 | resnet18 | pets | 70.00 [" + t4[-1].split("70.00 [")[1]
    ]
    first = claims.by_id(claims.judge(df, {}, masks), "1-dr")  # full vs standard: table1's models only
    assert [d["unit_job"] for d in first["datasets"]] == ["table1", "table1"]
    assert all(
        d["effect"] == pytest.approx(100 * (92 - 40) / 92 - 100 * (90 - 80) / 90, abs=0.01) for d in first["datasets"]
    )
    page = report_page.build(df, {}, Path(tempfile.mkdtemp()) / "report", title="merged", masks=masks)
    assert "<td>table3</td>" in page.read_text() and "resnet50" in page.read_text()


def test_the_premise_section_says_whether_pre_training_helped():
    """Stage 1's source AOI, and per unit the full fine-tune's first-epoch validation
    accuracy against the standard model's: 'pre-training helps', or says in words that
    this target does not show it."""
    df, _ = _fake_results({"scratch": (90, 80), "full": (92, 40)})
    pre = pd.DataFrame(
        [
            {
                "method": "pretrain",
                "dataset": "fashion_mnist",
                "backbone": "resnet18",
                "source": "standard",
                "seed": 0,
                "AOI": 87.5,
                "images": 156,
            }
        ]
    )
    helps = pd.concat([pre, df.assign(val_acc_1=df.method.map({"full": 60.0, "scratch": 20.0}))], ignore_index=True)
    text = tables.premise(helps)
    assert "resnet18 pre-trained (standard) on fashion_mnist: source AOI 87.5 % (156 test images)" in text
    assert "full fine-tune 60.0 % vs standard model 20.0 % (mean over 2 seeds): pre-training helps" in text
    hurts = df.assign(val_acc_1=df.method.map({"full": 10.0, "scratch": 20.0}))
    assert "this target does not show that pre-training helps" in tables.premise(hurts)
    assert tables.premise(df) == ""  # results from before the column: nothing to say


def test_dm_lambda_is_chosen_on_validation_and_judged_by_the_papers_claim():
    """DM's λ: the best validation AAI among the λ whose validation accuracy is at most
    AOI_MARGIN below the full fine-tune's; the test split plays no part. Claim 5 then
    judges that λ's model: better AAI and DR than every rival, AOI kept."""
    from study import claims, results

    def row(method, lam, val_acc, val_aai, stage):
        return {
            "dataset": "alphabet",
            "backbone": "resnet18",
            "method": method,
            "seed": 0,
            "lam": lam,
            "val_acc": val_acc,
            "val_AAI": val_aai,
            "stage": stage,
        }

    rows = [
        row("full", None, 80.0, 5.0, "full"),
        row("dm_stage12", 1.0, 79.0, 30.0, "dm1"),
        row("dm_stage12", 10.0, 70.0, 60.0, "dm10"),  # the most robust, but 10 points under full
        row("dm_stage12", 0.1, 81.0, 20.0, "dm01"),
        row("dm_stage12", 0.1, 60.0, 20.0, "dm01-lr"),
    ]
    results.select(rows)
    assert {r["stage"] for r in rows if r["chosen"]} == {"full", "dm1"}
    assert {r["stage"] for r in rows if r["selected"]} == {"full", "dm1", "dm10", "dm01"}
    old = [{**r, "val_AAI": None} for r in rows]  # trained before validation attacks: val accuracy
    results.select(old)
    assert {r["stage"] for r in old if r["chosen"]} == {"full", "dm01"}

    def fives(models):  # three seeds: two leave Student's t at 12.7 and nothing conclusive
        df, masks = _fake_results(models, seeds=(0, 1, 2))
        return claims.by_id(claims.judge(df, {}, masks), "5")

    # under PGD-10 only (no strong evaluation): robustness at most suggests or contradicts
    good = fives({"full": (92, 40), "at_stage2": (85, 60), "dm_stage12": (90, 85)})
    assert good["verdict"] == "suggests" and "AOI DM − full" in good["detail"]
    assert fives({"full": (92, 40), "at_stage2": (85, 60), "dm_stage12": (70, 68)})["verdict"] == "disagree"  # AOI
    assert fives({"full": (92, 40), "at_stage2": (85, 80), "dm_stage12": (90, 60)})["verdict"] == "contradicts"


def _screenshot(page, tmp_path):
    """The page rendered by headless Chromium: a 1200x3000 screenshot with text and figures on it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: ./run.sh installs it"
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 3000)
    assert len(set(img.resize((60, 150)).tobytes())) > 20  # rendered text and figures, not a blank page


def test_report_page_has_every_table_figure_and_claim(tmp_path):
    found = {
        "datasets": {
            "alphabet": {
                "cca": {
                    "fine-tuned|pre-trained": {"bottom": 0.9, "all": 0.7},
                    "fine-tuned|standard": {"bottom": 0.6, "all": 0.4},
                    "pre-trained|standard": {"bottom": 0.5, "all": 0.3},
                },
                "uap": {
                    "full": {
                        "success": 80.0,
                        "png": str(tmp_path / "uap-alphabet-full.png"),
                        "along_training": [{"step": 2, "success": 70.0}, {"step": 10, "success": 80.0}],
                    },
                    "scratch": {
                        "success": 10.0,
                        "png": str(tmp_path / "uap-alphabet-scratch.png"),
                        "along_training": [{"step": 2, "success": 5.0}, {"step": 10, "success": 10.0}],
                    },
                },
                "uap_transfer": {"DR": {"fine-tuned": 30.0, "standard": 2.0}},
                "mmd": {"mmd2": 0.4},
                "ll": {"pre-trained": 900.0, "standard": 300.0},
            }
        }
    }
    for k in ("full", "scratch"):
        analyses.save_perturbation_png(torch.rand(3, 8, 8) * 0.01, tmp_path / f"uap-alphabet-{k}.png")
        torch.save(torch.rand(3, 8, 8), tmp_path / f"uap-alphabet-{k}.pt")
    df, masks = _fake_results(seeds=(0, 1, 2))
    page = report_page.build(df, found, tmp_path / "report", title="fake", masks=masks)
    html = page.read_text()
    for n in range(1, 6):
        assert f"Table {n}" in html
    for f in ("fig3", "fig4", "fig5", "fig6"):
        assert f'id="{f}"' in html
    # and the corruptions' and the public backbone's threat's (empty here)
    assert len(list((tmp_path / "report").glob("fig*.png"))) == 6
    checked = json.loads((tmp_path / "report" / "claims.json").read_text())
    # no per-image UAP masks: claim 3 cannot be judged; one target: MMD neither
    verdicts = {c["id"]: c["verdict"] for c in checked}
    assert verdicts == {
        "1-dr": "agree",
        "1-aai:pgd10_linf_0.5": "agree",
        "2-dr": "agree",
        "2-aoi": "agree",
        "3-transfer": "inconclusive",
        "3-standard": "inconclusive",
        "cca": "inconclusive",  # no bootstrap draws
        "4-mmd": "inconclusive",
        "capacity": "inconclusive",  # one backbone
        "source": "inconclusive",  # one source
        "5": "suggests",  # no strong evaluation: PGD-10 carries no firm robustness verdict
        "5-others": "inconclusive",  # no DM@stage-2 or TRADES
        "corruption": "inconclusive",  # no corruptions evaluated
        "corruption-architecture": "inconclusive",
        "transfer-exposed": "inconclusive",  # no attack crafted on the public backbone
        "transfer-closed": "inconclusive",
    }
    assert html.count('class="claim"') == len(checked) and "200 test images, 3 seeds" in html
    assert "92.00 [" in html and "test images and training runs" in html and "one training run" not in html
    # a run that contradicts a claim says so
    worse, worse_masks = _fake_results(
        {**{m: v for m, v in [("at_stage2", (85, 70))]}, "dm_stage12": (88, 20)}, seeds=(0, 1, 2)
    )
    assert claims.by_id(claims.judge(worse, found, worse_masks), "5")["verdict"] == "contradicts"

    _screenshot(page, tmp_path)


DEMO = Path(__file__).parent / "fixtures" / "demo"


def test_the_demo_report_opens_with_every_table_figure_and_a_verdict_per_claim(tmp_path):
    """The demo's own numbers: ``results.csv`` and ``analyses/`` copied from a real
    ``study demo`` run (see fixtures/demo/README.md), rebuilt into the report page."""

    got = tmp_path / "analyses"
    shutil.copytree(DEMO / "analyses", got)
    found = sources.read_analyses(got)
    df = sources.read_results(DEMO / "results.csv")  # written before `setting` became `method`
    page = report_page.build(df, found, tmp_path / "report", title="demo")
    html = page.read_text()
    for n in range(1, 6):
        assert (
            f"Table {n}" in html
            and f"## Table {n}\n\n*This run has no models" not in (tmp_path / "report" / "index.md").read_text()
        )
    figs = sorted(p.name[:4] for p in (tmp_path / "report").glob("fig*.png"))
    assert figs == ["fig3", "fig4", "fig5", "fig6", "figc", "figt"]
    for f in ("fig3", "fig4", "fig5", "fig6"):
        assert f'id="{f}"' in html
    checked = claims.judge(df, found, {})
    # claim 1 under each of Table 2's 5 attacks, the corruption findings (not run there), and
    # the public backbone's threat (not run there: one line each saying what to add)
    assert len(checked) == 20 and html.count('class="claim"') == 20
    # a run from before per-image results and replicates: no claim can be judged, and each says why
    assert {c["verdict"] for c in checked} == {"inconclusive"} and all(c["detail"] for c in checked), checked
    _screenshot(page, tmp_path)


def test_the_report_says_when_stage_1_was_not_replicated():
    import pandas as pd

    rows = [{"method": "pretrain", "seed": 0}] + [{"method": "full", "seed": s} for s in (0, 1)]
    shared = tables.replicates(pd.DataFrame(rows))
    assert shared.startswith("Replicates: seeds 0, 1.") and "Stage 1 was trained once, with seed 0" in shared
    rows.append({"method": "pretrain", "seed": 1})
    assert tables.replicates(pd.DataFrame(rows)) == "Replicates: seeds 0, 1."


def test_table_intervals_are_bounds_within_the_metrics_range_and_name_what_they_cover():
    """Two seeds far apart: Student's interval reaches past 0 and 100 %; the table shows
    its bounds within 0-100 (not "50.00 ± 571.8") and says it is over training runs."""
    two = pd.DataFrame({"AOI": [5.0, 95.0], "seed": [0, 1], "images": [100, 100]})
    assert cells._fmt_ci(two, "AOI") == "50.00 [0.0, 100.0] †"
    assert "Student's t interval over the 2 seeds (training runs" in cells._basis(two)
    one = pd.DataFrame({"AOI": [80.0], "AOI_lo": [71.1], "AOI_hi": [86.7], "seed": [0], "images": [100]})
    assert cells._fmt_ci(one, "AOI") == "80.00 [71.1, 86.7]"
    assert "interval over the test images (Wilson for AOI and AAI" in cells._basis(one)
    assert "one training run" in cells._basis(one)


def test_mmd_measures_every_target_on_the_sources_scale():
    """One bandwidth from the source embeddings: the same for every target, and a target
    twice as far gets the larger MMD (a per-pair median bandwidth rescales each pair and
    can rank them the other way)."""
    g = torch.Generator().manual_seed(0)
    source = torch.randn(200, 8, generator=g)
    near, far = torch.randn(200, 8, generator=g) + 1.0, torch.randn(200, 8, generator=g) * 6.0 + 4.0
    s = analyses.median_bandwidth(source)
    # N(0, I) in 8 dimensions: |a - b|^2 is 2·χ²(8), median 14.7, so s^2 near 7.3
    assert s == analyses.median_bandwidth(source.clone()) and 6.0 < s**2 < 8.5
    assert analyses.mmd2(source, far, bandwidth=s) > analyses.mmd2(source, near, bandwidth=s) > 0


def test_spearman_permutes_one_side_exactly_up_to_seven_points():
    assert stats.spearman(range(5), [2, 4, 6, 8, 10])[1] == pytest.approx(2 / 120)
    assert stats.spearman(range(7), range(7))[1] == pytest.approx(2 / 5040)
    rho, p = stats.spearman(range(6), [1, 0, 3, 2, 5, 4])
    assert rho == pytest.approx(0.8286, abs=1e-3)
    assert stats.spearman(range(6), [1, 0, 3, 2, 5, 4], seed=7)[1] == p  # exact: no Monte Carlo draws
    assert round(p * 720) == p * 720 or abs(p * 720 - round(p * 720)) < 1e-6  # a count of the 6! pairings


def test_a_model_two_jobs_share_counts_once_and_mmd_goes_with_its_own_job():
    """table5 and table5_eq4 in one OUT share their full fine-tune and standard model (the
    same stage keys): claim 1 counts that pair once. MMD is matched to DR by job, backbone
    and dataset, not by the dataset's name alone."""
    df, masks = _fake_results({"scratch": (90, 80), "full": (92, 40)}, job="table5")
    again = df.assign(job="table5_eq4")  # the same models, reported by the second job
    both = pd.concat([df, again], ignore_index=True)
    assert len(claims.units(both)) == 2
    first = claims.by_id(claims.judge(both, {}, masks), "1-dr")
    assert [d["unit_job"] for d in first["datasets"]] == ["table5"] and "of 1 dataset" in first["detail"]

    found = {
        "seeds": {
            "0": {
                "datasets": {
                    "alphabet": {"mmd": {"mmd2": 0.2, "job": "table5", "backbone": "resnet18", "dataset": "alphabet"}},
                    "alphabet (other)": {
                        "mmd": {"mmd2": 0.9, "job": "other", "backbone": "resnet18", "dataset": "alphabet"}
                    },
                }
            }
        }
    }
    mmd = claims.mmd_by_unit(found)
    unit = claims.units(df)[0]
    assert claims.mmd_for(mmd, unit) == [0.2] and claims.mmd_for(mmd, {**unit, "job": "other"}) == [0.9]
    old = {"seeds": {"0": {"datasets": {"alphabet": {"mmd": {"mmd2": 0.4}}}}}}  # before MMD named its job
    assert claims.mmd_for(claims.mmd_by_unit(old), unit) == [0.4]


def test_every_finding_of_the_paper_is_judged():
    """Claim 1 on AAI per attack, claim 2 on AOI, claim 3's second half, capacity (Table 3)
    and source data (Table 4): each a line with its interval, agreeing where the numbers
    say so and saying what is missing where they cannot."""
    from study import claims

    rng = np.random.default_rng(5)
    df, masks = _fake_results({"scratch": (90, 80), "partial": (60, 5), "full": (92, 40)}, seeds=(0, 1, 2))
    # the standard model under FGSM too: AAI gap as under PGD-10
    extra = df[df.attack == "pgd10_linf_0.5"].assign(attack="fgsm_linf_0.5")
    fg = pd.concat([df, extra], ignore_index=True)
    masks_fg = {k: {**v, "fgsm_linf_0.5": v["pgd10_linf_0.5"]} for k, v in masks.items()}
    checked = claims.judge(fg, {}, masks_fg)
    fgsm = claims.by_id(checked, "1-aai:fgsm_linf_0.5")
    assert fgsm["verdict"] == "agree" and fgsm["datasets"][0]["effect"] == pytest.approx(40.0)
    assert claims.by_id(checked, "2-aoi")["verdict"] == "agree"  # 92 against 60
    assert claims.by_id(checked, "1-aai:pgd10_linf_0.5")["verdict"] == "agree"

    # claim 3's second half: the standard model's DR under the pre-trained UAP below TRIVIAL_DR
    def uap(standard_robust):
        ft, st = _bits(300, 270, 90, rng), _bits(300, 270, standard_robust, rng)
        transfer = {"uap_transfer": {"masks": {"fine-tuned": ft, "standard": st}}}
        return {"seeds": {"0": {"datasets": {"alphabet": transfer}}}}

    calm = claims.judge(df, uap(268), masks)  # DR 0.7
    # one seed of UAP masks: suggests / contradicts
    assert [claims.by_id(calm, k)["verdict"] for k in ("3-standard", "3-transfer")] == ["suggests", "suggests"]
    stirred = claims.by_id(claims.judge(df, uap(150), masks), "3-standard")  # DR 44
    assert stirred["verdict"] == "contradicts" and "10 − standard model's DR under it" in stirred["detail"]

    # capacity: three backbones of one target, DR falling as they grow
    parts = [
        _fake_results({"full": (90, aai)}, seeds=(0, 1, 2), rng_seed=i, dataset="pets", backbone=b, source_data="in")
        for i, (b, aai) in enumerate((("resnet18", 20), ("resnet50", 40), ("resnet101", 60)))
    ]
    cap_df = pd.concat([p[0] for p in parts], ignore_index=True)
    cap_masks = {k: v for _, m in parts for k, v in m.items()}
    cap = claims.by_id(claims.judge(cap_df, {}, cap_masks), "capacity")
    assert cap["verdict"] == "agree" and "resnet18, resnet50, resnet101" in cap["detail"]
    assert claims.by_id(claims.judge(df, {}, masks), "capacity")["detail"].startswith("needs full fine-tunes")

    # source data: ImageNet-10animals (the job's animals10) against CIFAR10, as Table 4
    parts = [
        _fake_results({"full": (90, aai)}, seeds=(0, 1, 2), rng_seed=i, dataset="nico", source_data=src)
        for i, (src, aai) in enumerate((("animals10", 30), ("cifar10", 60)))
    ]
    src_df = pd.concat([p[0] for p in parts], ignore_index=True)
    src_masks = {k: v for _, m in parts for k, v in m.items()}
    source = claims.by_id(claims.judge(src_df, {}, src_masks), "source")
    assert source["verdict"] == "agree" and "DR from imagenet10animals − from cifar10" in source["detail"]
    assert "AOI imagenet10animals − cifar10 +0.0" in source["detail"]
