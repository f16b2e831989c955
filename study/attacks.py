"""The one attack engine: FGSM and PGD under L-inf or L2, in [0, 1] pixel space.

Names follow the paper: ``pgd10_linf_0.5`` is PGD with 10 steps at eps = 0.5/255,
``fgsm_linf_2.0`` one signed-gradient step at 2/255; L2 eps is in [0, 1]-pixel L2 norm
(``pgd10_l2_3.0``). PGD's step size defaults to the paper's 1.25 * eps / steps, with a
random start.

Gradients are taken with respect to the input only (``torch.autograd.grad``), so no
parameter ever accumulates a gradient. For evaluation (``early_stop=True``) a sample
counts as broken as soon as *any* iterate -- the random start included -- is
misclassified, and from then on it costs no compute; adversarial training calls the
same engine with ``early_stop=False`` and gets the last iterate of every sample.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

_NAME = re.compile(r"^(?:(?P<pgd>pgd)(?P<steps>\d+)|(?P<fgsm>fgsm))_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d+)?)$")


class AttackError(ValueError):
    """An attack that cannot be run: unknown name, negative or non-numeric eps."""


@dataclass(frozen=True)
class Attack:
    kind: str                  # "pgd" | "fgsm"
    norm: str                  # "linf" | "l2"
    eps: float                 # as written: 1/255 units for linf, pixel L2 norm for l2
    steps: int = 10
    restarts: int = 1
    random_start: bool = True
    rel_step: float = 1.25     # step size = rel_step * eps / steps (the paper's 1.25)
    targeted: bool = False

    @property
    def name(self) -> str:
        head = f"pgd{self.steps}" if self.kind == "pgd" else "fgsm"
        return f"{head}_{self.norm}_{float(self.eps)!r}"

    @property
    def eps_pixels(self) -> float:
        """eps in [0, 1] pixel units."""
        return self.eps / 255.0 if self.norm == "linf" else self.eps

    @property
    def step_pixels(self) -> float:
        return self.rel_step * self.eps_pixels / self.steps


def parse_attack(spec) -> Attack:
    """An Attack from a paper name (``pgd10_linf_0.5``) or a mapping
    ``{name: ..., eps: 1.0, restarts: 2, random_start: false, rel_step: 2.5, targeted: true}``
    (``eps`` there overrides the name's)."""
    options = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name", None)
    if not isinstance(spec, str):
        raise AttackError(f"an attack is a name like 'pgd10_linf_0.5', got {spec!r}")
    m = _NAME.match(spec.strip())
    if not m:
        if re.match(r"^\w+_(linf|l2)_-", spec):
            raise AttackError(f"attack {spec!r}: eps must not be negative")
        raise AttackError(f"unknown attack {spec!r} (expected pgd<steps>_<linf|l2>_<eps> or "
                          f"fgsm_<linf|l2>_<eps>, e.g. pgd10_linf_0.5)")
    if m["fgsm"]:
        base = Attack("fgsm", m["norm"], float(m["eps"]), steps=1, random_start=False, rel_step=1.0)
    else:
        steps = int(m["steps"])
        if steps < 1:
            raise AttackError(f"attack {spec!r}: PGD needs at least one step")
        base = Attack("pgd", m["norm"], float(m["eps"]), steps=steps)
    number, integer, flag = ((int, float), "a number"), (int, "an integer"), (bool, "true or false")
    allowed = {"eps": number, "restarts": integer, "random_start": flag, "rel_step": number,
               "targeted": flag}
    for key, value in options.items():
        if key not in allowed:
            raise AttackError(f"attack {spec!r}: unknown option {key!r} (allowed: {', '.join(allowed)})")
        types, words = allowed[key]
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            raise AttackError(f"attack {spec!r}: {key} must be {words}, got {value!r}")
    attack = replace(base, **options)
    if attack.eps < 0:
        raise AttackError(f"attack {spec!r}: eps must not be negative, got {attack.eps}")
    if attack.restarts < 1 or attack.rel_step <= 0:
        raise AttackError(f"attack {spec!r}: restarts must be >= 1 and rel_step > 0")
    return attack


# -- geometry of the two norm balls ----------------------------------------------------
def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def _random_start(x: torch.Tensor, norm: str, eps: float, generator) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        return (2 * u - 1) * eps
    d = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    radius = torch.rand(len(x), generator=generator, device="cpu").to(x.device)
    radius = radius.pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
    return d / _flat_norm(d).clamp_min(1e-12) * eps * radius


# -- the engine ----------------------------------------------------------------------------
@dataclass
class Outcome:
    x_adv: torch.Tensor        # the iterate that broke each sample, else the last one
    fooled: torch.Tensor       # bool per sample: misclassified (untargeted) or hit (targeted)
    grad_norm: torch.Tensor    # input-gradient norm at the first step (gradient-masking check)


def _success(logits, labels, targeted: bool):
    """Untargeted: the true label is lost. Targeted: the target label is hit."""
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
            target: torch.Tensor | None = None, early_stop: bool = True,
            generator: torch.Generator | None = None) -> Outcome:
    """Runs ``attack`` on a batch. The model is put in eval mode for the attack and
    restored after. ``target`` (targeted attacks) is the class each sample is pushed to.
    Restarts serve evaluation only: with ``early_stop=False`` one run gives the last iterate."""
    if attack.targeted and target is None:
        raise AttackError(f"{attack.name}: a targeted attack needs target labels")
    was_training = model.training
    model.eval()
    eps, alpha = attack.eps_pixels, attack.step_pixels
    x = x.detach()
    x_adv = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    grad_norm = torch.full((len(x),), float("nan"), device=x.device)
    targeted = target is not None
    labels = target if targeted else y  # the loss is taken against these
    sign = -1.0 if targeted else 1.0    # targeted: descend the loss of the target
    try:
        for restart in range(attack.restarts):
            active = (~fooled).nonzero().flatten() if early_stop else torch.arange(len(x), device=x.device)
            if len(active) == 0:
                break
            cur = x[active].clone()
            if attack.random_start and eps > 0:
                cur = (cur + _random_start(cur, attack.norm, eps, generator)).clamp(0, 1)
            for step in range(attack.steps + 1):
                cur.requires_grad_(True)
                logits = model(cur)
                ok = _success(logits, labels[active], targeted)
                if early_stop:  # every sample still active is unbroken so far
                    fooled[active[ok]] = True
                    x_adv[active[ok]] = cur.detach()[ok]
                if step == attack.steps:
                    break
                loss = F.cross_entropy(logits, labels[active], reduction="none")
                if early_stop:  # broken samples stop pulling on the gradient ...
                    loss = loss * (~ok)
                grad, = torch.autograd.grad(loss.sum(), cur)
                if restart == 0 and step == 0:
                    grad_norm[active] = _flat_norm(grad).flatten()
                with torch.no_grad():
                    cur = x[active] + _project(cur + sign * alpha * _ascent(grad, attack.norm)
                                               - x[active], attack.norm, eps)
                    cur = cur.clamp(0, 1)
                if early_stop:  # ... and leave the active set: no more compute for them
                    keep = ~ok
                    active, cur = active[keep], cur[keep]
                    if len(active) == 0:
                        break
            if not early_stop:
                x_adv = cur.detach()
                with torch.no_grad():
                    fooled = _success(model(x_adv), labels, targeted)
                break
            if len(active):
                x_adv[active] = cur.detach()
    finally:
        model.train(was_training)
    return Outcome(x_adv.detach(), fooled, grad_norm)


def robust_accuracy(model: nn.Module, batches, attack: Attack, max_images: int | None = None,
                    seed: int = 0) -> dict:
    """AOI, AAI and DR (percent) of ``model`` under ``attack`` on the same images, plus what
    the sanity checks need: the largest perturbation norm, whether every adversarial image
    stays in [0, 1], and the share of samples whose input gradient vanished."""
    generator = torch.Generator().manual_seed(seed)
    n = clean_ok = robust = vanished = 0
    max_delta, in_range = 0.0, True
    for x, y in batches:
        if max_images is not None:
            if n >= max_images:
                break
            x, y = x[: max_images - n], y[: max_images - n]
        with torch.no_grad():
            was = model.training
            ok = model.eval()(x).argmax(1) == y
            model.train(was)
        out = perturb(model, x, y, attack, generator=generator)
        delta = (out.x_adv - x).flatten(1)
        norms = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        max_delta = max(max_delta, float(norms.max()) if len(x) else 0.0)
        in_range &= bool(((out.x_adv >= 0) & (out.x_adv <= 1)).all())
        vanished += int((out.grad_norm[ok & ~out.fooled] < 1e-12).sum()) if attack.eps > 0 else 0
        n += len(x)
        clean_ok += int(ok.sum())
        robust += int((ok & ~out.fooled).sum())  # the clean image counts as an iterate: AAI <= AOI
    aoi = 100.0 * clean_ok / max(n, 1)
    aai = 100.0 * robust / max(n, 1)
    return {"attack": attack.name, "images": n, "AOI": aoi, "AAI": aai,
            "DR": 100.0 * (aoi - aai) / aoi if aoi > 0 else float("nan"),
            "max_delta": max_delta, "eps_pixels": attack.eps_pixels, "in_range": in_range,
            "vanishing_gradients": vanished}
