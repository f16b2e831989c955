"""Training objectives: names, defaults, and that adversarial training trains on the
attack's last iterate without building weight gradients in the attack."""

import copy

import pytest
import torch
from torch.nn import functional as F

from study import objectives
from study.objectives import ObjectiveError


def test_names_and_training_defaults():
    assert objectives.check("standard") == "standard"
    pgd = objectives.training_attack("pgd3_linf_4.0")
    assert (pgd.steps, pgd.random_start, pgd.rel_step) == (3, True, 2.5)  # Madry
    fast = objectives.training_attack("fgsm_linf_2.0")
    assert (fast.steps, fast.random_start, fast.rel_step) == (1, True, 1.25)  # Wong et al.
    assert objectives.objective_name("pgd3_linf_4") == "pgd3_linf_4.0"
    assert objectives.objective_name({"name": "pgd3_linf_4.0", "rel_step": 2.0}) == "pgd3_linf_4.0[rel_step=2.0]"
    assert objectives.objective_name({"name": "pgd5_l2_3.0"}) == "pgd5_l2_3.0"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("autoattack_linf_4.0", "AutoAttack evaluates"),
        ("pgd3_linf_-1", "eps must not be negative"),
        ({"name": "pgd3_linf_1.0", "restarts": 3}, "evaluation options"),
        (3, "an objective is 'standard'"),
    ],
)
def test_bad_objectives(spec, message):
    with pytest.raises(ObjectiveError, match=message):
        objectives.check(spec)


def test_standard_is_cross_entropy(trained):
    model, batches = trained
    x, y = batches[0]
    loss, logits = objectives.build("standard")(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(model(x), y))


def test_adversarial_objective_trains_on_the_attack(trained):
    import copy

    model, batches = trained
    model = copy.deepcopy(model).train()  # train-mode passes move BatchNorm statistics
    x, y = batches[0][0][:32], batches[0][1][:32]
    model.zero_grad(set_to_none=True)
    objective = objectives.build("pgd3_linf_8.0", generator=torch.Generator().manual_seed(0))
    loss, logits = objective(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # the attack built none
    assert model.training  # the attack ran in eval mode and gave the mode back
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y)
    assert loss > clean  # it trains on harder inputs than the clean ones
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# -- stage 2's defenses: DM (Eq. 4-5) and KD ---------------------------------------------
def _batch(trained, n=32):
    model, batches = trained
    return batches[0][0][:n], batches[0][1][:n]


def test_dm_with_lambda_0_is_plain_cross_entropy(trained):
    import copy

    model, _ = trained
    x, y = _batch(trained)
    a, b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    dm, _ = objectives.discrepancy_mitigating(0.0, eps=2.0)(a, x, y)
    ce, _ = objectives.cross_entropy()(b, x, y)
    assert torch.equal(dm, ce)
    dm.backward()
    ce.backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_dm_adds_lambda_times_the_feature_steepness(trained):
    import copy

    from study.attacks import local_lipschitz, steepest_neighbour

    model, _ = trained
    x, y = _batch(trained)
    m = copy.deepcopy(model).train()
    m0 = copy.deepcopy(m)  # replays the same sequence: BatchNorm's running stats move with it
    lam = 0.01
    loss, logits = objectives.discrepancy_mitigating(lam, eps=2.0, steps=2, generator=torch.Generator().manual_seed(1))(
        m, x, y
    )
    ce = F.cross_entropy(logits, y)
    # the same inner max, reproduced: LL = mean ||f(x) - f(x')||_1 / ||x - x'||_inf
    with torch.no_grad():
        fx = m0.f(x).flatten(1)
    x_adv = steepest_neighbour(m0.f, x, 2.0 / 255, steps=2, generator=torch.Generator().manual_seed(1))
    assert (x_adv - x).abs().amax() <= 2.0 / 255 + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        fa = m0.f(x_adv).flatten(1)
        ll = ((fx - fa).abs().sum(1) / (x - x_adv).flatten(1).abs().amax(1)).mean()
    assert ll > 0
    assert torch.allclose((loss - ce).detach(), lam * ll, rtol=1e-3), (float(loss - ce), float(lam * ll))
    with torch.no_grad():  # the measuring form of Eq. 4 agrees
        assert float(local_lipschitz(copy.deepcopy(model).eval().f, x, 2.0 / 255, steps=3)) > 0


class _Tiny(torch.nn.Module):
    """f (a convolution, BatchNorm, pooling) and g: small enough to check by hand."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3),
            torch.nn.BatchNorm2d(6),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.g = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.g(self.f(x))


def _authors_dm_loss(model, x, y, beta, eps, steps, generator):
    """The released train_dm.py's dm_loss, on inputs in [0, 1] (theirs are in [-1, 1], so
    their 0.001 noise and eps halve here), written out step by step."""
    model.eval()
    x_adv = x + 0.0005 * torch.randn(x.shape, generator=generator)
    step = eps * 1.25 / steps
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.mse_loss(model.f(x_adv), model.f(x))
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    model.train()
    natural = F.cross_entropy(model(x), y)
    robust = (1.0 / len(x)) * F.mse_loss(model.f(x_adv), model.f(x))
    return natural + beta * robust


def test_dm_code_form_is_the_authors_mse_regulariser():
    """dm.form: code: CE + beta (1/B) MSE(f(x'), f(x)), x' by 10 sign steps on that MSE
    from x plus small noise: loss and every parameter's gradient equal the hand-written one."""
    torch.manual_seed(0)
    model = _Tiny()
    x, y = torch.rand(8, 3, 12, 12), torch.randint(0, 4, (8,))
    twin = copy.deepcopy(model)
    model.train()
    beta, eps = 500.0, 0.5
    ours, _ = objectives.discrepancy_mitigating_code(
        beta, eps, steps=10, rel_step=1.25, generator=torch.Generator().manual_seed(3)
    )(model, x, y)
    ref = _authors_dm_loss(twin, x, y, beta, eps / 255, 10, torch.Generator().manual_seed(3))
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert float(ours - F.cross_entropy(model(x), y)) > 0  # the regulariser is there
    ours.backward()
    ref.backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name  # a bias before BatchNorm: ~0
    loss, _ = objectives.discrepancy_mitigating_code(0.0, eps)(model, x, y)
    assert torch.allclose(loss, F.cross_entropy(model(x), y))


def test_dm_form_picks_the_regulariser_and_its_defaults():
    from study import config

    raw = {
        "name": "t",
        "datasets": {
            "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
            "alphabet": {"params": {"train_per_class": 2, "test_per_class": 1}},
        },
        "pretrain": {"dataset": "shapes", "objectives": ["standard", "fgsm_linf_2.0"]},
        "finetune": {"datasets": ["alphabet"], "methods": ["dm_stage12"]},
    }
    eq4 = config.parse(raw).finetune.dm
    code = config.parse({**raw, "finetune": {**raw["finetune"], "dm": {"form": "code", "steps": 5}}}).finetune.dm
    assert (eq4.form, eq4.eps, eq4.steps, eq4.rel_step) == ("eq4", 2.0, 1, 2.5)
    assert (code.form, code.eps, code.steps, code.rel_step) == ("code", 0.5, 5, 1.25)
    kind = objectives.KINDS["dm"]
    point = {"lam": 5.0}
    ident = kind.identity(config.parse(raw).finetune, point, "fgsm_linf_2.0", "fgsm_linf_2.0")
    assert "form" not in ident  # Eq. 4's models keep the keys they had before the switch
    ft = config.parse({**raw, "finetune": {**raw["finetune"], "dm": {"form": "code"}}}).finetune
    ident = kind.identity(ft, point, "fgsm_linf_2.0", "fgsm_linf_2.0")
    assert ident["form"] == "code"
    assert kind.build(ident, 0.0, None, None).__qualname__.startswith("discrepancy_mitigating_code")


def test_local_lipschitz_known_answers():
    from torch import nn

    from study.attacks import local_lipschitz

    x = torch.rand(16, 3, 8, 8)
    const = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    nn.init.zeros_(const[1].weight)
    with torch.no_grad():
        assert float(local_lipschitz(const, x, 4 / 255, steps=5)) == 0.0
    # a linear map with one output: the max of |w . d| / ||d||_inf over the ball is ||w||_1,
    # reached at d = eps * sign(w) (away from the [0, 1] walls)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(192, 1, bias=False))
    x = 0.25 + 0.5 * torch.rand(16, 3, 8, 8)
    with torch.no_grad():
        ll = float(local_lipschitz(lin, x, 4 / 255, steps=5))
    assert abs(ll - float(lin[1].weight.abs().sum())) < 1e-3 * ll


def test_kd_keeps_features_near_the_teacher(trained):
    import copy

    model, _ = trained
    x, y = _batch(trained)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()  # eval: BatchNorm as the teacher's, so f(x) agree
    loss, logits = objectives.distillation(teacher.f, weight=5.0)(student, x, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-6)  # same features: no penalty
    with torch.no_grad():
        for p in student.f.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss, logits = objectives.distillation(teacher.f, weight=5.0)(student, x, y)
    with torch.no_grad():
        gap = (student.f(x) - teacher.f(x)).pow(2).mean()
    assert torch.allclose(loss, F.cross_entropy(logits, y) + 5.0 * gap, rtol=1e-4)
    assert all(not p.requires_grad for p in teacher.f.parameters())


def test_at_stage2_raises_aai_over_full_fine_tuning_on_alphabet(trained, tmp_path):
    """Both fine-tune the same backbone on alphabet, one on clean images (full FT), one
    on fast-AT adversarial images (AT@stage-2, the objective the sweep builds for it)."""
    import copy

    from study.attacks import parse_attack, robust_accuracy
    from study.data.beton import prepare
    from study.data.loaders import make_loader
    from study.engine import Trainer, TrainSettings

    model, test = trained
    data = prepare("alphabet", tmp_path, params=dict(train_per_class=40, test_per_class=4, seed=7), workers=1)
    train = make_loader(data["train"].beton, train=True, resolution=32, batch_size=64, workers=1, seed=0)
    settings = TrainSettings(epochs=3, lr_f=0.01, lr_g=0.05)
    aai = {}
    for name, objective in [
        ("full", objectives.cross_entropy()),
        ("at_stage2", objectives.build("fgsm_linf_8.0", generator=torch.Generator().manual_seed(0))),
    ]:
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        m.reset_classifier(26)
        Trainer(m, settings, "f+g", len(train), objective=objective).fit(train, progress=False)
        r = robust_accuracy(m.eval(), test, parse_attack("pgd10_linf_8.0"))
        aai[name] = r["AAI"]
    assert aai["at_stage2"] > aai["full"] + 10, aai


def test_trades_is_cross_entropy_plus_beta_times_the_kl_at_its_pgd_point(trained):
    from study.attacks import pgd

    model, batches = trained
    m = copy.deepcopy(model).train()
    x, y = batches[0][0][:16], batches[0][1][:16]
    attack = objectives.training_attack("pgd3_linf_4.0")
    loss, logits = objectives.trades(attack, beta=6.0, generator=torch.Generator().manual_seed(2))(
        copy.deepcopy(m), x, y
    )  # a copy: its training-mode passes move BatchNorm's statistics
    with torch.no_grad():  # the same inner maximisation by hand, then the two terms
        m.eval()
        clean_p = F.softmax(m(x), 1)
    kl = lambda z, _: F.kl_div(F.log_softmax(z, 1), clean_p, reduction="none").sum(1)  # noqa: E731
    x_adv = pgd(m, x, y, attack, generator=torch.Generator().manual_seed(2), loss=kl)
    m.train()
    assert m.training and (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    want = F.cross_entropy(m(x), y) + 6.0 * F.kl_div(
        F.log_softmax(m(x_adv), 1), F.softmax(m(x), 1), reduction="batchmean"
    )
    assert torch.allclose(loss, want, rtol=1e-4) and torch.allclose(logits, m(x), atol=1e-5)
    zero, _ = objectives.trades(attack, beta=0.0)(m, x, y)
    assert torch.allclose(zero, F.cross_entropy(m(x), y), rtol=1e-5)
