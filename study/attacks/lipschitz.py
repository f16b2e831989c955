"""DM's Eq. 4: the steepest neighbour of an image (the inner max) and the local
Lipschitz estimate LL that the DM objective and the analyses use."""

from __future__ import annotations

import torch
from torch import nn

from study.attacks.engine import _project, _random_start
from study.items import AttackError


def steepest_neighbour(
    f: nn.Module,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 2.5,
    generator: torch.Generator | None = None,
    distance: str = "l1",
    start_std: float | None = None,
) -> torch.Tensor:
    """The inner maximisation of the paper's Eq. 4 by PGD: for each x, a point x' of the
    L-inf ball of radius ``eps`` (pixels) that maximises ||f(x) - f(x')||_1 / ||x - x'||_inf.

    It starts at a random point of the ball (x itself has ratio 0/0) and takes signed
    ascent steps of ``rel_step * eps / steps`` on the numerator ||f(x) - f(x')||_1, each
    projected back into the ball and [0, 1]: sign steps end on the ball's surface, where
    the denominator is eps, and the denominator's own gradient touches only its largest
    coordinate, which it would make oscillate. f runs in eval mode and only the input gets
    a gradient, as in every attack of this engine. Returns x' detached.

    The authors' released DM (``distance="mse"``, ``start_std``): the steps ascend the mean
    squared feature distance instead, from x plus Gaussian noise of std ``start_std``."""
    if eps <= 0:
        raise AttackError(f"local Lipschitz: eps must be positive, got {eps}")
    if distance not in ("l1", "mse"):
        raise AttackError(f"feature distance must be l1 or mse, got {distance!r}")
    was = f.training
    f.eval()
    try:
        x = x.detach()
        with torch.no_grad():
            fx = f(x).flatten(1)
        if start_std is None:
            cur = (x + _random_start(x, "linf", eps, generator)).clamp(0, 1)
        else:
            cur = x + start_std * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        alpha = rel_step * eps / max(steps, 1)
        for _ in range(steps):
            cur.requires_grad_(True)
            with torch.enable_grad():  # the search needs input gradients even when measuring
                gap = fx - f(cur).flatten(1)
                spread = gap.abs().sum() if distance == "l1" else gap.pow(2).mean()
                (grad,) = torch.autograd.grad(spread, cur)
            with torch.no_grad():
                cur = (x + _project(cur + alpha * grad.sign() - x, "linf", eps)).clamp(0, 1)
        return cur.detach()
    finally:
        f.train(was)


def steepness(fx: torch.Tensor, fx_adv: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per sample ||f(x) - f(x')||_1 / ||x - x'||_inf (Eq. 4's ratio)."""
    dist = (x - x_adv).flatten(1).abs().amax(1).clamp_min(1e-12)
    return (fx - fx_adv).abs().sum(1) / dist


def local_lipschitz(
    f: nn.Module,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 2.5,
    generator: torch.Generator | None = None,
    x_adv: torch.Tensor | None = None,
) -> torch.Tensor:
    """LL(f(X)) of the paper's Eq. 4 on the batch ``x``: the mean over samples of the
    steepest ratio found by ``steepest_neighbour`` (pass ``x_adv`` to reuse one). The
    value keeps f's graph, so the DM objective can minimise it; under ``torch.no_grad()``
    it only measures (the search still takes its input gradients)."""
    if x_adv is None:
        x_adv = steepest_neighbour(f, x, eps, steps, rel_step, generator)
    both = f(torch.cat([x, x_adv])).flatten(1)  # one pass: BatchNorm sees both halves together
    fx, fx_adv = both[: len(x)], both[len(x) :]
    return steepness(fx, fx_adv, x, x_adv).mean()
