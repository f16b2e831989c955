import pytest
import torch
from torch import nn

from study.attacks import AttackError, parse_attack, perturb, robust_accuracy


def test_names_follow_the_paper():
    a = parse_attack("pgd10_linf_0.5")
    assert (a.kind, a.norm, a.steps, a.random_start) == ("pgd", "linf", 10, False)
    assert a.eps_pixels == pytest.approx(0.5 / 255)
    assert a.step_pixels == pytest.approx(1.25 * (0.5 / 255) / 10)  # the paper's step size
    f = parse_attack("fgsm_linf_2.0")
    assert (f.steps, f.random_start, f.step_pixels) == (1, False, pytest.approx(2 / 255))
    assert parse_attack("pgd20_l2_3").eps_pixels == 3.0  # L2 in pixel norm
    assert parse_attack({"name": "pgd10_linf_0.5", "random_start": True, "restarts": 3}).restarts == 3
    assert parse_attack("pgd10_linf_0.5").name == "pgd10_linf_0.5"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("cw_linf_1", "unknown attack 'cw_linf_1'"),
        ("pgd10_linf_-0.5", "eps must not be negative"),
        ({"name": "pgd10_linf_0.5", "eps": -1}, "eps must not be negative"),
        ({"name": "pgd10_linf_0.5", "eps": "0.5"}, "eps must be a number"),
        ({"name": "fgsm_linf_1", "restarts": True}, "restarts must be an integer"),
        ({"name": "fgsm_linf_1", "steps": 3}, "unknown option 'steps'"),
        ({"name": "pgd10_linf_1", "restarts": 3}, "restarts without random_start"),
        ({"name": "pgd10_linf_1", "precision": "fp16"}, "precision must be one of auto, fp32, bf16"),
        (0.5, "an attack is a name"),
    ],
)
def test_bad_attacks_are_refused(spec, message):
    with pytest.raises(AttackError, match=message):
        parse_attack(spec)


def _linear(w, b):
    """A two-class linear model on 1x4x4 'images': logit_1 - logit_0 = <w, x> + b."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros(16), w]))
        model[1].bias.copy_(torch.tensor([0.0, b]))
    return model


@pytest.mark.parametrize("norm,dual", [("linf", 1), ("l2", 2)])
def test_pgd_reaches_the_closed_form_worst_case_of_a_linear_model(norm, dual):
    torch.manual_seed(0)
    w = torch.randn(16)
    model = _linear(w, 0.0)
    x = 0.25 + 0.5 * torch.rand(256, 1, 4, 4)  # inside [0,1] with room for the perturbation
    margin = x.flatten(1) @ w
    y = (margin > 0).long()
    eps_written = 8.0 if norm == "linf" else 0.2
    attack = parse_attack({"name": f"pgd10_{norm}_{eps_written}", "random_start": False})
    eps = attack.eps_pixels
    out = perturb(model, x, y, attack, early_stop=False)
    # the worst case moves every margin towards the boundary by eps * ||w||_dual-norm
    shift = eps * w.abs().sum() if norm == "linf" else eps * w.norm()
    new_margin = out.x_adv.flatten(1) @ w
    assert torch.allclose((margin - new_margin).abs(), shift.expand(256), atol=1e-5)
    # robust exactly when the margin exceeds the shift: the closed-form robust accuracy
    res = robust_accuracy(model, [(x, y)], attack)
    closed_form = 100.0 * (margin.abs() > shift).float().mean().item()
    assert res["AAI"] == pytest.approx(closed_form) and res["AOI"] == 100.0
    assert dual in (1, 2)


def test_attack_stays_in_the_ball_and_in_range_and_touches_no_parameter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 5, (32,))
    x[:, :, 0, 0] = 0.0
    x[:, :, 1, 1] = 1.0  # pixels on the edge of [0,1] must be clipped, not pushed out
    for name in (
        "pgd10_linf_16",
        "fgsm_linf_8",
        "pgd10_l2_0.5",
        {"name": "pgd10_linf_16", "random_start": True},
        {"name": "pgd10_l2_0.5", "random_start": True},
    ):
        attack = parse_attack(name)
        out = perturb(model, x, y, attack, early_stop=False)
        delta = (out.x_adv - x).flatten(1)
        size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        assert (size <= attack.eps_pixels + 1e-6).all(), name
        assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters())
    assert model.training  # its mode is given back


def test_early_stop_spends_no_compute_on_broken_samples():
    seen = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _linear(torch.ones(16), -8.0)  # fooled by a tiny push for most inputs

        def forward(self, x):
            seen.append(len(x))
            return self.net(x)

    model = Counting()
    x = torch.full((64, 1, 4, 4), 0.5)
    x[:8] = 0.9  # 8 samples far from the boundary: the attack keeps going on them only
    y = (x.flatten(1).sum(1) - 8 > 0).long()
    attack = parse_attack({"name": "pgd10_linf_1", "precision": "fp32"})  # bf16 is tested below
    out = perturb(model, x, y, attack)
    assert out.fooled[8:].all() and not out.fooled[:8].any()
    assert seen[0] == 64 and seen[-1] == 8  # broken samples leave, the robust 8 stay to the end
    assert all(a >= b for a, b in zip(seen, seen[1:])) and sum(seen) < 0.5 * 64 * 11
    seen.clear()
    perturb(model, x, y, attack, early_stop=False)
    assert seen[:10] == [64] * 10


def test_a_stream_of_batches_keeps_the_pool_full():
    """Broken samples leave and the next batch's samples take their place: every pass but
    the last few runs on a full batch, and the results come back in image order."""
    seen = []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _linear(torch.ones(16), -8.0)

        def forward(self, x):
            seen.append(len(x))
            return self.net(x)

    batches = []
    for _ in range(3):
        x = torch.full((64, 1, 4, 4), 0.5)
        x[:8] = 0.9  # robust; the other 56 break at the first step
        batches.append((x, (x.flatten(1).sum(1) - 8 > 0).long()))
    res = robust_accuracy(Counting(), batches, parse_attack({"name": "pgd10_linf_1", "precision": "fp32"}))
    assert res["AOI"] == 100 and res["AAI"] == pytest.approx(100 * 8 / 64)
    assert res["robust"].tolist() == ([True] * 8 + [False] * 56) * 3
    pooled = list(seen)
    seen.clear()
    for batch in batches:  # the same images one batch at a time: as many sample-passes ...
        robust_accuracy(Counting(), [batch], parse_attack({"name": "pgd10_linf_1", "precision": "fp32"}))
    assert sum(pooled) == sum(seen)
    assert len(pooled) < 0.75 * len(seen)  # ... in fewer, fuller passes


def test_bf16_steps_never_count_a_sample_broken_that_fp32_does_not(trained):
    from study.fastcopy import inference_copy

    model, batches = trained
    fast = inference_copy(model)
    for name in ("pgd10_linf_2.0", "fgsm_linf_4.0"):  # 1/255: some runs train a model that keeps every sample
        half = parse_attack({"name": name, "precision": "bf16"})
        out = perturb(fast, *batches[0], half)
        assert out.fooled.any()
        with torch.no_grad():
            still = fast(out.x_adv.float()).argmax(1) == batches[0][1]
        assert not (still & out.fooled).any(), name  # every break holds in fp32
        exact = robust_accuracy(fast, batches, parse_attack({"name": name, "precision": "fp32"}))
        rounded = robust_accuracy(fast, batches, half)
        assert rounded["precision"] == "bf16" and exact["precision"] == "fp32"
        assert rounded["AOI"] == exact["AOI"] and abs(rounded["AAI"] - exact["AAI"]) <= 3.0


def test_bf16_judges_every_last_iterate_in_fp32():
    """A model whose bf16 logits never show a break (they lean 5 towards the true class)
    is still broken wherever fp32 breaks it: the last iterate's verdict is fp32's."""

    class Lying(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _linear(torch.ones(16), -7.75)  # fp32 margin 0.25 on x = 0.5

        def forward(self, x):
            logits = self.net(x)
            if torch.is_autocast_enabled(x.device.type):
                logits = logits + torch.tensor([0.0, 5.0])
            return logits

    x, y = torch.full((32, 1, 4, 4), 0.5), torch.ones(32, dtype=torch.long)
    half = robust_accuracy(Lying(), [(x, y)], parse_attack({"name": "pgd10_linf_8", "precision": "bf16"}))
    exact = robust_accuracy(Lying(), [(x, y)], parse_attack({"name": "pgd10_linf_8", "precision": "fp32"}))
    assert half["precision"] == "bf16" and half["AOI"] == exact["AOI"] == 100
    assert half["AAI"] == exact["AAI"] == 0  # bf16 alone would have called all 32 robust


def test_bf16_samples_near_a_break_share_their_fp32_passes():
    """Samples that bf16 calls broken wait and are judged together, not one fp32 pass
    per bf16 pass; their verdicts are those of a plain fp32 attack."""
    calls, sizes = [], []

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _linear(torch.ones(16), -7.0)

        def forward(self, x):
            calls.append("bf16" if torch.is_autocast_enabled(x.device.type) else "fp32")
            sizes.append((calls[-1], len(x)))
            return self.net(x)

    torch.manual_seed(0)
    batches = []
    for _ in range(4):  # fp32 margins from -0.28 to 1: the samples break at different steps
        x = (0.5 - torch.rand(64, 1, 1, 1) * 0.08).expand(64, 1, 4, 4).contiguous()
        batches.append((x, torch.ones(64, dtype=torch.long)))
    half = robust_accuracy(Counting(), batches, parse_attack({"name": "pgd10_linf_8", "precision": "bf16"}))
    verdicts = calls.count("fp32") - len(batches)  # less the clean pass of each batch
    assert calls.count("bf16") >= 10 and verdicts < 0.7 * calls.count("bf16"), str(sizes)
    exact = robust_accuracy(Counting(), batches, parse_attack({"name": "pgd10_linf_8", "precision": "fp32"}))
    assert half["robust"].tolist() == exact["robust"].tolist()
    assert half["correct"].tolist() == exact["correct"].tolist()


def test_eps_zero_gives_aai_equal_aoi_and_targeted_needs_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    x, y = torch.rand(40, 3, 4, 4), torch.randint(0, 3, (40,))
    res = robust_accuracy(model, [(x, y)], parse_attack("pgd10_linf_0"))
    assert res["AAI"] == res["AOI"] and res["DR"] == 0
    with pytest.raises(AttackError, match="needs target labels"):
        perturb(model, x, y, parse_attack({"name": "pgd10_linf_8", "targeted": True}))
    target = (y + 1) % 3
    out = perturb(model, x, y, parse_attack({"name": "pgd50_linf_255", "targeted": True}), target=target)
    assert out.fooled.float().mean() > 0.9  # a huge budget reaches the target class
    assert (model(out.x_adv).argmax(1)[out.fooled] == target[out.fooled]).all()


def test_on_a_trained_model_stronger_attacks_never_give_higher_aai(trained):
    from study.fastcopy import inference_copy

    model, batches = trained
    model = inference_copy(model)  # what evaluations attack
    aai = {
        name: robust_accuracy(model, batches, parse_attack(name))["AAI"]
        for name in (
            "fgsm_linf_2.0",
            "pgd5_linf_2.0",
            "pgd10_linf_2.0",
            "pgd20_linf_2.0",
            "pgd10_linf_0.5",
            "pgd10_linf_1.0",
            "pgd10_linf_0.0",
        )
    }
    clean = robust_accuracy(model, batches, parse_attack("pgd10_linf_0.0"))
    assert clean["AOI"] > 30  # the model learned something, so there is something to break
    assert aai["pgd10_linf_0.0"] == clean["AOI"]
    assert aai["pgd20_linf_2.0"] <= aai["pgd10_linf_2.0"] <= aai["pgd5_linf_2.0"]
    # From the clean image the paper's step (1.25 eps / steps) reaches the corner FGSM
    # jumps to wherever the gradient's sign holds for 8 of 10 steps, and then keeps
    # climbing. That is not a theorem for every image (a sign that flips keeps PGD inside
    # the ball), so one image of slack; a broken PGD loses by far more.
    one_image = 100 / sum(len(y) for _, y in batches)
    assert aai["pgd10_linf_2.0"] <= aai["fgsm_linf_2.0"] + one_image
    assert aai["pgd10_linf_2.0"] <= aai["pgd10_linf_1.0"] <= aai["pgd10_linf_0.5"] <= clean["AOI"]
    rs = {"name": "pgd5_linf_1.0", "random_start": True}
    one = robust_accuracy(model, batches, parse_attack(rs), seed=3)["AAI"]
    three = robust_accuracy(model, batches, parse_attack({**rs, "restarts": 3}), seed=3)["AAI"]
    assert three <= one  # restarts only add chances to break a sample
    res = robust_accuracy(model, batches, parse_attack("pgd10_linf_2.0"))
    assert res["max_delta"] <= res["eps_pixels"] + 1e-6 and res["in_range"]
    assert res["vanishing_gradients"] == 0
    assert res["DR"] == pytest.approx(100 * (res["AOI"] - res["AAI"]) / res["AOI"])


def test_autoattack_names_and_options():
    a = parse_attack("autoattack_linf_0.5")
    assert (a.kind, a.norm, a.eps_pixels, a.name) == (
        "autoattack",
        "linf",
        pytest.approx(0.5 / 255),
        "autoattack_linf_0.5",
    )
    assert parse_attack({"name": "autoattack_l2_0.5", "max_images": 64}).max_images == 64
    with pytest.raises(AttackError, match="unknown option 'rel_step'"):
        parse_attack({"name": "autoattack_linf_0.5", "rel_step": 2.0})
    with pytest.raises(AttackError, match="max_images must be >= 1"):
        parse_attack({"name": "pgd10_linf_0.5", "max_images": 0})
    # an option that changes the attack changes its name, so tables never mix it up
    assert parse_attack({"name": "pgd10_linf_2.0", "rel_step": 2.5}).name == "pgd10_linf_2.0[rel_step=2.5]"
    assert parse_attack({"name": "pgd10_linf_2.0", "max_images": 5}).name == "pgd10_linf_2.0"


def test_inference_copy_is_the_same_function_and_leaves_the_model_alone(trained):
    from study.fastcopy import PhaseConv2d, SmallMapConv2d, inference_copy

    model, batches = trained
    x = batches[0][0][:32]
    fast = inference_copy(model)
    with torch.no_grad():
        assert (fast(x) - model(x)).abs().max() < 1e-3
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in fast.parameters())
    # the input gradient (the stem's in its polyphase form, layer3 and layer4 on their
    # 2x2 and 1x1 maps as dense matrices) is the model's too
    assert isinstance(fast.f.backbone.conv1, PhaseConv2d)
    small = [m for m in fast.modules() if isinstance(m, SmallMapConv2d)]
    assert len(small) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 1
    dense = [m for m in small if m._dense]
    assert x.shape[-1] == 32 and len(dense) == 7  # 3 in layer3, 4 in layer4
    grads = []
    for m in (model.eval(), fast):
        xx = x.clone().requires_grad_(True)
        grads += torch.autograd.grad(nn.functional.cross_entropy(m(xx), batches[0][1][:32]), xx)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * float(grads[0].abs().max()))


def test_autoattack_is_not_above_pgd_on_the_same_images(trained):
    """At 16/255 APGD-CE breaks what it can quickly, so the standard AutoAttack stays cheap."""
    from study.fastcopy import inference_copy

    model, batches = trained
    model = inference_copy(model)
    pgd = robust_accuracy(model, batches, parse_attack("pgd10_linf_16.0"), max_images=24)
    aa = robust_accuracy(model, batches, parse_attack({"name": "autoattack_linf_16.0", "max_images": 24}))
    assert aa["images"] == pgd["images"] == 24 and aa["AOI"] == pgd["AOI"]
    assert aa["AAI"] <= pgd["AAI"]
    assert not (aa["robust"] & ~pgd["correct"]).any()  # robust only where clean-correct
    assert aa["max_delta"] <= aa["eps_pixels"] + 1e-6 and aa["in_range"]
    zero = robust_accuracy(model, batches, parse_attack("autoattack_linf_0"), max_images=24)
    assert zero["AAI"] == zero["AOI"]


# -- the attack core: one step, two drivers; a pluggable loss --------------------------------
@pytest.mark.parametrize(
    "spec",
    [
        "pgd5_linf_4.0",
        {"name": "pgd5_linf_4.0", "random_start": True},
        "fgsm_l2_0.5",
        {"name": "pgd3_linf_4.0", "loss": "cw"},
    ],
)
def test_the_fixed_batch_pgd_and_the_stream_take_the_same_iterates(trained, spec):
    """Adversarial training's ``pgd`` and the evaluator's stream (no early exit, fp32)
    call the same ``ascend``: bit for bit the same last iterates."""
    from study.attacks.engine import _Stream, pgd

    model, batches = trained
    x, y = batches[0][0][:48], batches[0][1][:48]
    attack = parse_attack(spec)
    fixed = pgd(model.eval(), x, y, attack, generator=torch.Generator().manual_seed(5))
    streamed = torch.empty_like(x)
    for out, _ in _Stream(model, [(x, y, None)], attack, False, torch.Generator().manual_seed(5)):
        streamed[out.ids] = out.cur
    assert torch.equal(fixed, streamed)
    assert (fixed - x).abs().max() > 0


def test_with_early_stop_an_unbroken_sample_ends_on_the_same_iterate(trained):
    from study.attacks.engine import _Stream, pgd

    model, batches = trained
    x, y = batches[0]
    attack = parse_attack({"name": "pgd4_linf_0.02", "precision": "fp32"})  # nothing breaks at 0.02/255
    fixed = pgd(model.eval(), x, y, attack)
    done = {}
    for out, fooled in _Stream(model, [(x, y, None)], attack, True, None):
        for i, cur, f, c in zip(out.ids.tolist(), out.cur, fooled.tolist(), out.correct.tolist()):
            done[i] = (cur, f, c)
    kept = [i for i, (_, f, c) in done.items() if c and not f]
    assert kept and all(torch.allclose(done[i][0], fixed[i], atol=1e-6) for i in kept)


def test_cw_margin_loss_is_named_and_refused_where_it_does_not_apply():
    from study.attacks import margin_loss

    cw = parse_attack({"name": "pgd10_linf_0.5", "loss": "cw"})
    assert cw.name == "pgd10_linf_0.5[loss=cw]" != parse_attack("pgd10_linf_0.5").name
    assert parse_attack(cw.name) == cw  # a name reads back as the attack it names
    assert parse_attack("pgd10_linf_2.0[rel_step=2.5,random_start=True]") == parse_attack(
        {"name": "pgd10_linf_2.0", "rel_step": 2.5, "random_start": True}
    )
    with pytest.raises(AttackError, match="AutoAttack's standard version fixes its own losses"):
        parse_attack({"name": "autoattack_linf_0.5", "loss": "cw"})
    with pytest.raises(AttackError, match="loss must be one of ce, cw"):
        parse_attack("pgd10_linf_0.5[loss=dlr]")
    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    assert margin_loss(logits, torch.tensor([1, 0])).tolist() == [-3.0, 3.0]


def test_cw_attack_breaks_and_is_never_compared_with_ce_flags(trained):
    from study import evaluate
    from study.fastcopy import inference_copy

    model, batches = trained
    fast = inference_copy(model)
    ce, cw = parse_attack("pgd10_linf_2.0"), parse_attack("pgd10_linf_2.0[loss=cw]")
    a, b = (robust_accuracy(fast, batches[:1], x, max_images=64) for x in (ce, cw))
    assert a["AOI"] == b["AOI"] and b["AAI"] < b["AOI"]  # the margin loss breaks samples too
    records = evaluate.evaluate(model, batches[:1], [ce, cw, parse_attack("fgsm_linf_2.0")], max_images=64)
    pairs = {f.attack for f in evaluate.sanity_flags(records) if f.name == "pgd_le_fgsm"}
    assert pairs == {"pgd10_linf_2.0 vs fgsm_linf_2.0"}  # the CW run has no CE rival


def test_fast_copy_switch_keeps_only_the_folding(trained):
    from study.fastcopy import PhaseConv2d, SmallMapConv2d, inference_copy

    model, batches = trained
    plain = inference_copy(model, fast=False)
    assert not any(isinstance(m, (PhaseConv2d, SmallMapConv2d, nn.BatchNorm2d)) for m in plain.modules())
    x = batches[0][0][:16]
    with torch.no_grad():
        assert (plain(x) - model.eval()(x)).abs().max() < 1e-3
