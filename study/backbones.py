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
  * ``fast_copy``: whether the CPU conversions of ``study.fastcopy`` were checked on it;
  * ``signature``: a key only its torchvision-format files hold (to name the architecture
    of a file that does not fit).

and may override (``Family`` has the defaults) ``expose`` (what ``layers()`` gives of a
stage's tensor: NCHW maps, or tokens (n, tokens, width)) and ``fit_state`` (adapt a state
dict made at another resolution). Every family runs at any input side.

A family missing a piece is refused when its module is imported, naming the family and
the piece.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
    "signature": "a state-dict key only this family's torchvision-format files have",
}


class ModelError(ValueError):
    """An unknown backbone, or weights that do not fit the architecture."""


class RegistryError(TypeError):
    """A backbone family entry that lacks a piece."""


class Family:
    """Base of the registry's entries; see the module docstring for the pieces."""

    name: str = ""

    @staticmethod
    def expose(x):
        return x

    @staticmethod
    def fit_state(trunk, state: dict) -> dict:
        return state


FAMILIES: dict[str, Family] = {}
BACKBONES: dict[str, Family] = {}  # variant -> its family


def register(cls: type) -> type:
    """Adds a family; refuses one whose pieces are missing or malformed."""
    name = getattr(cls, "name", "") or cls.__name__
    for piece, what in PIECES.items():
        if not hasattr(cls, piece):
            raise RegistryError(f"backbone family {name!r}: missing {piece} ({what})")
        value = getattr(cls, piece)
        if piece not in ("variants", "stages", "fast_copy", "fold", "signature") and not callable(value):
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


def file_family(state: dict) -> str | None:
    """The family whose files hold ``state``'s keys (by its signature key), if any."""
    return next((f.name for f in FAMILIES.values() if f.signature in state), None)


def family(backbone: str) -> Family:
    if backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[backbone]


@functools.cache
def parameters(backbone: str) -> int:
    """The trunk's parameter count (f, without the classifier): Table 3's capacity."""
    trunk, _ = family(backbone).build(backbone)
    return sum(p.numel() for p in trunk.parameters())


def _fold_pairs(block: nn.Module, pairs) -> None:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for conv, bn in pairs:
        c, b = getattr(block, conv, None), getattr(block, bn, None)
        if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            setattr(block, conv, fuse_conv_bn_eval(c, b))
            setattr(block, bn, nn.Identity())


def _split(prefix: str) -> Callable[[dict], tuple[dict, dict]]:
    def split(state: dict) -> tuple[dict, dict]:
        head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return {k: v for k, v in state.items() if not k.startswith(prefix)}, head

    return split


@register
class ResNet(Family):
    """torchvision's ResNets: stem conv1-bn1-relu-maxpool, stages layer1..layer4, global
    average pooling; the classifier fc becomes g. ``resnet10``: torchvision's ResNet with
    one basic block per stage (half of ResNet-18's layers), for the demo on a CPU; no
    ImageNet weights exist for it."""

    name = "resnet"
    variants = ("resnet18", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2", "resnet10")
    stages = ("layer1", "layer2", "layer3", "layer4")
    fast_copy = True
    signature = "layer1.0.conv1.weight"
    map_weights = staticmethod(_split("fc."))

    @staticmethod
    def build(variant: str, resolution: int | None = None):
        import torchvision.models as tvm

        if variant == "resnet10":
            from torchvision.models.resnet import BasicBlock

            trunk = tvm.ResNet(BasicBlock, [1, 1, 1, 1])
        else:
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


def _blocks(trunk_blocks, quarters: int = 4) -> list[tuple[int, int]]:
    """Four stages of a plain stack of blocks: its quarters (ViT-B/16: blocks 1-3, 4-6, 7-9, 10-12)."""
    n = len(trunk_blocks)
    cuts = [round(n * (i + 1) / quarters) for i in range(quarters)]
    return list(zip([0] + cuts[:-1], cuts))


@register
class ViT(Family):
    """torchvision's VisionTransformer: the stem embeds patches, prepends the class token
    and adds the position embeddings; the four stages are the quarters of the encoder's
    blocks; pooling is the final LayerNorm's class token; the head becomes g. ``layers()``
    gives the tokens without the class token (one row per token). Built for the job's
    resolution: ImageNet weights made at another side get their position embeddings
    interpolated once (torchvision's interpolate_embeddings), and images of another side
    (progressive resizing, a source model on a target task's images) on every call, as
    timm's dynamic image size does. ``vit_tiny_p4``: a small ViT for 32-px images on a CPU
    (patch 4, 4 blocks of width 192), not an ImageNet model."""

    name = "vit"
    variants = ("vit_b_16", "vit_tiny_p4")
    stages = ("block_q1", "block_q2", "block_q3", "block_q4")
    fast_copy = False
    fold = None
    signature = "encoder.layers.encoder_layer_0.ln_1.weight"
    map_weights = staticmethod(_split("heads.head."))
    SIZES = {
        "vit_b_16": dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
        "vit_tiny_p4": dict(patch_size=4, num_layers=4, num_heads=3, hidden_dim=192, mlp_dim=768),
    }

    @staticmethod
    def build(variant: str, resolution: int | None = None):
        from torchvision.models.vision_transformer import VisionTransformer

        size = ViT.SIZES[variant]
        side = resolution or (224 if variant == "vit_b_16" else 32)
        if side % size["patch_size"]:
            raise ModelError(f"{variant}: resolution {side} is not a multiple of its patch size {size['patch_size']}")
        trunk = VisionTransformer(image_size=side, **size)
        trunk.heads = nn.Identity()
        return trunk, size["hidden_dim"]

    @staticmethod
    def stem(trunk, x):
        p = trunk.patch_size
        grid = (x.shape[2] // p, x.shape[3] // p)
        x = trunk.conv_proj(x).flatten(2).transpose(1, 2)  # (n, tokens, width)
        x = torch.cat([trunk.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return trunk.encoder.dropout(x + ViT.positions(trunk, grid))

    @staticmethod
    def positions(trunk, grid: tuple[int, int]):
        """The position embeddings for a grid of patches: as built, or interpolated."""
        pos, side = trunk.encoder.pos_embedding, trunk.image_size // trunk.patch_size
        if grid == (side, side):
            return pos
        cells = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        cells = nn.functional.interpolate(cells, size=grid, mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], cells.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)

    @staticmethod
    def stage(trunk, name: str, x):
        lo, hi = _blocks(trunk.encoder.layers)[ViT.stages.index(name)]
        for block in trunk.encoder.layers[lo:hi]:
            x = block(x)
        return x

    @staticmethod
    def expose(x):
        return x[:, 1:]  # the patch tokens: (n, tokens, width)

    @staticmethod
    def pool(trunk, x):
        return trunk.encoder.ln(x)[:, 0]

    @staticmethod
    def fit_state(trunk, state: dict) -> dict:
        """Position embeddings of weights made at another side, interpolated to this one."""
        key = "encoder.pos_embedding"
        if key in state and state[key].shape != trunk.encoder.pos_embedding.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = interpolate_embeddings(trunk.image_size, trunk.patch_size, dict(state))
        return state


def _nchw(x):
    return x.permute(0, 3, 1, 2)


class _Features(Family):
    """Networks whose ``features`` is the stem (features[0]) and four stages,
    features[1], [2:4], [4:6], [6:8], each after the first opened by a downsampling layer."""

    SPANS = {"stage1": (1, 2), "stage2": (2, 4), "stage3": (4, 6), "stage4": (6, 8)}
    stages = tuple(SPANS)
    HEAD: tuple[str, ...] = ()  # the path to the classifier's Linear, which becomes g

    @classmethod
    def build(cls, variant: str, resolution: int | None = None):
        import torchvision.models as tvm

        if variant == "resnet10":
            from torchvision.models.resnet import BasicBlock

            trunk = tvm.ResNet(BasicBlock, [1, 1, 1, 1])
        else:
            trunk = getattr(tvm, variant)(weights=None)  # any resolution: the pooling is global
        parent = trunk
        for name in cls.HEAD[:-1]:
            parent = getattr(parent, name)
        width = getattr(parent, cls.HEAD[-1]).in_features
        setattr(parent, cls.HEAD[-1], nn.Identity())
        return trunk, width

    @staticmethod
    def stem(trunk, x):
        return trunk.features[0](x)

    @staticmethod
    def stage(trunk, name: str, x):
        lo, hi = _Features.SPANS[name]
        for module in trunk.features[lo:hi]:
            x = module(x)
        return x


@register
class Swin(_Features):
    """torchvision's Swin Transformer: the stem is the patch embedding (features[0]); the
    four stages are features[1], [2:4], [4:6], [6:8] (patch merging opens stages 2-4);
    pooling is the final LayerNorm and the spatial mean. Its tensors are NHWC;
    ``layers()`` gives them as NCHW, one row per position. Any resolution: the relative
    position biases do not depend on it."""

    name = "swin"
    variants = ("swin_t",)
    fast_copy = False
    fold = None
    signature = "features.1.0.attn.relative_position_bias_table"
    map_weights = staticmethod(_split("head."))
    HEAD = ("head",)

    expose = staticmethod(_nchw)

    @staticmethod
    def pool(trunk, x):
        return trunk.flatten(trunk.avgpool(trunk.permute(trunk.norm(x))))


@register
class ConvNeXt(_Features):
    """torchvision's ConvNeXt: the stem is features[0]; the four stages are features[1],
    [2:4], [4:6], [6:8] (a downsampling layer opens stages 2-4); pooling is the spatial
    mean and the classifier's LayerNorm, whose Linear becomes g. No BatchNorm to fold."""

    name = "convnext"
    variants = ("convnext_tiny",)
    fast_copy = False
    fold = None
    signature = "features.1.0.block.0.weight"
    map_weights = staticmethod(_split("classifier.2."))
    HEAD = ("classifier", "2")

    @staticmethod
    def pool(trunk, x):
        return trunk.classifier[1](trunk.classifier[0](trunk.avgpool(x)))
