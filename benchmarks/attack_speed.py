"""Benchmark: this engine's PGD-10 (L-inf) against torchattacks' PGD, in one run.

Same model, same images, same batches, same eps, step (the paper's 1.25 eps / 10) and
start (the clean image by default, a random point with --random-start). Each side
produces what an evaluation needs, AOI and AAI: the reference runs a clean forward
pass, its attack, and a forward pass on the adversarial images; this engine runs
``robust_accuracy``. Timings are the median of interleaved repeats
after a warm-up. Run it on a demo model:

    ./run.sh demo                         # once, to have a full fine-tuned model
    uv run --group bench python benchmarks/attack_speed.py --out runs/demo

It prints, per eps, both times, the speed ratio (reference time / ours), the range of
the ratios of the single interleaved pairs (how much the machine's noise moves it) and
both AAIs. ``--device cuda`` runs both sides on a GPU.
Ours counts a sample as broken if *any* iterate breaks it; the reference looks at its
last iterate only, so our AAI is expected to be at most the reference's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def find_model(out: Path, method: str, dataset: str = "alphabet") -> tuple[Path, Path]:
    """The checkpoint of the chosen ``method`` model on the dataset key ``dataset`` (seed 0,
    the first in results.csv) of a finished job in OUT, and its test .beton. Found through
    results.csv: a checkpoint's file name holds the dataset's name, which two keys may share
    (the demo's letters is an alphabet)."""
    import csv

    table = out / "results.csv"
    if table.is_file():
        with table.open() as fh:
            for row in csv.DictReader(fh):
                pick = row["method"] == method and row["dataset"] == dataset and not row["attack"]
                if pick and row.get("chosen", "True") == "True":
                    ckpt = next((out / "checkpoints").glob(f"*-{row['stage']}.pt"), None)
                    beton = out / "data" / dataset / "test.beton"
                    if ckpt is not None and beton.is_file():
                        return ckpt, beton
    sys.exit(f"no finished '{method}' model on '{dataset}' in {out}: run ./run.sh demo first")


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # the clock must not stop while kernels are still queued
        torch.cuda.synchronize(device)


def reference(model, batches, attack, seed):
    import torchattacks

    torch.manual_seed(seed)
    atk = torchattacks.PGD(
        model, eps=attack.eps_pixels, alpha=attack.step_pixels, steps=attack.steps, random_start=attack.random_start
    )
    n = clean = robust = 0
    for x, y in batches:
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        adv = atk(x, y)
        with torch.no_grad():
            still = model(adv).argmax(1) == y
        n += len(y)
        clean += int(ok.sum())
        robust += int((ok & still).sum())
    return 100.0 * clean / n, 100.0 * robust / n


def ours(model, batches, attack, seed):
    from study.attacks import robust_accuracy
    from study.fastcopy import inference_copy

    r = robust_accuracy(inference_copy(model), batches, attack, seed=seed)  # as evaluate does
    return r["AOI"], r["AAI"]


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The options that pick the model and images (shared with attack_precision.py)."""
    ap.add_argument("--out", default="runs/demo", type=Path, help="a finished demo OUT")
    ap.add_argument("--method", default="full", help="which model of OUT (default: full fine-tune)")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def model_and_batches(args) -> tuple[Path, Path, torch.nn.Module, list]:
    """The model ``args`` name (eval mode, no weight gradients: no side needs them) and the
    first ``args.images`` test images as batches on its device, copied (FFCV reuses its
    buffers); the same tensors for every side."""
    from study.data.loaders import make_loader
    from study.models import load_checkpoint

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ckpt, beton = find_model(args.out, args.method)
    model = load_checkpoint(ckpt).eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    side = json.loads(beton.with_suffix(".json").read_text())["resolution"][0]
    loader = make_loader(beton, train=False, resolution=side, batch_size=args.batch_size, workers=2)
    batches, n = [], 0
    for x, y in loader:
        x, y = x[: args.images - n].contiguous().to(device, copy=True), y[: args.images - n].to(device, copy=True)
        batches.append((x, y))
        n += len(y)
        if n >= args.images:
            break
    return ckpt, beton, model, batches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument(
        "--eps",
        type=float,
        nargs="+",
        default=[0.5, 2.0, 0.01],
        help="L-inf eps in 1/255 (0.01: almost no sample breaks)",
    )
    ap.add_argument(
        "--random-start", action="store_true", help="both sides start at a random point of the ball (Madry's PGD)"
    )
    args = ap.parse_args(argv)

    import torchattacks  # noqa: F401  (fail early: uv run --group bench ...)

    from study.attacks import parse_attack

    ckpt, beton, model, batches = model_and_batches(args)
    device, n = torch.device(args.device), sum(len(y) for _, y in batches)
    print(
        f"model {ckpt.name} ({model.backbone_name}), {n} images of {beton.parent.name}, "
        f"batch {args.batch_size}, {device}"
        f"{f', {args.threads} threads' if device.type == 'cpu' else ''}, {args.repeats} repeats"
    )
    print(
        f"{'eps/255':>8} {'ours s':>8} {'ref s':>8} {'speed-up':>9} {'pairs':>13} {'AOI':>7} "
        f"{'AAI ours':>9} {'AAI ref':>8}"
    )
    rows = []
    for eps in args.eps:
        attack = parse_attack({"name": f"pgd10_linf_{eps}", "random_start": args.random_start})
        ours(model, batches[:1], attack, 0)  # warm-up both
        reference(model, batches[:1], attack, 0)
        t_ours, t_ref = [], []
        for rep in range(args.repeats):
            sync(device)
            t = time.perf_counter()
            aoi, aai = ours(model, batches, attack, rep)
            sync(device)
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            aoi_ref, aai_ref = reference(model, batches, attack, rep)
            sync(device)
            t_ref.append(time.perf_counter() - t)
        a, b = statistics.median(t_ours), statistics.median(t_ref)
        pairs = [r / o for o, r in zip(t_ours, t_ref)]  # each pair ran back to back
        rows.append((eps, a, b, aoi, aai, aai_ref))
        print(
            f"{eps:8.2f} {a:8.2f} {b:8.2f} {b / a:8.2f}x {min(pairs):5.2f}-{max(pairs):.2f}x "
            f"{aoi:7.2f} {aai:9.2f} {aai_ref:8.2f}",
            flush=True,
        )
    print()
    for eps, a, b, aoi, aai, aai_ref in rows:
        broken = 100.0 - aai / max(aoi, 1e-9) * 100.0
        verdict = [f"AAI ours <= ref + 0.5: {'yes' if aai <= aai_ref + 0.5 else 'NO'}", f"speed-up {b / a:.2f}x"]
        if broken < 5:
            verdict.append(
                f"almost nothing breaks ({broken:.1f} % of the correct): not slower: {'yes' if b >= a else 'NO'}"
            )
        else:
            verdict.append(f"{broken:.1f} % of the correct break: >= 3x: {'yes' if b >= 3 * a else 'NO'}")
        print(f"eps {eps}/255: " + "; ".join(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
