"""The public-backbone threat: transfer attacks crafted on the pre-trained model f₀ alone
(study.attacks.transfer, study.threat), and what they do to the models of a unit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import SIM_JOB

from study import config, contract, threat
from study.attacks import AttackError, Transfer, parse_attack
from study.attacks.transfer import Features, apply, craft
from study.models import build_model, save_checkpoint


def _images(n=32, seed=3):
    return contract.probe_images((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, n, seed)


def _batches(x, y, size=16):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_the_names_parse_and_say_their_options():
    f = parse_attack("feature_linf_2.0")
    assert isinstance(f, Transfer) and (f.kind, f.steps, f.random_start, f.layer) == ("feature", 10, True, "")
    assert parse_attack("feature_l2_0.5[layer=layer1,steps=20]").name == "feature_l2_0.5[steps=20,layer=layer1]"
    s = parse_attack({"name": "surrogate_linf_0.5", "max_images": 26})
    assert s.kind == "surrogate" and not s.random_start and s.max_images == 26 and s.name == "surrogate_linf_0.5"
    with pytest.raises(AttackError, match="unknown option 'layer'"):
        parse_attack("surrogate_linf_0.5[layer=layer1]")
    with pytest.raises(AttackError, match="at least one step"):
        parse_attack("feature_linf_0.5[steps=0]")


def test_the_feature_attack_is_label_blind():
    torch.manual_seed(0)
    f0 = build_model("resnet10", 5, 32).eval()
    x = _images()
    item = parse_attack("feature_linf_4.0")
    y = torch.randint(0, 5, (len(x),))
    a = craft(Features(f0), _batches(x, y), item, None, seed=1)
    b = craft(Features(f0), _batches(x, y[torch.randperm(len(y))]), item, None, seed=1)
    assert torch.equal(a, b) and a.abs().amax() <= item.eps_pixels + 1e-7 and a.abs().amax() > 0
    low = craft(Features(f0, "layer1"), _batches(x, y), parse_attack("feature_linf_4.0[layer=layer1]"), 8, seed=1)
    assert low.shape == (8, 3, 32, 32) and not torch.equal(low, a[:8])


def test_a_model_that_never_saw_f0_is_less_affected_than_its_fine_tune(tmp_path):
    """A fine-tune keeps f₀'s features (here: all of them, with a head of its own); the
    standard model has features of its own. Perturbations that move f₀'s features flip far
    more of the fine-tune's answers than of the standard model's."""
    torch.manual_seed(0)
    f0 = build_model("resnet10", 5, 32).eval()
    fine_tune = build_model("resnet10", 5, 32)
    fine_tune.load_state_dict(f0.state_dict())
    fine_tune.reset_classifier(5)
    torch.manual_seed(1)
    standard = build_model("resnet10", 5, 32).eval()
    x = _images(64)
    item = parse_attack("feature_linf_8.0")
    delta = craft(Features(f0), _batches(x, torch.zeros(len(x), dtype=torch.long)), item, None, seed=0)
    torch.save({"delta": delta.half()}, tmp_path / "d.pt")
    bound = replace(item, path=str(tmp_path / "d.pt"))
    flipped = {}
    for name, model in (("fine-tune", fine_tune.eval()), ("standard", standard)):
        with torch.no_grad():
            own = model(x).argmax(1)  # its own answers as the labels: AOI 100
        rec = apply(model, _batches(x, own), bound)
        assert rec["AOI"] == 100.0 and rec["max_delta"] <= item.eps_pixels + 1e-6
        flipped[name] = 100.0 - rec["AAI"]
    assert flipped["fine-tune"] > flipped["standard"] + 20, flipped


def test_crafted_once_per_unit_and_reused_by_every_model(tmp_path, monkeypatch):
    """The driver crafts each item once per (f₀, target, seed); a second pass crafts
    nothing; every model of the unit is bound to the same file."""
    from study.pipeline import prepare_data
    from study.stages import Job

    raw = {
        **SIM_JOB,
        "seeds": [0, 1],
        "pretrain": {**SIM_JOB["pretrain"], "replicate": False},
        "eval": {"max_images": 16, "attacks": ["pgd10_linf_0.5", "feature_linf_2.0", "surrogate_linf_2.0"]},
    }
    job = Job(config.parse(raw), tmp_path / "out", torch.device("cpu"), progress=False)
    prepare_data(job)
    ckpt = tmp_path / "f0.pt"
    save_checkpoint(build_model("resnet18", 8, 32), ckpt)
    sources = {(s, "resnet18", "standard"): {"key": "f0key", "ckpt": str(ckpt)} for s in (0, 1)}
    crafted = []
    real = threat.craft

    def counting(*args, **kw):
        crafted.append(args[2].name)
        return real(*args, **kw)

    monkeypatch.setattr(threat, "craft", counting)
    monkeypatch.setattr(threat.tracking, "log_metrics", lambda m: None)
    monkeypatch.setattr(threat.tracking, "log_artifact", lambda *a: None)
    assert threat.craft_all(job, sources, log=lambda s: None) == 4  # 2 items × 2 seeds, one target and backbone
    assert sorted(crafted) == ["feature_linf_2.0"] * 2 + ["surrogate_linf_2.0"] * 2
    assert threat.craft_all(job, sources, log=lambda s: None) == 0 and len(crafted) == 4
    paths = {
        m: [i.path for i in job.suite(m, "target", "resnet18") if isinstance(i, Transfer)] for m in ("scratch", "full")
    }
    assert paths["scratch"] == paths["full"] and len(paths["full"]) == 2
    assert [i.name for i in job.suite("pretrain", "source", "resnet18")] == ["pgd10_linf_0.5"]
    index = threat.read_index(job.out)
    assert {e["source"] for e in index.values()} == {"f0key"} and all(e["images"] == 16 for e in index.values())
    surrogate = [e for k, e in index.items() if "surrogate" in k]
    assert all(0 <= e["probe_train_acc"] <= 100 for e in surrogate)
