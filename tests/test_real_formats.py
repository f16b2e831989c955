"""Each real dataset read from a tiny fixture written in its published on-disk layout
(the one torchvision's download produces), then converted to a .beton and loaded."""
import hashlib
import json
import pickle

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
        batch = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                 "labels": [(i + j) % 10 for j in range(3)], "batch_label": f}
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
    rows = {"trainval": [("Abyssinian_1", 1), ("Abyssinian_2", 1), ("basset_hound_1", 2),
                         ("basset_hound_2", 2)],
            "test": [("Abyssinian_3", 1), ("basset_hound_3", 2)]}
    for split, items in rows.items():
        for k, (image_id, label) in enumerate(items):
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
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([3, 4]),
                                          "tstid": np.array([5, 6, 7, 8])})
    monkeypatch.setattr(Flowers102, "_file_dict", {
        "image": Flowers102._file_dict["image"],
        "label": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
        "setid": ("setid.mat", _md5(base / "setid.mat"))})
    _roundtrip("flowers", tmp_path, 4, 4, [f"flower_{i:03d}" for i in range(1, 103)])
    ds = build_split("flowers", "test", root=tmp_path)
    assert [ds[i][1] for i in range(4)] == [2, 2, 0, 1]


def test_cars(tmp_path):
    base = tmp_path / "stanford_cars"
    annos_type = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
                  ("class", "O"), ("fname", "O")]

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
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(classes, dtype=object)})
    _roundtrip("cars", tmp_path, 3, 2, classes)


def test_food(tmp_path):
    base = tmp_path / "food-101"
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/3"]},
            "test": {"apple_pie": ["apple_pie/4"], "waffles": ["waffles/5", "waffles/6"]}}
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
    for split, sub, n in (("train", "train", 2), ("test", test_dir, 1)):
        for c in reversed(classes):
            for k in range(n):
                _jpg(tmp_path / sub / c / f"{c}_{k}.JPEG", k, size=(50, 37))
    _roundtrip(name, tmp_path, 6, 3, classes)
    ds = build_split(name, "train", root=tmp_path)
    assert [ds[i][1] for i in range(len(ds))] == [0, 0, 1, 1, 2, 2]


def test_image_folder_without_split_is_refused(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no test split folder"):
        build_split("nico", "test", root=tmp_path)
