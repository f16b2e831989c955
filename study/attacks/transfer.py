"""Transfer attacks from the public backbone, on the attack engine: crafting the
perturbations on the pre-trained model f₀ alone (``craft``: the engine's PGD with a feature
distance or a linear probe's cross-entropy as its loss), and applying crafted
perturbations to any model (``apply``: the item's run). Which f₀, which images and where
the perturbations are kept is study.threat's."""

from __future__ import annotations

import torch
from torch import nn

from study.attacks.engine import pgd
from study.attacks.run import changed_record
from study.items import AttackError, Item


class Features(nn.Module):
    """f₀'s features of an image at ``layer`` (a stage of its backbone), flattened; f's
    output (the pooled features g reads) when ``layer`` is empty."""

    def __init__(self, model, layer: str = ""):
        super().__init__()
        self.model, self.layer = model, layer
        if layer and layer not in model.f.stages:
            raise AttackError(f"layer {layer!r}: not a stage of {model.backbone_name} ({', '.join(model.f.stages)})")

    def forward(self, x):
        out = self.model.layers(x, self.layer)[self.layer] if self.layer else self.model.f(x)
        return out.flatten(1)


def feature_distance(features: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per image: the squared distance of the features from the clean image's (what the
    feature attack ascends; it needs no label)."""
    return (features - clean).pow(2).sum(1)


def craft(model: nn.Module, batches, item: Item, cap: int | None, seed: int, progress=None) -> torch.Tensor:
    """The perturbations δ of the first ``cap`` images of ``batches``, crafted on ``model``:
    for ``feature``, ``Features`` of f₀ (labels are not read); for ``surrogate``, f₀ with a
    linear probe as its head (``batches``' labels). Each batch draws its random start from
    ``seed`` and its first image's index, so a batch's δ does not depend on the batches
    before it. Returns δ on the CPU, (images, 3, H, W)."""
    model.eval()
    deltas, seen = [], 0
    for x, y in batches:
        if cap is not None and seen >= cap:
            break
        if cap is not None:
            x, y = x[: cap - seen], y[: cap - seen]
        generator = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + seen)
        if item.kind == "feature":
            with torch.no_grad():
                clean = model(x).float()
            adv = pgd(model, x, clean, item, generator=generator, loss=feature_distance)
        else:
            adv = pgd(model, x, y, item, generator=generator)
        deltas.append((adv - x).detach().cpu())
        seen += len(x)
        if progress is not None:
            progress(len(x))
    return torch.cat(deltas) if deltas else torch.zeros(0, 3, 1, 1)


def _in_ball(delta: torch.Tensor, item: Item) -> torch.Tensor:
    if item.norm == "linf":
        return delta.clamp(-item.eps_pixels, item.eps_pixels)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return delta * (item.eps_pixels / norms).clamp(max=1.0)


def apply(model: nn.Module, batches, item: Item, max_images: int | None = None) -> dict:
    """The item's record on ``model``: AOI on the clean images, AAI on the images with the
    crafted δ added (``robust``: right on both, since an attacker may leave an image
    clean), the largest perturbation. The perturbations are read from ``item.path``."""
    if not item.path:
        raise AttackError(f"{item.name}: no crafted perturbations bound to it (study.threat.bind)")
    saved = torch.load(item.path, map_location="cpu", weights_only=True)
    delta = _in_ball(saved["delta"].float(), item)  # kept in half precision: its rounding stays in the ball
    cap = min(c for c in (max_images, item.max_images, len(delta)) if c is not None)

    def perturbed(x, first):
        d = delta[first : first + len(x)].to(x.device, x.dtype)
        if d.shape[1:] != x.shape[1:]:
            raise AttackError(f"{item.name}: perturbations of {tuple(d.shape[1:])} for images of {tuple(x.shape[1:])}")
        return (x + d).clamp(0, 1)

    # robust: right with and without δ, since an attacker may leave an image clean
    return changed_record(
        item.name, model, batches, cap, perturbed, clean_too=True, eps_pixels=item.eps_pixels, source=item.source
    )
