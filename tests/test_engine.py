import math

import pytest
import torch

from study.engine import Trainer, TrainSettings, accuracy, lr_factor, param_groups
from study.models import build_model


def _batches(n=4, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(size, 3, 32, 32, generator=g), torch.randint(0, classes, (size,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize("partial_bn", ["frozen", "train"])
def test_partial_trains_g_only_and_bn_as_asked(partial_bn):
    """Partial fine-tuning: f's weights never move. With partial_bn frozen, f is bit for
    bit unchanged (running statistics too); with train (the authors' code), BatchNorm uses
    the batch's statistics and its running statistics follow the target data."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    before = {k: v.clone() for k, v in model.f.state_dict().items()}  # BN running stats included
    g_before = model.g.weight.clone()
    data = _batches()
    trainer = Trainer(model, TrainSettings(epochs=2, lr_f=0.1, lr_g=0.1), "g", len(data), partial_bn=partial_bn)
    trainer.fit(data, progress=False)
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    for k, v in model.f.state_dict().items():
        if partial_bn == "frozen" or k not in stats:
            assert torch.equal(v, before[k]), k
    moved = [k for k in stats if not torch.equal(model.f.state_dict()[k], before[k])]
    assert (len(moved) == len(stats)) if partial_bn == "train" else not moved
    assert not torch.equal(model.g.weight, g_before)
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["g"]
    with pytest.raises(ValueError, match="unknown partial_bn"):
        Trainer(model, TrainSettings(), "g", 1, partial_bn="eval")


def test_full_uses_the_two_learning_rates():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    data = _batches(n=3)
    s = TrainSettings(epochs=2, lr_f=0.001, lr_g=0.1, schedule="cosine", momentum=0.0, weight_decay=0.0)
    trainer = Trainer(model, s, "f+g", len(data))
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["f"]["lr"] == 0.001 and groups["g"]["lr"] == 0.1
    n_f = sum(p.numel() for p in model.f.parameters())
    assert sum(p.numel() for p in groups["f"]["params"]) == n_f
    # one plain SGD step moves each parameter by exactly lr * grad of its own group
    import copy

    x, y = data[0]
    twin = copy.deepcopy(model).train()
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    trainer.train_epoch([(x, y)], progress=False)
    step_f = twin.f.backbone.conv1.weight.detach() - model.f.backbone.conv1.weight.detach()
    step_g = twin.g.weight.detach() - model.g.weight.detach()
    assert torch.allclose(step_f, 0.001 * twin.f.backbone.conv1.weight.grad, atol=1e-7)
    assert torch.allclose(step_g, 0.1 * twin.g.weight.grad, atol=1e-6)
    # both rates follow the same schedule; their ratio stays 1:100
    history = trainer.fit(data, progress=False)
    for h in history:
        assert math.isclose(h["lr_g"] / h["lr_f"], 100.0, rel_tol=1e-9)


def test_scratch_trains_everything_and_loss_falls():
    torch.manual_seed(0)
    model = build_model("resnet18", 3)
    data = _batches(n=2, size=24)
    trainer = Trainer(model, TrainSettings(epochs=6, lr_f=0.05, lr_g=0.05, weight_decay=0), "f+g", len(data))
    history = trainer.fit(data, data, progress=False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert "val_acc" in history[0] and 0 <= history[-1]["val_acc"] <= 100


def test_schedules():
    s = TrainSettings(epochs=10, schedule="cosine")
    f = lr_factor(s, steps_per_epoch=5)
    assert f(0) == 1.0 and abs(f(25) - 0.5) < 1e-12 and f(50) < 1e-12
    s = TrainSettings(epochs=10, schedule="step", step_every=3, gamma=0.5)
    f = lr_factor(s, steps_per_epoch=5)
    assert [f(e * 5) for e in (0, 2, 3, 6, 9)] == [1, 1, 0.5, 0.25, 0.125]
    s = TrainSettings(epochs=10, schedule="constant", warmup_epochs=2)
    f = lr_factor(s, steps_per_epoch=5)
    assert f(0) == 0.1 and f(9) == 1.0 and f(40) == 1.0


def test_state_dict_resumes_where_it_stopped():
    torch.manual_seed(0)
    data = _batches(n=2)
    s = TrainSettings(epochs=3, lr_f=0.01, lr_g=0.01)
    a = Trainer(build_model("resnet18", 3), s, "f+g", len(data))
    a.fit(data, progress=False)
    torch.manual_seed(0)
    b = Trainer(build_model("resnet18", 3), TrainSettings(epochs=1, lr_f=0.01, lr_g=0.01), "f+g", len(data))
    b.fit(data, progress=False)
    state = b.state_dict()
    c = Trainer(build_model("resnet18", 3), s, "f+g", len(data))
    c.load_state_dict(state)
    assert c.epoch == 1 and len(c.history) == 1
    c.fit(data, progress=False)
    assert [h["epoch"] for h in c.history] == [1, 2, 3]


def test_unknown_trains_and_accuracy():
    model = build_model("resnet18", 3)
    with pytest.raises(ValueError, match="unknown trains 'half'"):
        param_groups(model, "half", 0.1, 0.1)
    data = _batches(n=2)
    acc = accuracy(model, data)
    with torch.no_grad():
        model.eval()
        manual = sum((model(x).argmax(1) == y).sum().item() for x, y in data) / 32 * 100
    assert acc == pytest.approx(manual)
    assert accuracy(model, data, max_images=5) == pytest.approx(
        100 * (model(data[0][0][:5]).argmax(1) == data[0][1][:5]).float().mean().item()
    )


def test_the_deterministic_job_option_sets_torchs_switches_in_each_process(tmp_path):
    """``deterministic: true`` reaches a fresh process through resolve_device (as in every
    trial, actor and the driver): torch refuses nondeterministic kernels, cuDNN neither
    autotunes nor picks nondeterministic algorithms, cuBLAS gets a fixed workspace; the
    model's numbers on CPU are the same either way."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "from study.models import build_model\n"
        "from study.stages import resolve_device\n"
        "torch.manual_seed(0); m = build_model('resnet18', 10, 32).eval(); x = torch.rand(2, 3, 32, 32)\n"
        "before = m(x)\n"
        "assert not torch.are_deterministic_algorithms_enabled()\n"
        "resolve_device('cpu', False); assert not torch.are_deterministic_algorithms_enabled()\n"
        "resolve_device('cpu', True)\n"
        "assert torch.are_deterministic_algorithms_enabled()\n"
        "assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark\n"
        "assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n"
        "assert torch.equal(before, m(x))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
