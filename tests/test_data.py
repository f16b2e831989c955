import json

import numpy as np
import pytest
import torch

from study.data import synthetic
from study.data.beton import BetonError, check_beton, prepare
from study.data.loaders import make_loader
from study.data.registry import DatasetError, build_split, get_info, resolve_params


def test_alphabet_is_deterministic_per_seed():
    a = synthetic.Alphabet("train", per_class=2, seed=3)
    b = synthetic.Alphabet("train", per_class=2, seed=3)
    c = synthetic.Alphabet("train", per_class=2, seed=4)
    for i in range(len(a)):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(not np.array_equal(a[i][0], c[i][0]) for i in range(len(a)))
    # order-independent: an image does not depend on what was drawn before it
    assert np.array_equal(a[30][0], synthetic.Alphabet("train", per_class=2, seed=3)[30][0])


def test_alphabet_layout_and_defaults():
    params = resolve_params("alphabet", {})
    assert params["train_per_class"] == 1000 and params["test_per_class"] == 200  # the paper's sizes
    ds = build_split("alphabet", "test", params={"test_per_class": 3, "image_size": 40})
    assert len(ds) == 26 * 3 and ds.classes[0] == "A" and ds.classes[-1] == "Z"
    img, label = ds[27]
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8 and label == 1
    train, test = synthetic.Alphabet("train", 1), synthetic.Alphabet("test", 1)
    assert not np.array_equal(train[0][0], test[0][0])  # splits draw different noise


def test_shapes_is_the_harder_source():
    shapes = build_split("shapes", "train", params={"train_per_class": 1})
    alphabet = build_split("alphabet", "train", params={"train_per_class": 1})
    assert len(shapes.classes) > len(alphabet.classes)
    img, _ = shapes[0]
    assert img.shape == (32, 32, 3)
    # colour varies within a class (alphabet is grey): colour carries no label information
    means = [shapes[i * len(shapes.classes)][0].mean(axis=(0, 1)) for i in range(1)]
    assert means[0].std() > 0  # not grey
    a, b = synthetic.Shapes("train", 3)[0][0], synthetic.Shapes("train", 3)[50][0]
    assert not np.array_equal(a, b)


def test_unknown_dataset_and_parameter():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        get_info("mnist")
    with pytest.raises(DatasetError, match="no parameter 'colour'"):
        resolve_params("alphabet", {"colour": 1})
    with pytest.raises(DatasetError, match="needs a data root"):
        build_split("cifar10", "train")
    with pytest.raises(DatasetError, match="does not exist"):
        build_split("cifar10", "train", root="/nonexistent/cifar")


def test_beton_roundtrip_keeps_count_labels_and_range(small_alphabet):
    test = small_alphabet["test"]
    manifest = json.loads(test.beton.with_suffix(".json").read_text())
    assert manifest["count"] == 26 * 4 and manifest["classes"][:3] == ["A", "B", "C"]
    assert manifest["resolution"] == [32, 32] and len(manifest["config_hash"]) == 16
    loader = make_loader(test.beton, train=False, resolution=32, batch_size=50, workers=1)
    xs, ys = zip(*loader)
    x, y = torch.cat(xs), torch.cat(ys)
    assert len(x) == manifest["count"]  # evaluation drops no last batch
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1 and x.max() > 0.5
    source = build_split("alphabet", "test", params={"test_per_class": 4})
    assert y.tolist() == [source[i][1] for i in range(len(source))]
    # the centre crop at full size returns the stored pixels exactly
    assert torch.equal((x[5] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(source[5][0]))


@pytest.mark.parametrize("train", [False, True])
def test_kept_batches_keep_their_labels(small_alphabet, train):
    """FFCV refills its batch buffers: a consumer that keeps every batch (as a list) must
    still hold each batch's own labels and images once the loader has moved on."""
    split = small_alphabet["train" if train else "test"]
    loader = make_loader(split.beton, train=train, resolution=32, batch_size=8, workers=2, seed=3)
    kept, copies = [], []
    for x, y in loader:
        kept.append((x, y))
        copies.append((x.clone(), y.clone()))
    assert len(kept) > 6  # more batches than FFCV keeps buffers for
    for (x, y), (cx, cy) in zip(kept, copies):
        assert torch.equal(y, cy) and torch.equal(x, cx)
    if not train:
        source = build_split("alphabet", "test", params={"test_per_class": 4})
        assert torch.cat([y for _, y in kept]).tolist() == [source[i][1] for i in range(len(source))]


def test_train_loader_augments_but_keeps_range(small_alphabet):
    loader = make_loader(small_alphabet["train"].beton, train=True, resolution=24, batch_size=26, workers=1)
    x, y = next(iter(loader))
    assert x.shape == (26, 3, 24, 24) and 0 <= x.min() and x.max() <= 1 and y.dtype == torch.int64


def test_prepare_twice_does_no_work(tmp_path):
    params = dict(train_per_class=2, test_per_class=1)
    first = prepare("alphabet", tmp_path, params=params, workers=1)
    mtimes = {s: p.beton.stat().st_mtime_ns for s, p in first.items()}
    second = prepare("alphabet", tmp_path, params=params, workers=1)
    assert all(p.written for p in first.values()) and not any(p.written for p in second.values())
    assert {s: p.beton.stat().st_mtime_ns for s, p in second.items()} == mtimes
    third = prepare("alphabet", tmp_path, params={**params, "seed": 1}, workers=1)
    assert all(p.written for p in third.values())  # another config is another file
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary left behind


def test_truncated_beton_is_named(tmp_path):
    prepared = prepare("alphabet", tmp_path, params=dict(train_per_class=2, test_per_class=1), workers=1)["test"]
    data = prepared.beton.read_bytes()
    prepared.beton.write_bytes(data[: len(data) // 2])
    with pytest.raises(BetonError, match=str(prepared.beton)):
        make_loader(prepared.beton, train=False, resolution=32, batch_size=8)
    # without a manifest the structure alone is checked
    bare = tmp_path / "bare.beton"
    bare.write_bytes(data[: len(data) - 10])
    with pytest.raises(BetonError, match="bare.beton.*truncated"):
        check_beton(bare)
    # prepare notices the damage and writes the split again
    again = prepare("alphabet", tmp_path, params=dict(train_per_class=2, test_per_class=1), workers=1)["test"]
    assert again.written and again.beton.stat().st_size == len(data)


def test_progressive_resizing_changes_the_training_crop(small_alphabet):
    loader = make_loader(small_alphabet["train"].beton, train=True, resolution=32, batch_size=16, workers=1, seed=0)
    assert next(iter(loader))[0].shape[-1] == 32
    loader.set_resolution(24)
    x, _ = next(iter(loader))
    assert x.shape[-2:] == (24, 24) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_a_loader_asked_for_again_comes_back_compiled_at_its_first_epoch(small_alphabet, tmp_path):
    """FFCV compiles a loader at its first epoch: the same arguments in one process give
    the same loader back, and it yields what a new one would, epoch after epoch."""
    import shutil

    from study.runtime import Kept

    kept = Kept(32)  # a run's Runtime.loaders

    def ask(beton=small_alphabet["train"].beton, train=True, **kw):
        args = dict(train=train, resolution=32, batch_size=16, workers=1, seed=0, cache=kept) | kw
        return make_loader(beton, **args)

    def epochs(loader, n=2):
        return [torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader]) for _ in range(n)]

    first = ask()
    seen = epochs(first)
    assert not torch.equal(seen[0], seen[1])  # another epoch, another order and crops
    assert ask() is first
    assert all(torch.equal(a, b) for a, b in zip(epochs(ask()), seen))  # from its first epoch again
    kept.clear()
    fresh = ask()
    assert fresh is not first and all(torch.equal(a, b) for a, b in zip(epochs(fresh), seen))
    # anything that changes what it yields is another loader
    assert ask(seed=1) is not fresh and ask(indices=list(range(0, 200, 2))) is not fresh
    assert ask(batch_size=8) is not fresh and ask(train=False) is not fresh
    # an evaluation loader reads in order without augmentation: the seed changes nothing
    assert ask(train=False, seed=3) is ask(train=False)
    # a split written again (a new file at the same path) is read anew
    copy = tmp_path / "train.beton"
    shutil.copy(small_alphabet["train"].beton, copy)
    shutil.copy(small_alphabet["train"].beton.with_suffix(".json"), copy.with_suffix(".json"))
    old = ask(copy)
    shutil.copy(small_alphabet["train"].beton, tmp_path / "new.beton")
    (tmp_path / "new.beton").replace(copy)
    assert ask(copy) is not old


def test_an_epoch_left_early_leaves_no_ffcv_thread_behind(small_alphabet):
    """Taking the first batches and leaving (an analysis's first N images) ends FFCV's
    filling thread instead of leaving it waiting on its queue for good."""
    import threading
    import time

    def fillers():
        return [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator" and t.is_alive()]

    loader = make_loader(small_alphabet["train"].beton, train=False, resolution=32, batch_size=4, workers=1)
    for _ in range(3):  # the same (kept) loader, left early again and again
        for i, _batch in enumerate(loader):
            if i == 1:
                break
    deadline = time.monotonic() + 30
    while fillers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not fillers()
    assert sum(len(y) for _, y in loader) == small_alphabet["train"].manifest["count"]  # a whole epoch: all of it


def test_shapes_by_shape_is_a_ten_class_target_of_mixed_textures():
    near = build_split("shapes", "train", params={"train_per_class": 4, "by": "shape", "seed": 1})
    assert near.classes == list(synthetic.SHAPES) and len(near) == 40
    assert [near[i][1] for i in range(12)] == [i % 10 for i in range(12)]
    with pytest.raises(ValueError, match="by must be"):
        synthetic.Shapes("train", 1, by="colour")


def test_shapes_by_texture_is_a_five_class_target_of_mixed_shapes():
    """The textures as classes: an image's label is its texture, its shape drawn at random
    (the same texture on different shapes across images of one class)."""
    near = build_split("shapes", "train", params={"train_per_class": 3, "by": "texture", "seed": 2})
    assert near.classes == list(synthetic.TEXTURES) and len(near) == 15
    assert [near[i][1] for i in range(10)] == [i % 5 for i in range(10)]
    first = synthetic.Shapes("train", 3, by="texture", seed=2)
    assert all((near[i][0] == first[i][0]).all() for i in range(15))  # a pure function of (seed, split, index)
    drawn = {synthetic.SHAPES[synthetic._rng(2, "train", i).integers(len(synthetic.SHAPES))] for i in range(15)}
    assert len(drawn) > 1


def test_two_datasets_of_one_name_keep_their_own_betons(tmp_path):
    """A job's `shapes` (the source) and `shapes10` (a target of the same generator):
    each key has its folder, so neither overwrites the other's .beton."""
    from study import config as config_mod
    from study.pipeline import Job

    cfg = config_mod.parse(
        {
            "name": "t",
            "datasets": {
                "shapes": {"params": {"train_per_class": 2, "test_per_class": 1}},
                "shapes10": {"name": "shapes", "params": {"by": "shape", "train_per_class": 2, "test_per_class": 1}},
            },
            "pretrain": {"dataset": "shapes", "backbones": ["resnet18"]},
            "finetune": {"datasets": ["shapes10"], "methods": ["full"]},
        }
    )
    job = Job(cfg, tmp_path, torch.device("cpu"))
    for key in ("shapes", "shapes10"):
        prepare(cfg.dataset_name(key), job.data_dir, params=cfg.dataset_params(key), workers=1, folder=key)
    assert job.beton("shapes", "train") != job.beton("shapes10", "train")
    assert (job.num_classes("shapes"), job.num_classes("shapes10")) == (50, 10)
    assert job.manifest("shapes", "train")["count"] == 100 and job.manifest("shapes10", "train")["count"] == 20


def test_two_folder_datasets_give_two_fine_tuned_models(tmp_path):
    """Two ImageFolder targets with the same params differ only by their root: their
    fine-tuned models must not share a stage (one would reuse the other's checkpoint)."""
    from study import config as config_mod
    from study import sweep
    from study.pipeline import Job

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    cfg = config_mod.parse(
        {
            "name": "t",
            "datasets": {
                "shapes": {},
                "a": {"name": "folder", "root": str(tmp_path / "a")},
                "b": {"name": "folder", "root": str(tmp_path / "b")},
            },
            "pretrain": {"dataset": "shapes", "backbones": ["resnet18"]},
            "finetune": {"datasets": ["a", "b"], "methods": ["scratch"]},
        }
    )
    job = Job(cfg, tmp_path, torch.device("cpu"))
    keys = {sweep.trained_for(job, p, {}).key for p in sweep.points(cfg)}
    assert len(keys) == 2


def _epoch(loader):
    """(the order FFCV draws for the loader's next epoch, its images in that order)."""
    order = loader.loader.next_traversal_order()
    images = torch.cat([x.clone() for x, _ in loader])  # FFCV reuses its buffers
    return order[: len(images)], images


def test_training_crops_are_a_function_of_seed_epoch_and_index(small_alphabet):
    """Each sample's crop and flip depend on (seed, epoch, index) only: not on the loader
    threads that decode it, not on the batch it lands in, not on the other samples."""
    from study.data.loaders import make_loader

    beton = small_alphabet["train"].beton

    def loader(workers=2, seed=0, indices=None, batch_size=32):
        return make_loader(
            beton, train=True, resolution=32, batch_size=batch_size, workers=workers, seed=seed, indices=indices
        )

    full = loader()
    order0, first = _epoch(full)
    order1, second = _epoch(full)
    by_index = {int(i): x for i, x in zip(order0, first)}  # a last partial batch is dropped

    def same(order, images):
        common = [(int(i), img) for i, img in zip(order, images) if int(i) in by_index]
        return len(common) > 0.5 * len(order) and all(torch.equal(by_index[i], img) for i, img in common)

    assert same(*_epoch(loader(workers=1, batch_size=16)))  # 1 thread, other batches
    subset = sorted(by_index)[::3]  # other samples around it, another order
    assert same(*_epoch(loader(indices=subset, batch_size=8)))
    again = {int(i): img for i, img in zip(order1, second)}  # the next epoch: new crops
    differ = sum(not torch.equal(by_index[i], again[i]) for i in by_index if i in again)
    assert differ > 0.8 * len(by_index)
    o, x = _epoch(loader(seed=1))
    other_seed = {int(i): img for i, img in zip(o, x)}
    assert sum(not torch.equal(by_index[i], other_seed[i]) for i in by_index if i in other_seed) > 0.8 * len(by_index)
