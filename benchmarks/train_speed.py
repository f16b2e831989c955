"""Benchmark: clean training against PGD-k adversarial training, same model, same batch.

Both sides run the one training engine (study.engine.Trainer) for the same number of
optimiser steps on the same batch; only the objective differs (study.objectives:
``standard`` against ``pgd<k>_linf_<eps>``). It prints images/s of each, their ratio, and
checks it against 1/(k+1): PGD-k does k attack passes plus one training pass, and the
attack passes build no weight gradients, so they cost less than a training step each.

    uv run python benchmarks/train_speed.py                       # ResNet-18, 32 px, CPU
    uv run python benchmarks/train_speed.py --backbone resnet50 --resolution 160 \\
        --batch-size 256 --device cuda                            # bf16 + channels_last
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def throughput(backbone, objective, x, y, device, amp, steps, repeats) -> list[float]:
    from study import objectives
    from study.engine import Trainer, TrainSettings
    from study.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, int(y.max()) + 1)
    settings = TrainSettings(epochs=1, batch_size=len(x), lr_f=0.01, lr_g=0.01, amp=amp)
    trainer = Trainer(
        model, settings, "f+g", steps, device, objectives.build(objective, generator=torch.Generator().manual_seed(0))
    )
    if trainer.amp:
        x = x.contiguous(memory_format=torch.channels_last)
    batch = [(x, y)]
    trainer.train_epoch(batch, progress=False)  # warm-up (cuDNN autotune, allocator)
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        trainer.train_epoch(batch * steps, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(steps * len(x) / (time.perf_counter() - t))
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--k", type=int, default=3, help="PGD steps of adversarial training")
    ap.add_argument("--eps", type=float, default=4.0, help="L-inf eps in 1/255")
    ap.add_argument("--steps", type=int, default=5, help="optimiser steps per timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-amp", action="store_true", help="on CUDA: float32, no channels_last")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=gen).to(device)
    y = torch.randint(0, 100, (args.batch_size,), generator=gen).to(device)
    amp = not args.no_amp
    adv = f"pgd{args.k}_linf_{args.eps}"
    print(
        f"{args.backbone} at {args.resolution} px, batch {args.batch_size}, {device}"
        f"{' bf16 + channels_last' if amp and device.type == 'cuda' else ' float32'}, "
        f"{args.steps} steps x {args.repeats} repeats (median)"
    )
    clean, pgd = [], []
    for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
        clean += throughput(args.backbone, "standard", x, y, device, amp, args.steps, 1)
        pgd += throughput(args.backbone, adv, x, y, device, amp, args.steps, 1)
    c, p = statistics.median(clean), statistics.median(pgd)
    print(f"{'objective':>16} {'images/s':>10}")
    print(f"{'standard':>16} {c:10.1f}")
    print(f"{adv:>16} {p:10.1f}")
    bound = 1.0 / (args.k + 1)
    print(
        f"ratio PGD-{args.k} / clean: {p / c:.3f} (1/(k+1) = {bound:.3f}): "
        f"{'yes' if p / c >= bound else 'NO'}, at least 1/(k+1)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
