"""The dataset registry: a name maps to a builder of indexable splits.

Every split yields ``(HxWx3 uint8 RGB array, int label)`` and carries ``classes``
(the label names, index = label). Labels always come from a fixed, sorted or
published class list, never from an unsorted directory listing.

Real datasets are read from a user-given root in their published on-disk layout
(the one torchvision's ``download=True`` produces); nothing here downloads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from study.data import synthetic


class DatasetError(ValueError):
    """A dataset that cannot be built: unknown name, missing or malformed root."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    build: Callable[..., object]  # build(split, root=..., **params) -> split dataset
    generated: bool = False  # needs no root
    write_mode: str = "jpg"  # FFCV storage: raw for pixel-exact synthetic images
    max_resolution: int = 256  # longest side stored in the .beton (real data)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale for training
    flip: bool = True  # random horizontal flip for training
    eval_crop_ratio: float = 224 / 256  # centre-crop ratio at evaluation
    params: dict = field(default_factory=dict)  # accepted parameters and their defaults
    description: str = ""
    default_root: str | None = None  # the root when the job gives none, if that folder exists

    def root_or_default(self, root):
        if root is None and self.default_root and Path(self.default_root).is_dir():
            return self.default_root
        return root


class _RGB:
    """Adapts a torchvision dataset (PIL images) to (uint8 RGB array, label)."""

    def __init__(self, dataset, classes):
        self.dataset, self.classes = dataset, list(classes)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        img, label = self.dataset[i]
        return np.asarray(img.convert("RGB"), dtype=np.uint8), int(label)


class _Concat(_RGB):
    def __init__(self, parts, classes):
        import torch.utils.data

        super().__init__(torch.utils.data.ConcatDataset(parts), classes)


def _root(root, name) -> Path:
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a data root (--root or data.root)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"data root for {name!r} does not exist: {path}")
    return path


def _torchvision(factory):
    """Wraps torchvision's 'not found' RuntimeError into a DatasetError naming the root."""

    def build(split, root=None, name="", **_):
        path = _root(root, name)
        try:
            return factory(split, str(path))
        except RuntimeError as err:
            raise DatasetError(f"{name}: {err} (looked under {path})") from None

    return build


def _cifar10(split, root):
    from torchvision.datasets import CIFAR10

    ds = CIFAR10(root, train=split == "train", download=False)
    return _RGB(ds, ds.classes)


def _pets(split, root):
    from torchvision.datasets import OxfordIIITPet

    ds = OxfordIIITPet(root, split="trainval" if split == "train" else "test", target_types="category", download=False)
    return _RGB(ds, ds.classes)


def _flowers(split, root):
    from torchvision.datasets import Flowers102

    # The usual protocol trains on train+val (2 x 10 per class) and tests on test.
    names = ["train", "val"] if split == "train" else ["test"]
    parts = [Flowers102(root, split=s, download=False) for s in names]
    return _Concat(parts, [f"flower_{i:03d}" for i in range(1, 103)])


def _cars(split, root):
    from torchvision.datasets import StanfordCars

    ds = StanfordCars(root, split=split, download=False)
    return _RGB(ds, ds.classes)


def _food(split, root):
    from torchvision.datasets import Food101

    ds = Food101(root, split=split, download=False)
    return _RGB(ds, ds.classes)


def per_class(targets, k: int) -> list[int]:
    """The first ``k`` indices (in file order) of every class, interleaved by class
    (index i is class i % classes while every class has images), so any prefix is
    class-balanced."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    return [by_class[c][j] for j in range(k) for c in sorted(by_class) if j < len(by_class[c])]


class _PerClass(_RGB):
    """A class-balanced sample (``per_class``) of a dataset: a source task's images for
    the analyses without writing all of it."""

    def __init__(self, dataset, classes, k: int):
        super().__init__(dataset, classes)
        self.index = per_class(dataset.targets, k)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        return super().__getitem__(self.index[i])


def _image_folder(split_dirs: dict[str, tuple[str, ...]]):
    """ImageFolder trees: ROOT/<split dir>/<class>/<image>; classes sorted by name.
    ``train_per_class`` / ``test_per_class`` keep that many images of each class."""

    def build(split, root=None, name="", train_per_class=None, test_per_class=None, **_):
        from torchvision.datasets import ImageFolder

        path = _root(root, name)
        k = train_per_class if split == "train" else test_per_class
        for sub in split_dirs[split]:
            if (path / sub).is_dir():
                ds = ImageFolder(str(path / sub))
                return _RGB(ds, ds.classes) if k is None else _PerClass(ds, ds.classes, k)
        wanted = " or ".join(f"{path / s}" for s in split_dirs[split])
        raise DatasetError(f"{name}: no {split} split folder: expected {wanted}")

    return build


def _generated(cls):
    def build(split, root=None, name="", train_per_class=None, test_per_class=None, **params):
        per_class = train_per_class if split == "train" else test_per_class
        return cls(split, per_class=per_class, **params)

    return build


FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(root: Path, stem: str) -> Path:
    """An IDX file in Debian's flat folder or torchvision's ROOT/FashionMNIST/raw, gzipped or not."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetError(
        f"fashion_mnist: {stem} (or {stem}.gz) not found under {root} or {root / 'FashionMNIST' / 'raw'}"
    )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (LeCun's MNIST format), gzipped or not, as an array;
    a truncated or malformed file is refused naming it."""
    import gzip
    import struct

    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{path}: unreadable IDX file ({err})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes")
    head = 4 + 4 * data[3]
    if len(data) < head:
        raise DatasetError(f"{path}: truncated IDX file (header cut off)")
    dims = struct.unpack(f">{data[3]}I", data[4:head])
    need = int(np.prod(dims))
    if len(data) - head != need:
        raise DatasetError(f"{path}: truncated IDX file ({len(data) - head} of {need} bytes of data)")
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


class _Grey:
    """IDX images and labels as (HxWx3 uint8, label): the grey channel three times."""

    def __init__(self, images, labels, classes, index):
        self.images, self.labels, self.classes, self.index = images, labels, list(classes), index

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = self.index[i]
        return np.repeat(self.images[j][:, :, None], 3, axis=2), int(self.labels[j])


def _fashion_mnist(split, root=None, name="", train_per_class=None, test_per_class=None, **_):
    from torchvision.datasets import FashionMNIST

    path = _root(root, name)
    images, labels = (read_idx(_idx_path(path, stem)) for stem in IDX[split])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"fashion_mnist: {split} images {images.shape} and labels {labels.shape} do not match (under {path})"
        )
    k = train_per_class if split == "train" else test_per_class
    index = list(range(len(labels))) if k is None else per_class(labels, k)
    return _Grey(images, labels, FashionMNIST.classes, index)


PER_CLASS = dict(train_per_class=None, test_per_class=None)  # None: every image
REGISTRY: dict[str, DatasetInfo] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    REGISTRY[info.name] = info
    return info


register(
    DatasetInfo(
        "alphabet",
        _generated(synthetic.Alphabet),
        generated=True,
        write_mode="raw",
        crop_scale=(0.8, 1.0),
        flip=False,
        eval_crop_ratio=1.0,
        params=dict(train_per_class=1000, test_per_class=200, image_size=32, seed=0, max_offset=0.18, noise_std=0.12),
        description="26 letters, offset and noised (the paper's Alphabet)",
    )
)
register(
    DatasetInfo(
        "shapes",
        _generated(synthetic.Shapes),
        generated=True,
        write_mode="raw",
        crop_scale=(0.5, 1.0),
        flip=True,
        eval_crop_ratio=1.0,
        params=dict(
            train_per_class=200,
            test_per_class=40,
            image_size=32,
            seed=0,
            noise_std=0.06,
            min_scale=0.5,
            by="shape_texture",
        ),
        description="50 (shape, texture) classes; the demo's stand-in for ImageNet "
        "(by: shape gives the 10 shapes as classes, by: texture the 5 textures)",
    )
)
register(
    DatasetInfo(
        "fashion_mnist",
        _fashion_mnist,
        write_mode="raw",
        max_resolution=28,
        crop_scale=(0.7, 1.0),
        flip=True,
        eval_crop_ratio=1.0,
        params=PER_CLASS,
        default_root=FASHION_MNIST_DEBIAN,
        description="Zalando's Fashion-MNIST: IDX files (gzip or not) flat under root, as Debian's "
        "dataset-fashion-mnist installs them (the default root), or torchvision's "
        "ROOT/FashionMNIST/raw; 28x28 grey as RGB",
    )
)
register(
    DatasetInfo(
        "cifar10",
        _torchvision(_cifar10),
        max_resolution=32,
        crop_scale=(0.35, 1.0),
        eval_crop_ratio=1.0,
        description="torchvision CIFAR10 (cifar-10-batches-py under root)",
    )
)
register(DatasetInfo("pets", _torchvision(_pets), description="torchvision OxfordIIITPet (oxford-iiit-pet under root)"))
register(
    DatasetInfo(
        "flowers",
        _torchvision(_flowers),
        description="torchvision Flowers102 (flowers-102 under root), train+val / test",
    )
)
register(DatasetInfo("cars", _torchvision(_cars), description="torchvision StanfordCars (stanford_cars under root)"))
register(DatasetInfo("food", _torchvision(_food), description="torchvision Food101 (food-101 under root)"))
register(
    DatasetInfo(
        "imagenet",
        _image_folder({"train": ("train",), "test": ("val",)}),
        params=PER_CLASS,
        description="ImageFolder tree ROOT/train, ROOT/val",
    )
)
register(
    DatasetInfo(
        "nico",
        _image_folder({"train": ("train",), "test": ("test", "val")}),
        params=PER_CLASS,
        description="NICO as an ImageFolder tree ROOT/train, ROOT/test",
    )
)
register(
    DatasetInfo(
        "folder",
        _image_folder({"train": ("train",), "test": ("test", "val")}),
        params=PER_CLASS,
        description="any ImageFolder tree ROOT/train, ROOT/test (or ROOT/val)",
    )
)

SPLITS = ("train", "test")


def get_info(name: str) -> DatasetInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r} (known: {', '.join(sorted(REGISTRY))})") from None


def resolve_params(name: str, params: dict | None) -> dict:
    """The dataset's parameters with defaults filled in; unknown keys are refused."""
    info = get_info(name)
    params = dict(params or {})
    unknown = sorted(set(params) - set(info.params))
    if unknown:
        allowed = ", ".join(sorted(info.params)) or "none"
        raise DatasetError(f"dataset {name!r} takes no parameter {unknown[0]!r} (allowed: {allowed})")
    for key, value in params.items():
        default = info.params[key]
        if (
            default is None
            and key.endswith("_per_class")
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value <= 0)
        ):
            raise DatasetError(f"{key}: must be a positive integer, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DatasetError(f"{key}: expected a number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                raise DatasetError(f"{key}: expected an integer, got {value!r}")
            if key != "seed" and (value < 0 or (isinstance(default, int) and value == 0)):
                raise DatasetError(
                    f"{key}: must be {'positive' if isinstance(default, int) else '>= 0'}, got {value!r}"
                )
    return {**info.params, **params}


def build_split(name: str, split: str, root=None, params: dict | None = None):
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    info = get_info(name)
    return info.build(split, root=info.root_or_default(root), name=name, **resolve_params(name, params))
