"""Each real dataset read from a tiny fixture written in its published on-disk layout
(the one torchvision's download produces), then converted to a .beton and loaded."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from study.data.beton import prepare
from study.data.loaders import make_loader
from study.data.registry import DatasetError, build_split


def _jpg(path, seed, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _roundtrip(name, root, n_train, n_test, classes):
    """build -> .beton -> loader: counts, labels and class names survive."""
    for split, n in (("train", n_train), ("test", n_test)):
        ds = build_split(name, split, root=root)
        assert len(ds) == n and list(ds.classes) == classes
    out = prepare(name, root / "_beton", root=root, workers=1)
    for split, n in (("train", n_train), ("test", n_test)):
        m = out[split].manifest
        assert m["count"] == n and m["classes"] == classes
        loader = make_loader(out[split].beton, train=False, resolution=16, batch_size=64, workers=1)
        labels = torch.cat([y for _, y in loader])
        ds = build_split(name, split, root=root)
        assert labels.tolist() == [ds[i][1] for i in range(len(ds))]


def test_cifar10(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, f in enumerate(files):
        batch = {
            "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
            "labels": [(i + j) % 10 for j in range(3)],
            "batch_label": f,
        }
        (base / f).write_bytes(pickle.dumps(batch))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    # torchvision checks the published md5s; point them at the fixture's files
    monkeypatch.setattr(CIFAR10, "train_list", [[f, _md5(base / f)] for f in files[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(base / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(base / "batches.meta")})
    _roundtrip("cifar10", tmp_path, 15, 3, names)
    img, label = build_split("cifar10", "train", root=tmp_path)[0]
    assert img.shape == (32, 32, 3) and label == 0


def test_pets(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    rows = {
        "trainval": [("Abyssinian_1", 1), ("Abyssinian_2", 1), ("basset_hound_1", 2), ("basset_hound_2", 2)],
        "test": [("Abyssinian_3", 1), ("basset_hound_3", 2)],
    }
    for split, items in rows.items():
        for k, (image_id, _label) in enumerate(items):
            _jpg(base / "images" / f"{image_id}.jpg", k)
        ann = base / "annotations" / f"{split}.txt"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text("".join(f"{i} {lab} {1 if lab == 1 else 2} 1\n" for i, lab in items))
    _roundtrip("pets", tmp_path, 4, 2, ["Abyssinian", "Basset Hound"])


def test_flowers(tmp_path, monkeypatch):
    from torchvision.datasets import Flowers102

    base = tmp_path / "flowers-102"
    labels = np.array([1, 2, 1, 2, 3, 3, 1, 2])  # 1-based, one per image
    for i in range(1, len(labels) + 1):
        _jpg(base / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(
        base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]), "tstid": np.array([5, 6, 7, 8])}
    )
    monkeypatch.setattr(
        Flowers102,
        "_file_dict",
        {
            "image": Flowers102._file_dict["image"],
            "label": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
            "setid": ("setid.mat", _md5(base / "setid.mat")),
        },
    )
    _roundtrip("flowers", tmp_path, 4, 4, [f"flower_{i:03d}" for i in range(1, 103)])
    ds = build_split("flowers", "test", root=tmp_path)
    assert [ds[i][1] for i in range(4)] == [2, 2, 0, 1]


def test_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    annos_type = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]

    def annos(items):
        return np.array([(1, 1, 20, 20, cls, f) for f, cls in items], dtype=annos_type)

    train = [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 2)]
    test = [("00001.jpg", 2), ("00002.jpg", 1)]
    for f, _ in train:
        _jpg(base / "cars_train" / f, int(f[:5]))
    for f, _ in test:
        _jpg(base / "cars_test" / f, int(f[:5]) + 10)
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos(train)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos(test)})
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object)})
    _roundtrip("cars", tmp_path, 3, 2, classes)


def test_food(tmp_path):
    base = tmp_path / "food-101"
    meta = {
        "train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/3"]},
        "test": {"apple_pie": ["apple_pie/4"], "waffles": ["waffles/5", "waffles/6"]},
    }
    for split, per_class in meta.items():
        for items in per_class.values():
            for k, rel in enumerate(items):
                _jpg(base / "images" / f"{rel}.jpg", k + len(rel))
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(per_class))
    _roundtrip("food", tmp_path, 3, 3, ["apple_pie", "waffles"])


@pytest.mark.parametrize("name,test_dir", [("imagenet", "val"), ("nico", "test"), ("folder", "val")])
def test_image_folders(tmp_path, name, test_dir):
    # created in reverse order: labels must follow sorted class names, not creation order
    classes = ["n01440764", "n01443537", "n01484850"]
    for _split, sub, n in (("train", "train", 2), ("test", test_dir, 1)):
        for c in reversed(classes):
            for k in range(n):
                _jpg(tmp_path / sub / c / f"{c}_{k}.JPEG", k, size=(50, 37))
    _roundtrip(name, tmp_path, 6, 3, classes)
    ds = build_split(name, "train", root=tmp_path)
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 2, 2]


def test_image_folder_keeps_a_class_balanced_sample(tmp_path):
    """train_per_class / test_per_class: the first k images of every class, interleaved by
    class (a source task's sample for the analyses, ImageNet's without writing all of it)."""
    classes = ["n01440764", "n01443537", "n01484850"]
    for c in classes:
        for k in range(3 if c != classes[2] else 1):
            _jpg(tmp_path / "train" / c / f"{c}_{k}.JPEG", k, size=(20, 20))
            _jpg(tmp_path / "val" / c / f"{c}_{k}.JPEG", k, size=(20, 20))
    ds = build_split("imagenet", "train", root=tmp_path, params={"train_per_class": 2})
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 2, 0, 1]  # the third class has one image
    full = build_split("imagenet", "train", root=tmp_path)
    assert np.array_equal(ds[3][0], full[1][0])  # class 0's second file
    assert len(build_split("imagenet", "test", root=tmp_path, params={"train_per_class": 2})) == 7
    out = prepare(
        "imagenet", tmp_path / "_beton", root=tmp_path, params={"train_per_class": 1, "test_per_class": 1}, workers=1
    )
    assert out["train"].manifest["count"] == out["test"].manifest["count"] == 3
    for bad in (0, 1.5, True):
        with pytest.raises(DatasetError, match="train_per_class: must be a positive integer"):
            build_split("imagenet", "train", root=tmp_path, params={"train_per_class": bad})


def _idx(path, array, gz):
    """An IDX file as LeCun's MNIST and Zalando's Fashion-MNIST ship it: magic (0, 0, 0x08,
    ndim), the dims big-endian, then the bytes; gzipped as Debian installs them, or not."""
    import gzip
    import struct

    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


def _fashion(root, gz, n=(20, 10)):
    rng = np.random.default_rng(0)
    out = {}
    for split, (img, lab), count in (
        ("train", ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), n[0]),
        ("test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), n[1]),
    ):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)  # the files' own order
        out[split] = (_idx(root / img, images, gz), _idx(root / lab, labels, gz), images, labels)
    return out


@pytest.mark.parametrize(
    "layout,gz", [("debian", True), ("debian", False), ("torchvision", False), ("torchvision", True)]
)
def test_fashion_mnist_from_idx_files(tmp_path, layout, gz):
    """Debian's flat folder (gzip) and torchvision's ROOT/FashionMNIST/raw (unpacked): the
    labels in the files' order, grey as three equal channels, the published class names,
    through a .beton and a loader."""
    from torchvision.datasets import FashionMNIST

    folder = tmp_path if layout == "debian" else tmp_path / "FashionMNIST" / "raw"
    files = _fashion(folder, gz)
    for split, (_, _, images, labels) in files.items():
        ds = build_split("fashion_mnist", split, root=tmp_path)
        assert len(ds) == len(labels) and ds.classes == FashionMNIST.classes == [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
        assert [ds[i][1] for i in range(len(ds))] == labels.tolist()
        img = ds[3][0]
        assert img.shape == (28, 28, 3) and (img == images[3][:, :, None]).all()
    _roundtrip("fashion_mnist", tmp_path, 20, 10, FashionMNIST.classes)
    sample = build_split("fashion_mnist", "train", root=tmp_path, params={"train_per_class": 1})
    assert [sample[i][1] for i in range(len(sample))] == list(range(10))


def test_fashion_mnist_refuses_missing_and_truncated_files(tmp_path):
    files = _fashion(tmp_path, gz=True)
    images_gz = files["train"][0]
    images_gz.write_bytes(images_gz.read_bytes()[:200])  # a cut download
    with pytest.raises(DatasetError, match=f"{images_gz}: unreadable IDX file"):
        build_split("fashion_mnist", "train", root=tmp_path)
    plain = _idx(tmp_path / "plain" / "t10k-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    _idx(tmp_path / "plain" / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    plain.write_bytes(plain.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=f"{plain}: truncated IDX file"):
        build_split("fashion_mnist", "test", root=tmp_path / "plain")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte \(or .*\) not found under"):
        build_split("fashion_mnist", "test", root=tmp_path / "empty")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (./run.sh installs it)",
)
def test_fashion_mnist_from_the_debian_package_by_default():
    """With no root, Debian's folder: the published 60,000 / 10,000 split, 6,000 / 1,000 of
    each class, and the first training label of the published file (9, an ankle boot)."""
    from study import config

    train, test = build_split("fashion_mnist", "train"), build_split("fashion_mnist", "test")
    assert (len(train), len(test)) == (60000, 10000) and train[0][1] == 9
    assert np.bincount([test.labels[j] for j in test.index]).tolist() == [1000] * 10
    cfg = config.parse({"name": "t", "datasets": {"fashion_mnist": {}}, "pretrain": {"dataset": "fashion_mnist"}})
    assert cfg.dataset_root("fashion_mnist") == "/usr/share/datasets/fashion-mnist"


def test_image_folder_without_split_is_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test split folder"):
        build_split("nico", "test", root=tmp_path)
