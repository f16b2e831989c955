"""The one attack engine: FGSM and PGD under L-inf or L2, in [0, 1] pixel space.

Names follow the paper: ``pgd10_linf_0.5`` is PGD with 10 steps at eps = 0.5/255,
``fgsm_linf_2.0`` one signed-gradient step at 2/255, ``autoattack_linf_0.5`` the
standard AutoAttack (the original implementation, PyPI ``pyautoattack``); L2 eps is in
[0, 1]-pixel L2 norm (``pgd10_l2_3.0``). PGD's step size defaults to the paper's
1.25 * eps / steps, starting from the clean image as in the iterative attack of Kurakin
et al. (2017) that the paper cites for PGD-10. Why no random start by default: with one,
the paper's step travels 1.25 eps in all, so a coordinate that starts near -eps cannot
reach +eps, and on the demo's models PGD-10 then lost to FGSM at the same eps on every
model (the ``pgd_le_fgsm`` sanity flag). ``random_start: true`` gives Madry's PGD.

Gradients are taken with respect to the input only (``torch.autograd.grad``), so no
parameter ever accumulates a gradient. For evaluation (``early_stop=True``) a sample
counts as broken as soon as *any* iterate -- the random start included -- is
misclassified, and from then on it costs no compute; adversarial training calls the
same engine with ``early_stop=False`` and gets the last iterate of every sample.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

_NAME = re.compile(r"^(?:(?P<pgd>pgd)(?P<steps>\d+)|(?P<fgsm>fgsm)|(?P<aa>autoattack))"
                   r"_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d+)?)$")


class AttackError(ValueError):
    """An attack that cannot be run: unknown name, negative or non-numeric eps."""


@dataclass(frozen=True)
class Attack:
    kind: str                  # "pgd" | "fgsm" | "autoattack"
    norm: str                  # "linf" | "l2"
    eps: float                 # as written: 1/255 units for linf, pixel L2 norm for l2
    steps: int = 10
    restarts: int = 1
    random_start: bool = False
    rel_step: float = 1.25     # step size = rel_step * eps / steps (the paper's 1.25)
    targeted: bool = False
    max_images: int | None = None  # a cap of its own (AutoAttack on CPU needs one)

    @property
    def name(self) -> str:
        """The paper's name, with any option that changes the attack appended:
        ``pgd10_linf_2.0[rel_step=2.5]``. Tables match on it, so a variant is never
        shown beside the paper's number for the standard attack."""
        head = f"pgd{self.steps}" if self.kind == "pgd" else self.kind
        base = parse_attack(f"{head}_{self.norm}_{float(self.eps)!r}")
        extra = [f"{k}={getattr(self, k)}" for k in ("restarts", "random_start", "rel_step", "targeted")
                 if getattr(self, k) != getattr(base, k)]
        return f"{head}_{self.norm}_{float(self.eps)!r}" + (f"[{','.join(extra)}]" if extra else "")

    @property
    def eps_pixels(self) -> float:
        """eps in [0, 1] pixel units."""
        return self.eps / 255.0 if self.norm == "linf" else self.eps

    @property
    def step_pixels(self) -> float:
        return self.rel_step * self.eps_pixels / self.steps


def parse_attack(spec) -> Attack:
    """An Attack from a paper name (``pgd10_linf_0.5``) or a mapping
    ``{name: ..., eps: 1.0, random_start: true, restarts: 2, rel_step: 2.5, targeted: true,
    max_images: 64}`` (``eps`` there overrides the name's). AutoAttack takes only ``eps``
    and ``max_images``: its standard version fixes everything else."""
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
        raise AttackError(f"unknown attack {spec!r} (expected pgd<steps>_<linf|l2>_<eps>, "
                          f"fgsm_<linf|l2>_<eps> or autoattack_<linf|l2>_<eps>, e.g. pgd10_linf_0.5)")
    if m["aa"]:
        base = Attack("autoattack", m["norm"], float(m["eps"]), steps=0, random_start=False,
                      rel_step=1.0)
    elif m["fgsm"]:
        base = Attack("fgsm", m["norm"], float(m["eps"]), steps=1, random_start=False, rel_step=1.0)
    else:
        steps = int(m["steps"])
        if steps < 1:
            raise AttackError(f"attack {spec!r}: PGD needs at least one step")
        base = Attack("pgd", m["norm"], float(m["eps"]), steps=steps)
    number, integer, flag = ((int, float), "a number"), (int, "an integer"), (bool, "true or false")
    allowed = {"eps": number, "max_images": integer}
    if not m["aa"]:
        allowed.update(restarts=integer, random_start=flag, rel_step=number, targeted=flag)
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
    if attack.restarts > 1 and not attack.random_start:
        raise AttackError(f"attack {spec!r}: restarts without random_start: true repeat one run")
    if attack.max_images is not None and attack.max_images < 1:
        raise AttackError(f"attack {spec!r}: max_images must be >= 1")
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
# An input gradient this small is noise (float32 denormals): the sign step of PGD/FGSM
# is then meaningless, the classic symptom of gradient masking.
VANISHING = 1e-30


@dataclass
class Outcome:
    x_adv: torch.Tensor        # the iterate that broke each sample, else the last one
    fooled: torch.Tensor       # bool per sample: misclassified (untargeted) or hit (targeted)
    grad_norm: torch.Tensor    # input-gradient norm at the first step (gradient-masking check)
    notes: list = field(default_factory=list)  # warnings of AutoAttack's own checks


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
    try:
        if attack.kind == "autoattack":
            if not early_stop:
                raise AttackError(f"{attack.name}: AutoAttack evaluates; it cannot train")
            return _autoattack(model, x.detach(), y, attack, generator)
        return _pgd(model, x.detach(), y, attack, target, early_stop, generator)
    finally:
        model.train(was_training)


def _pgd(model, x, y, attack, target, early_stop, generator) -> Outcome:
    eps, alpha = attack.eps_pixels, attack.step_pixels
    x_adv = x.clone()
    fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    grad_norm = torch.full((len(x),), float("nan"), device=x.device)
    targeted = target is not None
    labels = target if targeted else y  # the loss is taken against these
    sign = -1.0 if targeted else 1.0    # targeted: descend the loss of the target
    for restart in range(attack.restarts):
        active = (~fooled).nonzero().flatten() if early_stop else torch.arange(len(x), device=x.device)
        if len(active) == 0:
            break
        x0, lab = x[active], labels[active]
        cur = x0.clone()
        if attack.random_start and eps > 0:
            cur = (cur + _random_start(cur, attack.norm, eps, generator)).clamp(0, 1)
        for step in range(attack.steps + 1):
            last = step == attack.steps
            if last:  # the final iterate is only classified: no graph
                with torch.no_grad():
                    logits = model(cur)
            else:
                cur.requires_grad_(True)
                logits = model(cur)
            ok = _success(logits, lab, targeted)
            if early_stop:  # every sample still active is unbroken so far
                fooled[active[ok]] = True
                x_adv[active[ok]] = cur.detach()[ok]
            elif last:
                fooled = ok
            if last:
                break
            loss = F.cross_entropy(logits, lab, reduction="none")
            if early_stop:  # broken samples stop pulling on the gradient ...
                loss = loss * (~ok)
            grad, = torch.autograd.grad(loss.sum(), cur)
            if restart == 0 and step == 0:
                grad_norm[active] = _flat_norm(grad).flatten()
            with torch.no_grad():
                cur = x0 + _project(cur + sign * alpha * _ascent(grad, attack.norm) - x0,
                                    attack.norm, eps)
                cur = cur.clamp(0, 1)
            if early_stop and ok.any():  # ... and leave the active set: no more compute for them
                keep = ~ok
                active, cur, x0, lab = active[keep], cur[keep], x0[keep], lab[keep]
                if len(active) == 0:
                    break
        if not early_stop:
            return Outcome(cur.detach(), fooled, grad_norm)
        if len(active):
            x_adv[active] = cur.detach()
    return Outcome(x_adv.detach(), fooled, grad_norm)


def _input_grad_norm(model, x, y) -> torch.Tensor:
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        grad, = torch.autograd.grad(loss, x)
    return _flat_norm(grad).flatten()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _autoattack(model, x, y, attack, generator) -> Outcome:
    """The standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square) of the original package.
    Its own checks (randomised or dynamic defences, zero gradients, Square beating the
    gradient attacks) come back as notes instead of log lines."""
    if attack.eps == 0:  # APGD divides by eps; at eps = 0 the only adversary is x itself
        with torch.no_grad():
            fooled = model(x).argmax(1) != y
        return Outcome(x.clone(), fooled, _input_grad_norm(model, x, y))
    from pyautoattack import AutoAttack

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator else 0
    aa = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[attack.norm], eps=attack.eps_pixels,
                    version="standard", device=x.device, seed=seed)
    collect, logger = _Collect(), aa.logger
    saved = logger.level, logger.propagate
    logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        # contiguous: AutoAttack's checks .view() the gradient, which a channels_last
        # input (FFCV's layout) would make fail
        x_adv, y_adv = aa.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
    finally:
        logger.removeHandler(collect)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    notes = [r.getMessage() for r in collect.records if r.levelno >= logging.WARNING]
    return Outcome(x_adv.detach(), y_adv != y, _input_grad_norm(model, x, y), notes)


def robust_accuracy(model: nn.Module, batches, attack: Attack, max_images: int | None = None,
                    seed: int = 0) -> dict:
    """AOI, AAI and DR (percent) of ``model`` under ``attack`` on the same images, plus what
    the sanity checks need: per-sample clean and robust correctness, the largest
    perturbation norm, whether every adversarial image stays in [0, 1], the count of
    vanished input gradients and AutoAttack's own warnings. The cap is the smaller of
    ``max_images`` and the attack's own."""
    from study.models import StudyModel, inference_copy

    if isinstance(model, StudyModel):  # BN folded: the same function, cheaper steps
        model = inference_copy(model)
    caps = [c for c in (max_images, attack.max_images) if c is not None]
    cap = min(caps) if caps else None
    generator = torch.Generator().manual_seed(seed)
    correct, robust, notes = [], [], []
    n = vanished = 0
    max_delta, in_range = 0.0, True
    start = time.perf_counter()
    for x, y in batches:
        if cap is not None:
            if n >= cap:
                break
            x, y = x[: cap - n], y[: cap - n]
        with torch.no_grad():
            was = model.training
            ok = model.eval()(x).argmax(1) == y
            model.train(was)
        out = perturb(model, x, y, attack, generator=generator)
        delta = (out.x_adv - x).flatten(1)
        norms = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        max_delta = max(max_delta, float(norms.max()) if len(x) else 0.0)
        in_range &= bool(((out.x_adv >= 0) & (out.x_adv <= 1)).all())
        unbroken = ok & ~out.fooled  # the clean image counts as an iterate: AAI <= AOI
        if attack.eps > 0:
            g = out.grad_norm[unbroken]
            vanished += int(((g <= VANISHING) | ~torch.isfinite(g)).sum())
        notes += [m for m in out.notes if m not in notes]
        n += len(x)
        correct.append(ok.cpu())
        robust.append(unbroken.cpu())
    correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    robust = torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool)
    aoi = 100.0 * float(correct.sum()) / max(n, 1)
    aai = 100.0 * float(robust.sum()) / max(n, 1)
    return {"attack": attack.name, "images": n, "AOI": aoi, "AAI": aai,
            "DR": 100.0 * (aoi - aai) / aoi if aoi > 0 else float("nan"),
            "max_delta": max_delta, "eps_pixels": attack.eps_pixels, "in_range": in_range,
            "vanishing_gradients": vanished, "notes": notes,
            "seconds": time.perf_counter() - start, "correct": correct, "robust": robust}


# -- feature-space steepness (the paper's Eq. 4) ---------------------------------------
def steepest_neighbour(f: nn.Module, x: torch.Tensor, eps: float, steps: int = 10,
                       rel_step: float = 2.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """The inner maximisation of the paper's Eq. 4 by PGD: for each x, a point x' of the
    L-inf ball of radius ``eps`` (pixels) that maximises ||f(x) - f(x')||_1 / ||x - x'||_inf.

    It starts at a random point of the ball (x itself has ratio 0/0) and takes signed
    ascent steps of ``rel_step * eps / steps`` on the numerator ||f(x) - f(x')||_1, each
    projected back into the ball and [0, 1]: sign steps end on the ball's surface, where
    the denominator is eps, and the denominator's own gradient touches only its largest
    coordinate, which it would make oscillate. f runs in eval mode and only the input gets
    a gradient, as in every attack of this engine. Returns x' detached."""
    if eps <= 0:
        raise AttackError(f"local Lipschitz: eps must be positive, got {eps}")
    was = f.training
    f.eval()
    try:
        x = x.detach()
        with torch.no_grad():
            fx = f(x).flatten(1)
        cur = (x + _random_start(x, "linf", eps, generator)).clamp(0, 1)
        alpha = rel_step * eps / max(steps, 1)
        for _ in range(steps):
            cur.requires_grad_(True)
            with torch.enable_grad():  # the search needs input gradients even when measuring
                spread = (fx - f(cur).flatten(1)).abs().sum()
                grad, = torch.autograd.grad(spread, cur)
            with torch.no_grad():
                cur = (x + _project(cur + alpha * grad.sign() - x, "linf", eps)).clamp(0, 1)
        return cur.detach()
    finally:
        f.train(was)


def _steepness(fx: torch.Tensor, fx_adv: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per sample ||f(x) - f(x')||_1 / ||x - x'||_inf (Eq. 4's ratio)."""
    dist = (x - x_adv).flatten(1).abs().amax(1).clamp_min(1e-12)
    return (fx - fx_adv).abs().sum(1) / dist


def local_lipschitz(f: nn.Module, x: torch.Tensor, eps: float, steps: int = 10,
                    rel_step: float = 2.5, generator: torch.Generator | None = None,
                    x_adv: torch.Tensor | None = None) -> torch.Tensor:
    """LL(f(X)) of the paper's Eq. 4 on the batch ``x``: the mean over samples of the
    steepest ratio found by ``steepest_neighbour`` (pass ``x_adv`` to reuse one). The
    value keeps f's graph, so the DM objective can minimise it; under ``torch.no_grad()``
    it only measures (the search still takes its input gradients)."""
    if x_adv is None:
        x_adv = steepest_neighbour(f, x, eps, steps, rel_step, generator)
    both = f(torch.cat([x, x_adv])).flatten(1)  # one pass: BatchNorm sees both halves together
    fx, fx_adv = both[: len(x)], both[len(x):]
    return _steepness(fx, fx_adv, x, x_adv).mean()
