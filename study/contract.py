"""The contract every imported model is held to before the study trusts it: hub weights, a
weights file, a stage-1 import. An evaluation goes silently wrong on a model that expects
other inputs, returns probabilities or is left in train mode (fra31/auto-attack #13, #55;
AutoAttack's ``checks`` warn after the fact); here they are refused before any data is
prepared or anything trained, in one line naming the model and the broken term.

The terms, each with its probe (``TERMS``):

``classes``      a batch at the job's resolution gives logits of shape (images, classes)
``logits``       the outputs are finite and not probabilities: rows in [0, 1] that sum to one are refused
``eval``         in eval mode the model is deterministic: no module left in training, two
                 passes equal, and a forward pass changes no buffer (BatchNorm's statistics)
``gradient``     the input gradient of the cross-entropy is finite, and non-zero on some image
``input``        the output changes with the input (a model that ignores it is refused), and
                 the inputs are [0, 1] images normalised inside the model: the first
                 BatchNorm's running statistics, which the weights' training left, match what
                 it sees on images of the declared normalisation's mean and spread (within a
                 factor ``SPREAD`` in variance; weights that expect raw [0, 1] pixels, or
                 inputs normalised twice, are off by about 1/std² ≈ 20). A model without
                 BatchNorm, or whose BatchNorm never saw data, is not probed there, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from study.models import ModelError

TERMS = ("classes", "logits", "eval", "gradient", "input")
PROBE_IMAGES = 8
SPREAD = 8.0  # the first BatchNorm's variance ratio accepted: within [1/SPREAD, SPREAD]


class ContractError(ModelError):
    """An imported model that breaks a term of the contract."""


@dataclass(frozen=True)
class Term:
    name: str
    passed: bool | None  # None: not probed (the detail says why)
    detail: str


def probe_images(mean, std, resolution: int, n: int = PROBE_IMAGES, seed: int = 0) -> torch.Tensor:
    """``n`` smooth random images in [0, 1] whose channels have the declared ``mean`` and
    ``std``: white noise blurred (neighbouring pixels correlate, as in photographs), scaled."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 3, resolution, resolution, generator=g)
    k = max(3, resolution // 16) | 1
    blur = torch.ones(3, 1, k, k) / (k * k)
    smooth = F.conv2d(F.pad(noise, [k // 2] * 4, mode="reflect"), blur, groups=3)
    smooth = (smooth - smooth.mean((0, 2, 3), keepdim=True)) / smooth.std((0, 2, 3), keepdim=True)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (smooth * s + m).clamp(0, 1)


def check(model: nn.Module, name: str, classes: int, resolution: int, mean=None, std=None) -> list[Term]:
    """Every term on ``model`` (put in eval mode); raises ContractError, one line naming
    ``name`` and the first broken term, else returns the terms (some maybe not probed).
    ``mean``/``std``: the declared normalisation (default: the model's own Normalize)."""
    model.eval()
    norm = _normalize_of(model)
    if mean is None or std is None:
        if norm is None:
            raise ContractError(f"{name}: breaks the model contract: input: no normalisation inside the model")
        mean, std = norm.mean.flatten().tolist(), norm.std.flatten().tolist()
    x = probe_images(mean, std, resolution)
    terms = []
    for probe in (_classes, _logits, _eval, _gradient, _input):
        term = probe(model, x, classes)
        if term.passed is False:
            raise ContractError(f"{name}: breaks the model contract: {term.name}: {term.detail}")
        terms.append(term)
    return terms


def _normalize_of(model: nn.Module):
    """The model's own input normalisation (study.models.Normalize: buffers mean and std)."""
    return next(
        (
            m
            for m in model.modules()
            if isinstance(getattr(m, "mean", None), torch.Tensor) and isinstance(getattr(m, "std", None), torch.Tensor)
        ),
        None,
    )


def _classes(model, x, classes) -> Term:
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # another resolution than it takes, a wrong channel count
        return Term("classes", False, f"a batch of {tuple(x.shape)} images fails: {str(err).splitlines()[0][:200]}")
    want = (x.shape[0], classes)
    ok = torch.is_tensor(out) and tuple(out.shape) == want
    shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
    return Term("classes", ok, f"outputs {shape} for {x.shape[0]} images of {x.shape[-1]} px; the job needs {want}")


def _logits(model, x, classes) -> Term:
    with torch.no_grad():
        out = model(x).float()
    if not torch.isfinite(out).all():
        return Term("logits", False, "the outputs hold NaN or infinite values")
    sums = out.sum(1)
    probabilities = bool(
        (out >= 0).all() and (out <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
    )
    detail = "rows in [0, 1] that sum to 1: probabilities (remove the softmax; attacks need logits)"
    return Term("logits", not probabilities, detail if probabilities else "logits")


def _eval(model, x, classes) -> Term:
    training = [n for n, m in model.named_modules() if m.training]
    if training:
        return Term(
            "eval",
            False,
            f"{len(training)} module(s) still in training after eval(), e.g. {training[0] or 'the model'}",
        )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        a, b = model(x), model(x)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        return Term("eval", False, f"a forward pass in eval mode changes {changed[0]} (statistics still updated)")
    if not torch.allclose(a, b, atol=1e-5, rtol=1e-5):
        return Term(
            "eval", False, f"two passes on the same images differ by {float((a - b).abs().max()):.3g} (dropout?)"
        )
    return Term("eval", True, "deterministic, no buffer changed")


def _gradient(model, x, classes) -> Term:
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = F.cross_entropy(out.float(), out.argmax(1).detach())
    (grad,) = torch.autograd.grad(loss, x)
    if not torch.isfinite(grad).all():
        return Term("gradient", False, "the input gradient holds NaN or infinite values")
    norms = grad.flatten(1).abs().amax(1)
    if not (norms > 0).any():
        return Term("gradient", False, "the input gradient is zero on every image (masked, or cut off)")
    return Term("gradient", True, f"finite, non-zero on {int((norms > 0).sum())} of {len(norms)} images")


def _input(model, x, classes) -> Term:
    with torch.no_grad():
        out = model(x).float()
    if float((out - out[:1]).abs().max()) <= 1e-6:
        return Term("input", False, f"the output is the same for {len(out)} different images: it ignores its input")
    bn = next((m for m in model.modules() if isinstance(m, nn.BatchNorm2d)), None)
    if bn is None or bn.running_var is None:
        return Term("input", None, "output follows the input; no BatchNorm to read the expected input from: not probed")
    if torch.all(bn.running_var == 1):  # its initial value on every channel: no training reached it
        return Term("input", None, "output follows the input; its first BatchNorm never saw data: not probed")
    seen = []
    hook = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        hook.remove()
    var = seen[0].float().var((0, 2, 3))
    ratio = float((var / bn.running_var.float().clamp_min(1e-8)).median())
    ok = 1 / SPREAD <= ratio <= SPREAD
    detail = (
        f"its first BatchNorm sees {ratio:.3g}× the variance its weights were trained on, on images of the "
        "declared normalisation (within 1/8 to 8 expected): the weights expect other inputs "
        "(raw pixels, or inputs normalised twice?)"
    )
    return Term("input", ok, detail if not ok else f"first BatchNorm's variance {ratio:.2f}× its training's")
