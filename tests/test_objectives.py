"""Training objectives: names, defaults, and that adversarial training trains on the
attack's last iterate without building weight gradients in the attack."""
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
    assert objectives.objective_name({"name": "pgd3_linf_4.0", "rel_step": 2.0}) == \
        "pgd3_linf_4.0[rel_step=2.0]"
    assert objectives.objective_name({"name": "pgd5_l2_3.0"}) == "pgd5_l2_3.0"


@pytest.mark.parametrize("spec,message", [
    ("autoattack_linf_4.0", "AutoAttack evaluates"),
    ("pgd3_linf_-1", "eps must not be negative"),
    ({"name": "pgd3_linf_1.0", "restarts": 3}, "evaluation options"),
    (3, "an objective is 'standard'"),
])
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
