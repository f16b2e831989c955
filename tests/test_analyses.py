"""Known answers of the analyses, and the report page (rendered in headless Chromium)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from study import analyses, report


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


def _fake_results():
    """Result rows as a job writes them: one target, the Table 1 and Table 5 models."""
    rows = []
    for setting, aoi, aai in (("scratch", 90, 80), ("partial", 60, 5), ("full", 92, 40),
                              ("at_stage2", 85, 70), ("dm_stage12", 88, 75)):
        base = {"dataset": "alphabet", "backbone": "resnet18", "method": setting, "selected": True,
                "stage": setting, "lam": 1e-3 if setting.startswith("dm") else None}
        rows.append({**base, "AOI": aoi})
        rows.append({**base, "attack": "pgd10_linf_0.5", "AOI": aoi, "AAI": aai, "DR": 100 * (aoi - aai) / aoi})
    from study import results

    return results.frame(rows)


def _screenshot(page, tmp_path):
    """The page rendered by headless Chromium: a 1200x3000 screenshot with text and figures on it."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is missing: ./run.sh installs it"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000",
                    f"--screenshot={shot}", page.as_uri()], check=True, timeout=120,
                   capture_output=True)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 3000)
    assert len(set(img.resize((60, 150)).tobytes())) > 20  # rendered text and figures, not a blank page


def test_report_page_has_every_table_figure_and_claim(tmp_path):
    found = {"datasets": {"alphabet": {
        "cca": {"fine-tuned|pre-trained": {"bottom": 0.9, "all": 0.7},
                "fine-tuned|standard": {"bottom": 0.6, "all": 0.4},
                "pre-trained|standard": {"bottom": 0.5, "all": 0.3}},
        "uap": {"full": {"success": 80.0, "png": str(tmp_path / "uap-alphabet-full.png"),
                         "along_training": [{"step": 2, "success": 70.0}, {"step": 10, "success": 80.0}]},
                "scratch": {"success": 10.0, "png": str(tmp_path / "uap-alphabet-scratch.png"),
                            "along_training": [{"step": 2, "success": 5.0}, {"step": 10, "success": 10.0}]}},
        "uap_transfer": {"DR": {"fine-tuned": 30.0, "standard": 2.0}},
        "mmd": {"mmd2": 0.4}, "ll": {"pre-trained": 900.0, "standard": 300.0}}}}
    for k in ("full", "scratch"):
        analyses.save_perturbation_png(torch.rand(3, 8, 8) * 0.01, tmp_path / f"uap-alphabet-{k}.png")
        torch.save(torch.rand(3, 8, 8), tmp_path / f"uap-alphabet-{k}.pt")
    df = _fake_results()
    page = report.build(df, found, tmp_path / "report", title="fake")
    html = page.read_text()
    for n in range(1, 6):
        assert f"Table {n}" in html
    for f in ("fig3", "fig4", "fig5", "fig6"):
        assert f'id="{f}"' in html
    assert len(list((tmp_path / "report").glob("fig*.png"))) == 4
    checked = report.claims(df, found)
    assert [c["verdict"] for c in checked] == ["agree", "agree", "agree", "undetermined", "agree"]
    assert html.count('class="claim"') == 5
    # a run that contradicts a claim says so
    worse = df.copy()
    worse.loc[worse.method == "dm_stage12", "AAI"] = 1.0
    assert report.claims(worse, found)[4]["verdict"] == "disagree"

    _screenshot(page, tmp_path)


DEMO = Path(__file__).parent / "fixtures" / "demo"


def test_the_demo_report_opens_with_every_table_figure_and_a_verdict_per_claim(tmp_path):
    """The demo's own numbers: ``results.csv`` and ``analyses/`` copied from a real
    ``study demo`` run (see fixtures/demo/README.md), rebuilt into the report page."""

    got = tmp_path / "analyses"
    shutil.copytree(DEMO / "analyses", got)
    found = report.read_analyses(got)
    df = report.read_results(DEMO / "results.csv")  # written before `setting` became `method`
    page = report.build(df, found, tmp_path / "report", title="demo")
    html = page.read_text()
    for n in range(1, 6):
        assert f"Table {n}" in html and f"## Table {n}\n\n*This run has no models" not in (
            tmp_path / "report" / "index.md").read_text()
    assert sorted(p.name[:4] for p in (tmp_path / "report").glob("fig*.png")) == ["fig3", "fig4", "fig5", "fig6"]
    for f in ("fig3", "fig4", "fig5", "fig6"):
        assert f'id="{f}"' in html
    checked = report.claims(df, found)
    assert len(checked) == 5 and html.count('class="claim"') == 5
    assert {c["verdict"] for c in checked} <= {"agree", "disagree"}, checked  # each decided by this run
    _screenshot(page, tmp_path)
