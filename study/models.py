"""Backbones as the paper decomposes them: feature extractor f and classifier g.

``StudyModel(x) = g(f(x))`` takes images in [0, 1]; the ImageNet normalisation is
f's first layer, so attacks and analyses always work in pixel space (as MadryLab's
robustness ``AttackerModel`` does). f ends at the pooled embedding; g is the last
linear layer. ``model.layers(x)`` returns the four stages of the backbone's family
(``study.backbones``: layer1 ... layer4, the paper's conv2_x ... conv5_x, for ResNets).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from study.backbones import BACKBONES, FAMILIES, ModelError, family, file_family

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
__all__ = [
    "BACKBONES",
    "ModelError",
    "StudyModel",
    "build_model",
    "load_checkpoint",
    "load_trunk_weights",
    "save_checkpoint",
    "unwrap",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The StudyModel under a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


class Normalize(nn.Module):
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class FeatureExtractor(nn.Module):
    """f: [0, 1] images -> pooled embedding, through the family's trunk."""

    def __init__(self, backbone: nn.Module, family_name: str):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone  # the torchvision network without its classifier
        self.family_name = family_name

    @property
    def stages(self) -> tuple[str, ...]:
        return self._family.stages

    @property
    def _family(self):
        return FAMILIES[self.family_name]

    def _run(self, x, upto: str | None = None):
        """(the stages as layers() gives them, the last stage's tensor as pool takes it)."""
        fam, trunk = self._family, self.backbone
        x = fam.stem(trunk, self.normalize(x))
        out = OrderedDict()
        for name in fam.stages:
            x = fam.stage(trunk, name, x)
            out[name] = fam.expose(x)
            if name == upto:
                break
        return out, x

    def layers(self, x, upto: str | None = None) -> OrderedDict[str, torch.Tensor]:
        return self._run(x, upto)[0]

    def forward(self, x):
        return self._family.pool(self.backbone, self._run(x)[1])


class StudyModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int, resolution: int | None = None):
        super().__init__()
        fam = family(backbone)
        trunk, width = fam.build(backbone, resolution)
        self.backbone_name, self.resolution = backbone, resolution
        self.f = FeatureExtractor(trunk, fam.name)
        self.g = nn.Linear(width, num_classes)

    @property
    def num_classes(self) -> int:
        return self.g.out_features

    def forward(self, x):
        return self.g(self.f(x))

    def layers(self, x, upto: str | None = None):
        return self.f.layers(x, upto)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh g for a new target task (f is kept)."""
        self.g = nn.Linear(self.g.in_features, num_classes).to(self.g.weight.device)


def build_model(backbone: str, num_classes: int, resolution: int | None = None) -> StudyModel:
    return StudyModel(backbone, num_classes, resolution)


def load_trunk_weights(model: StudyModel, path, keep_classifier: bool = False, origin: str | None = None) -> str:
    """Loads ImageNet weights from a file into f; returns the format it found
    (``study.weights`` resolves names, hub files and torchvision's enums to files):

    * a torchvision-format state dict (``conv1.weight`` ... ``fc.bias``), bare or under
      ``state_dict``;
    * a checkpoint of MadryLab's robustness library, the format of Salman et al.'s
      robust ImageNet models: ``{"model": ..., "epoch": ...}`` whose keys carry
      ``module.model.`` (the network), ``module.attacker.model.`` (the same network again,
      inside the attacker) and ``module.normalizer.new_mean/new_std`` (the input
      normalisation, which becomes f's first layer).

    Files are read with ``torch.load(weights_only=True)``: nothing foreign is unpickled.
    The ImageNet classifier (fc) is dropped, since g belongs to the target task, unless
    ``keep_classifier`` (and g has fc's shape): then the model is the source network.
    ``origin`` names the file in errors (default: its path).
    """
    path = Path(path).expanduser()
    origin = origin or str(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated or not a tensor-only pickle
        raise ModelError(f"{origin}: cannot be read as a weights-only checkpoint ({_first_line(err)})") from None
    state, mean, std, kind = _unwrap_state(state, origin)
    if not isinstance(state, dict):
        raise ModelError(f"{origin}: expected a state dict, got {type(state).__name__}")
    fam = family(model.backbone_name)
    held = file_family(state)
    if held is not None and held != fam.name:
        raise ModelError(f"{origin} holds a {held} network, not a {model.backbone_name} ({fam.name})")
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ModelError(f"{origin}: {len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]})")
    trunk_state, head = fam.map_weights(state)
    load_state(model.f.backbone, fam.fit_state(model.f.backbone, trunk_state), origin, model.backbone_name)
    if mean is not None and std is not None:
        model.f.normalize.mean.copy_(mean.reshape(1, -1, 1, 1))
        model.f.normalize.std.copy_(std.reshape(1, -1, 1, 1))
    if keep_classifier:
        if not head:
            raise ModelError(f"{origin}: has no classifier to keep")
        load_state(model.g, head, origin + " (classifier)", f"a {model.num_classes}-class g")
    return kind


def _unwrap_state(state, origin: str):
    """(torchvision-style state dict, normaliser mean, std, format name) of a loaded file."""
    if not isinstance(state, dict):
        return state, None, None, "unknown"
    for key in ("model", "state_dict"):  # robustness: "model"; many others: "state_dict"
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    bare = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith(("model.", "attacker.model.")) for k in bare):
        net = {k[len("model.") :]: v for k, v in bare.items() if k.startswith("model.")}
        if not net:  # only the attacker's copy was saved
            net = {k[len("attacker.model.") :]: v for k, v in bare.items() if k.startswith("attacker.model.")}
        mean = bare.get("normalizer.new_mean", bare.get("attacker.normalize.new_mean"))
        std = bare.get("normalizer.new_std", bare.get("attacker.normalize.new_std"))
        if mean is not None and (mean.numel() != 3 or std is None or std.numel() != 3):
            raise ModelError(f"{origin}: a robustness-library normaliser with {mean.numel()} channels; expected 3")
        return net, mean, std, "robustness"
    return bare, None, None, "torchvision"


def load_state(module: nn.Module, state: dict, origin: str, arch: str) -> None:
    """load_state_dict with one clear message when the checkpoint is another architecture."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if unexpected or wrong or missing:
        detail = []
        if wrong:
            k = wrong[0]
            detail.append(
                f"{len(wrong)} tensors of another shape, e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
            )
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ModelError(f"{origin} does not fit {arch}: " + "; ".join(detail))
    module.load_state_dict(state)


def save_checkpoint(model: StudyModel, path: Path, extra: dict | None = None) -> None:
    """A tensors-only checkpoint (loadable with weights_only=True), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(
        {
            "backbone": model.backbone_name,
            "num_classes": model.num_classes,
            "resolution": model.resolution,
            "state_dict": model.state_dict(),
            **(extra or {}),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path: Path, backbone: str | None = None) -> StudyModel:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {path}") from None
    except Exception as err:
        raise ModelError(f"{path}: cannot be read as a weights-only checkpoint ({_first_line(err)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "backbone" not in ckpt:
        raise ModelError(f"{path}: not a study checkpoint (no backbone/state_dict)")
    if backbone is not None and ckpt["backbone"] != backbone:
        raise ModelError(f"{path}: checkpoint is a {ckpt['backbone']}, expected {backbone}")
    model = build_model(ckpt["backbone"], int(ckpt["num_classes"]), ckpt.get("resolution"))
    load_state(model, ckpt["state_dict"], str(path), ckpt["backbone"])
    return model


def _first_line(err: Exception) -> str:
    """torch's own message, to its first line: a refusal stays one line."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    tail = [x for x in lines if x.startswith(("Unsupported", "WeightsUnpickler"))]
    return "; ".join(lines[:1] + tail[-1:]) if lines else type(err).__name__
