"""Benchmark: the FFCV loader against torchvision's DataLoader on the same images.

Fashion-MNIST's training images (a class-balanced sample of them, Debian's
dataset-fashion-mnist by default) are written two ways: as the FFCV .beton the study
trains from, and as an ImageFolder of PNG (or JPEG) files. Both sides then run a
training epoch the same way: shuffled, the dataset's random-resized crop (scale 0.7-1)
to 32 px and a horizontal flip, float images in [0, 1] in batches of 256, with the same
number of loader threads (FFCV's threads, DataLoader's worker processes). It prints
images/s of each, median of --repeats epochs after one warm-up epoch, and the ratio.

    uv run python benchmarks/loader_speed.py                    # 12,000 images, PNG, 2 threads
    uv run python benchmarks/loader_speed.py --format jpg --images 60000 --workers 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def write_folder(dataset, root: Path, fmt: str) -> None:
    """``dataset`` as ROOT/<class index>/<i>.<fmt> (ImageFolder sorts the zero-padded names)."""
    from PIL import Image

    for i in range(len(dataset)):
        img, label = dataset[i]
        d = root / f"{label:02d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.{fmt}", quality=95) if fmt == "jpg" else Image.fromarray(img).save(
            d / f"{i:06d}.{fmt}"
        )


def epoch_rate(loader, to_float=None) -> float:
    start, seen = time.perf_counter(), 0
    for x, y in loader:
        if to_float is not None:
            x = to_float(x)
        seen += len(y)
    return seen / (time.perf_counter() - start)


def ffcv_rates(beton: Path, args) -> list[float]:
    from study.data.loaders import make_loader

    loader = make_loader(
        beton,
        train=True,
        resolution=32,
        batch_size=args.batch_size,
        dataset="fashion_mnist",
        workers=args.workers,
        seed=0,
    )
    epoch_rate(loader)  # warm-up: numba compiles the pipeline
    return [epoch_rate(loader) for _ in range(args.repeats)]


def torch_rates(folder: Path, args) -> list[float]:
    import torch
    from torchvision import datasets, transforms

    from study.data.registry import get_info

    info = get_info("fashion_mnist")
    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(32, scale=info.crop_scale),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
        ]
    )
    ds = datasets.ImageFolder(str(folder), transform=tf)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )
    epoch_rate(loader)  # warm-up: worker processes start
    return [epoch_rate(loader) for _ in range(args.repeats)]


def main(argv=None) -> int:
    from study.data.beton import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=12000, help="training images (a class-balanced sample)")
    ap.add_argument("--format", choices=("png", "jpg"), default="png")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--root", default=None, help="Fashion-MNIST's root (default: Debian's folder)")
    args = ap.parse_args(argv)
    params = {"train_per_class": args.images // 10}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        beton = prepare("fashion_mnist", tmp / "beton", root=args.root, params=params, workers=args.workers)[
            "train"
        ].beton
        from study.data.registry import build_split

        write_folder(build_split("fashion_mnist", "train", root=args.root, params=params), tmp / "folder", args.format)
        ours, theirs = ffcv_rates(beton, args), torch_rates(tmp / "folder", args)
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"{args.images} Fashion-MNIST images, 32 px random-resized crop + flip, batch {args.batch_size}, "
        f"{args.workers} loader threads/processes, median of {args.repeats} epochs"
    )
    print(f"  FFCV .beton                 {a:10.0f} images/s   (epochs: {', '.join(f'{r:.0f}' for r in ours)})")
    epochs = ", ".join(f"{r:.0f}" for r in theirs)
    print(f"  torchvision ImageFolder {args.format}  {b:10.0f} images/s   (epochs: {epochs})")
    print(f"  ratio {a / b:.2f}x  (goal >= 3x: {'yes' if a / b >= 3 else 'no'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
