"""Benchmark: PGD with fp32 ascent (the default) against bf16 ascent, on a trained model.

Both runs attack the same images with the same attack; only the arithmetic of the
ascent steps differs (verdicts are fp32 in both: ``study.attacks``). bf16 can only
weaken the search, so its AAI is expected to be at least fp32's; the gap is the price
of the faster steps. Run it on a demo model:

    ./run.sh demo                              # once, to have a full fine-tuned model
    uv run python benchmarks/attack_precision.py --out runs/demo

It prints, per eps: AOI, AAI with each precision, the AAI gap (bf16 − fp32) with its
95 % paired bootstrap interval over the images, how many images each precision alone
broke, the median time of each (interleaved repeats after a warm-up) and the speed
ratio (fp32 time / bf16 time). bf16 is fast only on hardware with bf16 units (a GPU,
or a CPU with AVX512-BF16/AMX: ``grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo``);
elsewhere oneDNN emulates it and the ratio drops below 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attack_speed import add_model_args, model_and_batches, sync  # noqa: E402  (the same demo model and clock)


def run(model, batches, name: str, precision: str, seed: int) -> dict:
    from study.attacks import parse_attack, robust_accuracy

    return robust_accuracy(model, batches, parse_attack({"name": name, "precision": precision}), seed=seed)


def aai_gap(res: dict) -> dict:
    """AAI with bf16 minus with fp32 and its 95 % paired bootstrap interval over the images
    (study.stats.paired_effect on one run, as the claims draw it)."""
    from study.claims import rate_gap
    from study.stats import paired_effect

    models = {p: (r["correct"].numpy(), r["robust"].numpy()) for p, r in res.items()}
    return paired_effect([models], rate_gap("bf16", "fp32", 1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--eps", type=float, nargs="+", default=[0.5, 2.0], help="L-inf eps in 1/255")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    from study.fastcopy import inference_copy

    ckpt, beton, model, batches = model_and_batches(args)
    model = inference_copy(model)  # what evaluate attacks
    device, n = torch.device(args.device), sum(len(y) for _, y in batches)
    print(f"model {ckpt.name}, {n} images of {beton.parent.name}, batch {args.batch_size}, {device}")
    print(
        f"{'attack':>18} {'AOI':>6} {'AAI fp32':>9} {'AAI bf16':>9} {'gap [95 % CI]':>22} "
        f"{'only fp32 broke':>16} {'only bf16 broke':>16} {'fp32 s':>7} {'bf16 s':>7} {'fp32/bf16':>9}"
    )
    for eps in args.eps:
        name = f"pgd{args.steps}_linf_{eps}"
        for precision in ("fp32", "bf16"):  # warm-up
            run(model, batches[:1], name, precision, 0)
        times: dict = {"fp32": [], "bf16": []}
        res: dict = {}
        for _ in range(args.repeats):
            for precision in ("fp32", "bf16"):
                sync(device)
                t = time.perf_counter()
                res[precision] = run(model, batches, name, precision, 0)
                sync(device)
                times[precision].append(time.perf_counter() - t)
        a, b = (res[p]["robust"].numpy() for p in ("fp32", "bf16"))
        g = aai_gap(res)
        gap, lo, hi = g["effect"], g["lo"], g["hi"]
        t32, t16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        print(
            f"{name:>18} {res['fp32']['AOI']:6.2f} {res['fp32']['AAI']:9.2f} {res['bf16']['AAI']:9.2f} "
            f"{f'{gap:+.2f} [{lo:+.2f}, {hi:+.2f}]':>22} {int((~a & b).sum()):>16} {int((a & ~b).sum()):>16} "
            f"{t32:7.2f} {t16:7.2f} {t32 / t16:8.2f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
