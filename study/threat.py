"""The public-backbone threat: an attacker who downloads the same pre-trained backbone f₀
that a private fine-tune starts from, and crafts perturbations on f₀ alone
(``study.attacks.Transfer``: a label-blind feature attack, or PGD through a linear probe
trained on the target's training split). How much of the damage reaches the fine-tunes,
and does a defense close that door?

After stage 1 the driver crafts each item's perturbations once per (f₀, target dataset,
seed, item) on the target's first test images (``craft_all``): f₀ is the backbone the full
fine-tune starts from (the job's standard pre-training, ``JobConfig.source_objective``).
They are kept in ``OUT/transfer/`` (one file each, and ``index.json``), logged to MLflow
(their norms, the probe's accuracy, a few examples), and every model of the unit, from
the standard model that never saw f₀ to the defenses, is evaluated on those same
perturbations (``bind`` gives an item its file in whatever process evaluates).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from study import tracking
from study.attacks import Transfer
from study.attacks.transfer import Features, craft
from study.config import ConfigError
from study.files import atomic_write_bytes, atomic_write_text, config_hash
from study.models import load_checkpoint

FOLDER = "transfer"
INDEX = "index.json"
PROBE_STEPS = 100  # L-BFGS iterations of the linear probe (a convex problem: it converges well within)
PROBE_DECAY = 1e-4


def entry(seed: int, dataset: str, backbone: str, item: Transfer) -> str:
    return f"{seed}|{dataset}|{backbone}|{item.name}"


def items_of(cfg, dataset: str, seed: int) -> list[Transfer]:
    """The transfer items that meet some fine-tuned model on ``dataset`` in replicate ``seed``."""
    found = {}
    for method in cfg.finetune.methods_of(dataset) if cfg.finetune is not None else []:
        for item in cfg.eval.suite(method, dataset, seed):
            if isinstance(item, Transfer):
                found[item.name] = item
    return list(found.values())


def read_index(out: Path) -> dict:
    path = Path(out) / FOLDER / INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def bind(out: Path, items: list, dataset: str, backbone: str, seed: int) -> list:
    """``items`` with each transfer item given its crafted perturbations (their file, and
    the f₀ they were crafted on): what evaluates it in any process. Others as they are."""
    if not any(isinstance(i, Transfer) for i in items):
        return items
    index, bound = read_index(out), []
    for item in items:
        if isinstance(item, Transfer):
            e = index.get(entry(seed, dataset, backbone, item))
            if e is None:
                raise ConfigError(
                    f"{item.name} on {dataset} ({backbone}, seed {seed}): no crafted perturbations in "
                    f"{Path(out) / FOLDER} (`study run` crafts them after stage 1)"
                )
            item = replace(item, source=e["source"], path=str(Path(out) / FOLDER / e["file"]))
        bound.append(item)
    return bound


def craft_all(job, sources: dict, log=print) -> int:
    """Crafts every transfer item's perturbations the job lacks (``sources``: (seed,
    backbone, objective) -> {key, ckpt}, study.sweep.source_table); returns how many it
    crafted. Files already there (the same f₀, dataset, item and images) are kept."""
    cfg = job.cfg
    if cfg.finetune is None:
        return 0
    index, made = read_index(job.out), 0
    for seed in cfg.replicate_seeds():
        for dataset in cfg.finetune.datasets:
            for item in items_of(cfg, dataset, seed):
                for backbone in cfg.finetune_backbones():
                    source = sources[seed, backbone, cfg.source_objective()]
                    e = _craft_one(job.for_seed(seed), dataset, backbone, item, source, index, log)
                    made += e is not None
    return made


def _craft_one(job, dataset: str, backbone: str, item: Transfer, source: dict, index: dict, log) -> dict | None:
    cfg, folder = job.cfg, job.out / FOLDER
    cap = min(c for c in (cfg.eval.max_images, item.max_images, 10**9) if c is not None)
    ident = {
        "item": item.name,
        "source": source["key"],
        "dataset": cfg.dataset_name(dataset),
        "data": cfg.dataset_params(dataset),
        "resolution": cfg.resolution(dataset),
        "seed": cfg.seed,
        "cap": cap,
    }
    name = f"{item.kind}-{dataset}-{backbone}-s{cfg.seed}-{config_hash(ident)[:16]}.pt"
    key = entry(cfg.seed, dataset, backbone, item)
    if (folder / name).is_file() and index.get(key, {}).get("file") == name:
        return None
    f0 = load_checkpoint(Path(source["ckpt"]), backbone).to(job.device).eval()
    probe_acc = None
    if item.kind == "feature":
        model = Features(f0, item.layer)
    else:
        model, probe_acc = _surrogate(job, f0, dataset)
    test = job.loader(dataset, "test", cfg.eval.batch_size, train=False)
    n = min(cap, job.manifest(dataset, "test")["count"])
    bar = _bar(job, n, f"crafting {item.name} on f₀ for {dataset} (seed {cfg.seed})")
    delta = craft(model, test, item, cap, cfg.seed, progress=bar.update if bar else None)
    if bar:
        bar.close()
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder / name, {"delta": delta.half(), "item": item.name, "source": source["key"]})
    flat = delta.flatten(1)
    norms = {"linf": float(flat.abs().amax(1).mean() * 255), "l2": float(flat.norm(dim=1).mean())}
    e = {"file": name, "source": source["key"], "images": len(delta), "delta_mean": norms, "probe_train_acc": probe_acc}
    index[key] = e
    atomic_write_text(folder / INDEX, json.dumps(index, indent=1, sort_keys=True))
    _log(job, dataset, backbone, item, e, delta, test)
    log(
        f"transfer: {item.name} crafted on f₀ ({backbone}, {cfg.source_objective()}) for {dataset}, seed "
        f"{cfg.seed}: {len(delta)} images, mean |δ|∞ {norms['linf']:.2f}/255"
        + (f", probe train accuracy {probe_acc:.1f} %" if probe_acc is not None else "")
    )
    return e


def _surrogate(job, f0, dataset: str) -> tuple[nn.Module, float]:
    """f₀ with a linear probe on its features as the head, trained on the target's
    training split (L-BFGS on the cross-entropy with a little weight decay): the grey-box
    attacker's stand-in for the fine-tune. Returns it and the probe's training accuracy."""
    feats, labels = [], []
    with torch.no_grad():
        for x, y in job.loader(dataset, "train", job.cfg.eval.batch_size, train=False):
            feats.append(f0.f(x).flatten(1).float())
            labels.append(y.clone())
    feats, labels = torch.cat(feats), torch.cat(labels)
    torch.manual_seed(job.cfg.seed)
    probe = nn.Linear(feats.shape[1], job.num_classes(dataset)).to(feats.device)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(probe(feats), labels) + PROBE_DECAY * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = 100.0 * float((probe(feats).argmax(1) == labels).float().mean())
    f0.reset_classifier(probe.out_features)
    f0.g.load_state_dict(probe.state_dict())
    return f0.eval(), acc


def _save(path: Path, obj: dict) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _bar(job, n: int, desc: str):
    if not job.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=n, desc=desc, unit="img", leave=False)


def _log(job, dataset: str, backbone: str, item: Transfer, e: dict, delta: torch.Tensor, test) -> None:
    """The perturbations' norms (and the probe's accuracy) into the job's MLflow run, and a
    few examples: clean images, the same with δ, and δ stretched to be seen."""
    from torchvision.utils import save_image

    k = f"transfer/{tracking.metric_key(item.name)}/{dataset}/{backbone}/s{job.cfg.seed}"
    metrics = {f"{k}/delta_linf": e["delta_mean"]["linf"], f"{k}/delta_l2": e["delta_mean"]["l2"]}
    if e["probe_train_acc"] is not None:
        metrics[f"{k}/probe_train_acc"] = e["probe_train_acc"]
    tracking.log_metrics(metrics)
    x = next(iter(test))[0][:4].cpu()
    d = delta[: len(x)]
    stretched = 0.5 + d / (2 * d.abs().amax().clamp_min(1e-12))
    png = job.out / FOLDER / e["file"].replace(".pt", ".png")
    save_image(torch.cat([x, (x + d).clamp(0, 1), stretched]), png, nrow=len(x))
    tracking.log_artifact(png, FOLDER)
