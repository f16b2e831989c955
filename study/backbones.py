"""The backbone registry: each family of backbones is one entry (a ``Family`` subclass
under ``@register``), and nothing outside it knows a family's attribute names.

An entry says
  * ``variants``: the backbone names it builds (``resnet18``, ...);
  * ``build(variant, resolution)``: the torchvision network without its classifier, for
    that input side, and the classifier's input width (g's width);
  * ``stem``, ``stage`` and ``stages``: how f runs, up to its four stages (the paper's
    conv2_x ... conv5_x for ResNets; ``layers()`` returns them, CCA's bottom layer is the
    first) and ``pool``, from the last stage to the embedding;
  * ``fold``: how to fold its normalisation layers into the layers before them for the
    inference copy (``None`` for a family without BatchNorm);
  * ``map_weights``: a torchvision-format state dict as (trunk state, classifier state);
  * ``fast_copy``: whether the CPU conversions of ``study.fastcopy`` were checked on it.

A family missing a piece is refused when its module is imported, naming the family and
the piece.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

PIECES = {
    "variants": "the backbone names it builds",
    "stages": "the names of its four stages, for layers()",
    "build": "build(variant, resolution) -> (network without classifier, width of g)",
    "stem": "stem(trunk, x): from normalised images to the first stage's input",
    "stage": "stage(trunk, name, x): one of the four stages",
    "pool": "pool(trunk, x): from the last stage to the embedding",
    "fold": "fold(trunk): normalisation folded in place for the inference copy (None: nothing to fold)",
    "map_weights": "map_weights(state) -> (trunk state, classifier state) of a torchvision-format file",
    "fast_copy": "whether study.fastcopy's CPU conversions apply (True or False)",
}


class ModelError(ValueError):
    """An unknown backbone, or weights that do not fit the architecture."""


class RegistryError(TypeError):
    """A backbone family entry that lacks a piece."""


class Family:
    """Base of the registry's entries; see the module docstring for the pieces."""

    name: str = ""


FAMILIES: dict[str, Family] = {}
BACKBONES: dict[str, Family] = {}  # variant -> its family


def register(cls: type) -> type:
    """Adds a family; refuses one whose pieces are missing or malformed."""
    name = getattr(cls, "name", "") or cls.__name__
    for piece, what in PIECES.items():
        if not hasattr(cls, piece):
            raise RegistryError(f"backbone family {name!r}: missing {piece} ({what})")
        value = getattr(cls, piece)
        if piece not in ("variants", "stages", "fast_copy", "fold") and not callable(value):
            raise RegistryError(f"backbone family {name!r}: {piece} must be a function ({what})")
    if len(cls.stages) != 4 or len(set(cls.stages)) != 4:
        raise RegistryError(f"backbone family {name!r}: stages must name four distinct stages, got {cls.stages!r}")
    if not cls.variants:
        raise RegistryError(f"backbone family {name!r}: variants is empty ({PIECES['variants']})")
    if cls.fold is not None and not callable(cls.fold):
        raise RegistryError(f"backbone family {name!r}: fold must be a function or None")
    for v in cls.variants:
        if v in BACKBONES:
            raise RegistryError(f"backbone family {name!r}: {v!r} is already built by {BACKBONES[v].name!r}")
    cls.name = name
    FAMILIES[name] = family = cls()
    BACKBONES.update({v: family for v in cls.variants})
    return cls


def family(backbone: str) -> Family:
    if backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[backbone]


def _fold_pairs(block: nn.Module, pairs) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for conv, bn in pairs:
        c, b = getattr(block, conv, None), getattr(block, bn, None)
        if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            setattr(block, conv, fuse_conv_bn_eval(c, b))
            setattr(block, bn, nn.Identity())


def _split(prefix: str) -> Callable[[dict], tuple[dict, dict]]:
    def split(state: dict) -> tuple[dict, dict]:
        head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return {k: v for k, v in state.items() if not k.startswith(prefix)}, head

    return split


@register
class ResNet(Family):
    """torchvision's ResNets: stem conv1-bn1-relu-maxpool, stages layer1..layer4, global
    average pooling; the classifier fc becomes g."""

    name = "resnet"
    variants = ("resnet18", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2")
    stages = ("layer1", "layer2", "layer3", "layer4")
    fast_copy = True
    map_weights = staticmethod(_split("fc."))

    @staticmethod
    def build(variant: str, resolution: int | None = None):
        import torchvision.models as tvm

        trunk = getattr(tvm, variant)(weights=None)  # any resolution: the pooling is global
        width = trunk.fc.in_features
        trunk.fc = nn.Identity()
        return trunk, width

    @staticmethod
    def stem(trunk, x):
        return trunk.maxpool(trunk.relu(trunk.bn1(trunk.conv1(x))))

    @staticmethod
    def stage(trunk, name: str, x):
        return getattr(trunk, name)(x)

    @staticmethod
    def pool(trunk, x):
        if x.is_cuda and torch.are_deterministic_algorithms_enabled():
            return x.mean((2, 3))  # the same average; adaptive pooling's CUDA backward has no deterministic kernel
        return trunk.avgpool(x).flatten(1)

    @staticmethod
    def fold(trunk) -> None:
        _fold_pairs(trunk, [("conv1", "bn1")])
        for layer in ResNet.stages:
            for block in getattr(trunk, layer):
                _fold_pairs(block, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
                if block.downsample is not None:
                    _fold_pairs(block.downsample, [("0", "1")])
