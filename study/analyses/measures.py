"""The measures of Section 4, on tensors and models: SVCCA (Raghu et al. 2017), unbiased
RBF-kernel MMD² with the median bandwidth, and the GAP generator of a targeted universal
perturbation (Poursaeed et al. 2018) with the effect of a UAP on a model."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from study.evaluate import mask_bits
from study.report.figures import pyplot, save_png

# -- SVCCA -----------------------------------------------------------------------------


def _svd_keep(a: torch.Tensor, keep: float) -> torch.Tensor:
    """The centred rows of ``a`` in the top singular directions holding ``keep`` of the
    variance (directions with no variance are always dropped)."""
    _, s, vt = torch.linalg.svd(a, full_matrices=False)
    var = s**2
    k = int((torch.cumsum(var, 0) / var.sum() < keep - 1e-12).sum()) + 1
    k = min(k, int((s > s[0] * 1e-8).sum()))
    return a @ vt[:k].T


def cca_correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The canonical correlations of two centred, full-column-rank row sets."""
    qa, _ = torch.linalg.qr(a)
    qb, _ = torch.linalg.qr(b)
    return torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)


def svcca(a: torch.Tensor, b: torch.Tensor, keep: float = 0.99) -> float:
    """Mean SVCCA correlation of two representations of the same rows: (n, d_a), (n, d_b)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"SVCCA needs the same rows on both sides, got {a.shape[0]} and {b.shape[0]}")
    a = a.double().flatten(1)
    b = b.double().flatten(1)
    a = _svd_keep(a - a.mean(0), keep)
    b = _svd_keep(b - b.mean(0), keep)
    return float(cca_correlations(a, b).mean())


def layer_rows(act: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C, H, W) activations as (N*H*W, C) rows, one per spatial position, and a
    transformer's (N, tokens, width) as (N*tokens, width), one per token; ``rows`` picks
    a subset (the same for every model compared)."""
    if act.dim() == 4:
        r = act.permute(0, 2, 3, 1).reshape(-1, act.shape[1])
    else:
        r = act.reshape(-1, act.shape[-1]) if act.dim() == 3 else act.flatten(1)
    return r if rows is None else r[rows]


# -- MMD -------------------------------------------------------------------------------


def median_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: s with s^2 half the median squared distance between samples."""
    x = x.double().flatten(1)
    d2 = torch.cdist(x, x).pow(2)
    off = d2[~torch.eye(len(x), dtype=torch.bool)]
    return float(float(off.median()) / 2 or 1.0) ** 0.5


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012) with the RBF kernel exp(-|a-b|^2 / (2 s^2));
    s^2 defaults to half the median squared distance over the pooled samples."""
    x, y = x.double().flatten(1), y.double().flatten(1)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("MMD needs at least two samples on each side")
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(z), dtype=torch.bool)]
        s2 = float(off.median()) / 2 or 1.0
    else:
        s2 = float(bandwidth) ** 2
    k = torch.exp(-d2 / (2 * s2))
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return float(
        (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        - 2 * kxy.mean()
    )


# -- GAP: a generator of universal perturbations ----------------------------------------


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return x + self.body(x)


class GapGenerator(nn.Module):
    """Poursaeed et al.'s ResNet encoder-decoder, made small: a fixed noise image in, a
    perturbation out, bounded by ``eps`` (pixels, L-inf) through ``eps * tanh``, so it
    can never exceed the bound."""

    def __init__(self, side: int, eps: float, width: int = 16, blocks: int = 2, seed: int = 0):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"UAP: eps must be positive, got {eps}")
        self.eps = float(eps)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("z", torch.rand(1, 3, side, side, generator=g))
        c = width
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 7, padding=3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(True),
            *[_Residual(2 * c) for _ in range(blocks)],
            nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(True),
            nn.Conv2d(c, 3, 7, padding=3),
        )

    def forward(self) -> torch.Tensor:
        # eps as the largest float32 not above it: float32(eps) itself may round up
        e = torch.tensor(self.eps, dtype=torch.float32, device=self.z.device)
        if float(e) > self.eps:
            e = torch.nextafter(e, torch.zeros_like(e))
        return (e * torch.tanh(self.net(self.z))[0]).clamp(-e, e)


def train_uap(
    model: nn.Module,
    batches,
    target: int,
    eps: float,
    steps: int,
    lr: float = 2e-3,
    seed: int = 0,
    side: int | None = None,
) -> torch.Tensor:
    """A targeted UAP for ``model``: the generator learns to make every image of
    ``batches`` (an iterable of (x, y), cycled) classify as ``target``. Returns the
    perturbation (3, H, W), detached, |delta| <= eps."""
    batches = list(batches)
    if not batches:
        raise ValueError("UAP: no training images")
    side = side or batches[0][0].shape[-1]
    torch.manual_seed(seed)
    gen = GapGenerator(side, eps, seed=seed)
    opt = torch.optim.Adam(gen.parameters(), lr=lr, betas=(0.5, 0.999))
    model.eval()
    for step in range(steps):
        x, _ = batches[step % len(batches)]
        delta = gen()
        logits = model((x + delta).clamp(0, 1))
        loss = F.cross_entropy(logits, torch.full((len(x),), target, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    gen.eval()
    with torch.no_grad():
        return gen().detach()


def _fit(delta: torch.Tensor, side: int) -> torch.Tensor:
    """A UAP made at another resolution, resized (its bound is kept: interpolation does
    not exceed the extremes)."""
    if delta.shape[-1] == side:
        return delta
    return F.interpolate(delta[None], size=(side, side), mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def uap_effect(model: nn.Module, batches, delta: torch.Tensor, target: int | None) -> dict:
    """On ``batches``: accuracy clean and under ``delta``, and (targeted) the success rate,
    the share of images not of class ``target`` that ``delta`` sends to ``target``."""
    model.eval()
    n = clean = hit = others = under = 0
    oks, unders = [], []
    for x, y in batches:
        d = _fit(delta, x.shape[-1])
        p0 = model(x).argmax(1)
        p = model((x + d).clamp(0, 1)).argmax(1)
        oks.append((p0 == y).cpu())
        unders.append((p == y).cpu())
        n += len(y)
        clean += int((p0 == y).sum())
        under += int((p == y).sum())
        if target is not None:
            mask = y != target
            others += int(mask.sum())
            hit += int((p[mask] == target).sum())
    aoi, acc = 100.0 * clean / max(n, 1), 100.0 * under / max(n, 1)
    return {
        "images": n,
        "AOI": aoi,
        "acc_under_uap": acc,
        "correct": mask_bits(torch.cat(oks)),
        "robust": mask_bits(torch.cat(unders)),
        "DR": 100.0 * (aoi - acc) / aoi if aoi > 0 else float("nan"),
        "success": 100.0 * hit / max(others, 1) if target is not None else None,
    }


def save_perturbation_png(delta: torch.Tensor, path: Path, title: str = "") -> None:
    """The perturbation scaled to [0, 1] for the eye (Fig. 4)."""
    d = delta.detach().float()
    img = ((d - d.min()) / (d.max() - d.min()).clamp_min(1e-12)).permute(1, 2, 0).numpy()
    fig, ax = pyplot().subplots(figsize=(2.4, 2.6))
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    save_png(fig, path)


# -- the actor ----------------------------------------------------------------------------
