"""FFCV loaders that yield ``(float images in [0, 1], int64 labels)``.

Training: random resized crop + optional horizontal flip, random order, each sample's
crop and flip a function of (seed, epoch, index) (study.data.augment), so a job and its
seed give the same epochs on every run.
Evaluation: centre crop, sequential order, every sample (no dropped last batch).
Normalisation is *not* done here: it is the model's first layer (see study.models).
"""

from __future__ import annotations

from pathlib import Path

import torch

from study.data.beton import check_beton, read_manifest
from study.data.registry import get_info


class ImageLoader:
    """Wraps an FFCV Loader; converts uint8 NCHW batches to float in [0, 1] on ``device``."""

    def __init__(
        self, loader, device: torch.device, channels_last: bool, manifest: dict | None, decoder=None, cell=None
    ):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.manifest = manifest or {}
        self.decoder, self.cell = decoder, cell

    def set_resolution(self, side: int) -> None:
        """The training crop's side from the next epoch on (progressive resizing, as
        ffcv-imagenet does it: the decoder's output size is read when an epoch starts)."""
        if self.decoder is None:
            raise ValueError("set_resolution: only a training loader resizes")
        self.decoder.output_size = (int(side), int(side))

    def set_epoch(self, epoch: int) -> None:
        """The next epoch's index: a resumed run sees the same shuffled order it would have."""
        self.loader.next_epoch = int(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.cell is not None:  # the augmentation's epoch: the one FFCV's order is drawn for
            self.cell.set(self.loader.next_epoch)
        epoch = iter(self.loader)
        try:
            for images, labels in epoch:
                images = images.to(self.device, non_blocking=True)
                if self.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # fresh tensors: FFCV refills its batch buffers, so a caller that keeps a batch
                # past the next one would otherwise hold the next batch's labels (the images
                # are a new tensor already: the cast to float copies them)
                labels = labels.to(self.device, dtype=torch.long, non_blocking=True, copy=True)
                yield images.float().div_(255.0), labels
        finally:
            # an epoch left early (the first N images): FFCV's filling thread would
            # otherwise wait on its full queue for good, waking twice a second
            epoch.close()


def holdout(count: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Splits indices 0..count-1 into (train, validation): a seeded random ``fraction``
    held out for model selection, so choosing among trials never looks at the test split.
    Both lists are sorted; the same count, fraction and seed give the same split."""
    import numpy as np

    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    order = np.random.default_rng(seed).permutation(count)
    n_val = max(1, int(round(fraction * count)))
    if n_val >= count:
        raise ValueError(f"a validation split of {fraction} leaves no training images out of {count}")
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def make_loader(
    beton,
    *,
    train: bool,
    resolution: int,
    batch_size: int,
    dataset: str | None = None,
    workers: int = 2,
    device: str | torch.device = "cpu",
    distributed: bool = False,
    seed: int = 0,
    indices=None,
    drop_last: bool | None = None,
    channels_last: bool = False,
    cache=None,
) -> ImageLoader:
    """An FFCV loader over ``beton``; the dataset's registry entry sets the augmentation.
    ``cache`` (a run's ``Runtime.loaders``): the same arguments give the loader made before
    back, at its first epoch: it yields what a new one would, without compiling again."""
    beton = Path(beton)
    manifest = read_manifest(beton.with_suffix(".json"))
    check_beton(beton, manifest)  # a clear error now beats a numba crash in a worker thread
    drop_last = train if drop_last is None else drop_last
    args = (resolution, batch_size, dataset, workers, distributed, drop_last, torch.device(device), channels_last)
    if distributed or cache is None:  # a distributed shard is the process group's of the moment
        return _new_loader(beton, manifest, train, seed, indices, *args)
    key = _loader_key(beton, train, seed, indices, args)
    loader = cache.get(key, lambda: _new_loader(beton, manifest, train, seed, indices, *args))
    loader.set_epoch(0)
    if loader.decoder is not None:  # progressive resizing may have changed it
        loader.set_resolution(resolution)
    return loader


def _loader_key(beton: Path, train: bool, seed: int, indices, args: tuple) -> tuple:
    import hashlib

    import numpy as np

    st = beton.stat()  # a split written again is another file
    picked = None if indices is None else hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()
    # an evaluation loader reads in order with no augmentation: its seed changes nothing
    return (str(beton.resolve()), st.st_ino, st.st_mtime_ns, st.st_size, train, seed if train else 0, picked, args)


def _new_loader(
    beton: Path,
    manifest,
    train,
    seed,
    indices,
    resolution,
    batch_size,
    dataset,
    workers,
    distributed,
    drop_last,
    device,
    channels_last,
) -> ImageLoader:
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    from study.data.augment import EpochCell, SeededHorizontalFlip, SeededRandomResizedCrop

    info = get_info(dataset or (manifest or {}).get("dataset", "folder"))
    size = (resolution, resolution)
    decoder = cell = None
    if train:
        cell = EpochCell()
        decoder = SeededRandomResizedCrop(size, cell, seed, scale=info.crop_scale)
        image_ops = [decoder]
        if info.flip:
            image_ops.append(SeededHorizontalFlip(cell, seed))
    else:
        image_ops = [CenterCropRGBImageDecoder(size, ratio=info.eval_crop_ratio)]
    image_ops += [ToTensor(), ToTorchImage()]
    loader = Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL,
        distributed=distributed,
        seed=seed,
        indices=indices,
        drop_last=drop_last,
        pipelines={"image": image_ops, "label": [IntDecoder(), ToTensor(), Squeeze(1)]},
    )
    return ImageLoader(loader, device, channels_last, manifest, decoder, cell)
