"""The model contract (study.contract): every imported model is held to it before the study
trusts it; each term refused, in one line and exit 2, on a model that breaks it."""

from __future__ import annotations

import pytest
import torch
import torchvision
import yaml
from conftest import SIM_JOB
from torch import nn
from torch.nn import functional as F

from study import cli, contract
from study.models import IMAGENET_MEAN, IMAGENET_STD, Normalize, build_model


def _calibrated(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """BatchNorm's running statistics as training on ``images`` leaves them."""
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None  # the plain average over what it saw
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


def _probe(n=64, seed=7):
    return contract.probe_images(IMAGENET_MEAN, IMAGENET_STD, 32, n, seed)


@pytest.fixture(scope="module")
def good():
    torch.manual_seed(0)
    return _calibrated(build_model("resnet18", 10, 32), _probe())


class _Wrapped(nn.Module):
    """The good model with one thing done to its outputs: what a user's module might do."""

    def __init__(self, inner, after):
        super().__init__()
        self.inner, self.after = inner, after
        self.normalize = inner.f.normalize  # the declared normalisation, as the study's models hold it

    def forward(self, x):
        return self.after(self.inner(x))


class _NanGradient(torch.autograd.Function):
    """The identity whose backward pass is NaN (a bad custom layer)."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_a_sound_model_keeps_every_term(good):
    terms = contract.check(good, "good", 10, 32)
    assert [t.name for t in terms] == list(contract.TERMS) and all(t.passed for t in terms)


@pytest.mark.parametrize(
    "broken, term, said",
    [
        (lambda g: g, "classes", "the job needs (8, 26)"),  # a 10-class head for a 26-class job
        (lambda g: _Wrapped(g, lambda z: z.softmax(1)), "logits", "probabilities"),
        (lambda g: _Wrapped(g, lambda z: F.dropout(z, 0.5, training=True)), "eval", "differ"),  # ignores eval()
        (lambda g: _Wrapped(g, lambda z: z * 0 + z.detach()), "gradient", "zero on every image"),
        (lambda g: _Wrapped(g, lambda z: z.mean(0, keepdim=True).expand_as(z)), "input", "the same for 8"),
        (lambda g: _Wrapped(g, _NanGradient.apply), "gradient", "NaN"),
        (lambda g: _Wrapped(g, lambda z: z / 0), "logits", "NaN or infinite"),
    ],
)
def test_each_term_is_refused_in_one_line_naming_it(good, broken, term, said):
    classes = 26 if term == "classes" else 10
    with pytest.raises(contract.ContractError) as err:
        contract.check(broken(good), "mine.pt", classes, 32)
    text = str(err.value)
    assert text.startswith(f"mine.pt: breaks the model contract: {term}: ") and said in text
    assert len(text.splitlines()) == 1


def test_a_module_left_in_training_and_statistics_that_move_are_refused(good):
    class StaysTraining(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.normalize = good, good.f.normalize

        def forward(self, x):
            return self.inner(x)

        def train(self, mode=True):
            return super().train(True)

    with pytest.raises(contract.ContractError, match="eval: .* still in training"):
        contract.check(StaysTraining(), "m", 10, 32)


def test_weights_that_expect_other_inputs_are_refused_and_untrained_statistics_are_not_probed(good):
    assert contract.check(good, "good", 10, 32)[-1].passed
    raw = build_model("resnet18", 10, 32)
    raw.load_state_dict(good.state_dict())
    raw.f.normalize = Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the pixels reach conv1 as they are
    with pytest.raises(contract.ContractError, match="input: .*variance"):
        contract.check(raw, "raw", 10, 32, IMAGENET_MEAN, IMAGENET_STD)
    fresh = contract.check(build_model("resnet18", 10, 32), "fresh", 10, 32)[-1]
    assert fresh.passed is None and "never saw data" in fresh.detail


def _weights_file(tmp_path, normalised: bool):
    """A torchvision ResNet-18 file whose BatchNorm statistics come from probe images as a
    normalising model sees them (``normalised``) or as raw pixels."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    x = _probe()
    if normalised:
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    path = tmp_path / ("normalised.pt" if normalised else "raw.pt")
    torch.save(_calibrated(net, x).state_dict(), path)
    return path


def test_study_weights_check_passes_a_sound_file_and_refuses_one_trained_on_raw_pixels(tmp_path, capsys):
    ok = _weights_file(tmp_path, True)
    argv = ["weights", "check", ok, "--backbone", "resnet18", "--resolution", 32]
    assert cli.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert "keeps the model contract at 32 px" in out and "input     ok" in out
    raw = _weights_file(tmp_path, False)
    assert cli.main([str(a) for a in ["weights", "check", raw, "--backbone", "resnet18", "--resolution", 32]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "raw.pt" in err and "breaks the model contract: input" in err


def test_a_job_importing_a_broken_model_stops_before_any_data_or_training(tmp_path, capsys):
    raw = _weights_file(tmp_path, False)
    job = {**SIM_JOB, "pretrain": {**SIM_JOB.get("pretrain", {}), "weights": str(raw)}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert cli.main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "breaks the model contract: input" in err
    assert not (tmp_path / "out").exists()  # nothing prepared, trained or left behind
