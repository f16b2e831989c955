"""DM's regulariser against the cross-entropy it is added to, in both forms.

DM@stage-1&2 minimises CE + λ · R. How large R is decides which λ means anything: the
paper's Eq. 4 (``dm.form: eq4``, R = LL = ||f(x) - f(x')||_1 / ||x - x'||_inf) and the
authors' released train_dm.py (``dm.form: code``, R = (1/B) MSE(f(x'), f(x))) differ by
orders of magnitude. This prints CE, R and R/CE of each form on one batch of a target
dataset, with the model a DM trial starts from: a pre-trained backbone and a fresh
classifier (the first step of fine-tuning), in training mode as the trial runs it.

    uv run python benchmarks/dm_scale.py --out runs/demo            # the demo's robust backbone
    uv run python benchmarks/dm_scale.py --checkpoint X.pt --dataset alphabet --beton-dir D
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.nn import functional as F


def regularisers(model, x, y) -> dict:
    """CE and each form's R (with its default radius and steps) at the model as it is."""
    from study import objectives
    from study.config import DMSpec

    with torch.no_grad():
        out = {"CE": float(F.cross_entropy(model(x), y))}
    for form in ("eq4", "code"):
        spec = DMSpec(form=form)
        build = objectives.discrepancy_mitigating if form == "eq4" else objectives.discrepancy_mitigating_code
        g = torch.Generator().manual_seed(0)
        loss, _ = build(1.0, spec.eps, spec.steps, spec.rel_step, generator=g)(model, x, y)
        out[form] = float(loss.detach()) - out["CE"]  # λ = 1: the loss minus CE is R itself
    return out


def main(argv=None) -> int:
    from study.data.loaders import make_loader
    from study.models import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="a demo OUT: its adversarial backbone and alphabet")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--beton", type=Path, help="the target's train .beton")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=32)
    args = ap.parse_args(argv)
    if args.out is not None:
        args.checkpoint = args.checkpoint or next((args.out / "checkpoints").glob("pretrain-*-fgsm_*[!l].pt"))
        args.beton = args.beton or args.out / "data" / "alphabet" / "train.beton"
    if args.checkpoint is None or args.beton is None:
        ap.error("give --out, or --checkpoint and --beton")
    torch.manual_seed(0)
    loader = make_loader(
        args.beton, train=True, resolution=args.resolution, batch_size=args.batch_size, workers=1, seed=0
    )
    x, y = next(iter(loader))
    model = load_checkpoint(args.checkpoint)
    model.reset_classifier(len(loader.manifest["classes"]))  # the trial's start: a fresh g
    model.train()
    r = regularisers(model, x, y)
    print(f"checkpoint {args.checkpoint.name}, {len(x)} images of {args.beton}")
    print(f"{'':6s} {'R':>12s} {'R / CE':>12s}")
    print(f"{'CE':6s} {r['CE']:12.4g}")
    for form in ("eq4", "code"):
        print(f"{form:6s} {r[form]:12.4g} {r[form] / r['CE']:12.4g}")
    print(f"eq4 / code: {r['eq4'] / r['code']:.3g}   (λ of order CE / R makes λ·R comparable with CE)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
