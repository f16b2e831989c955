"""Backbones as the paper decomposes them: feature extractor f and classifier g.

``StudyModel(x) = g(f(x))`` takes images in [0, 1]; the ImageNet normalisation is
f's first layer, so attacks and analyses always work in pixel space (as MadryLab's
robustness ``AttackerModel`` does). f ends at the pooled embedding; g is the last
linear layer. ``model.layers(x)`` returns layer1 ... layer4 (the paper's conv2_x ...
conv5_x) for CCA.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BACKBONES = ("resnet18", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2")
LAYERS = ("layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ModelError(ValueError):
    """An unknown backbone, or weights that do not fit the architecture."""


class Normalize(nn.Module):
    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class FeatureExtractor(nn.Module):
    """f: [0, 1] images -> pooled embedding, through a torchvision ResNet trunk."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.normalize = Normalize()
        self.backbone = backbone  # a torchvision ResNet whose fc is Identity

    def layers(self, x, upto: str = "layer4") -> "OrderedDict[str, torch.Tensor]":
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(self.normalize(x)))))
        out = OrderedDict()
        for name in LAYERS:
            x = getattr(b, name)(x)
            out[name] = x
            if name == upto:
                break
        return out

    def forward(self, x):
        return torch.flatten(self.backbone.avgpool(self.layers(x)["layer4"]), 1)


class StudyModel(nn.Module):
    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        trunk = _torchvision_resnet(backbone)
        in_features = trunk.fc.in_features
        trunk.fc = nn.Identity()
        self.backbone_name = backbone
        self.f = FeatureExtractor(trunk)
        self.g = nn.Linear(in_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.g.out_features

    def forward(self, x):
        return self.g(self.f(x))

    def layers(self, x, upto: str = "layer4"):
        return self.f.layers(x, upto)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh g for a new target task (f is kept)."""
        self.g = nn.Linear(self.g.in_features, num_classes).to(self.g.weight.device)


def _as(cls, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a ``cls``, a subclass of Conv2d: the same hyperparameters, weights and
    requires_grad flags."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
              conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
              device=conv.weight.device, dtype=conv.weight.dtype)
    new.load_state_dict(conv.state_dict())
    for name, p in new.named_parameters():
        p.requires_grad_(getattr(conv, name).requires_grad)
    return new


class PhaseConv2d(nn.Conv2d):
    """A convolution whose input gradient on CPU is one stride-1 convolution giving all
    ``stride**2`` phases of it (output pixel ``s*a + r`` sees its own sub-kernel of the
    weights), interleaved by ``pixel_shuffle``: the polyphase form of the transposed
    convolution, the same gradient up to float rounding. For the stem of the inference
    copy: oneDNN's own backward of a convolution whose input has 3 channels took 12 of
    the 76 ms of an attack pass of the demo's ResNet-18 (bf16, batch 256, 32 px), five
    times its forward; this takes 5. Other devices use the native backward.
    Square strides, no dilation or groups (``from_conv`` keeps any other conv as it is)."""

    PHASE_DEVICES = frozenset({"cpu"})  # measured there only

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        if (type(conv) is not nn.Conv2d or conv.stride[0] != conv.stride[1] or conv.dilation != (1, 1)
                or conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
            return conv
        return _as(cls, conv)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._phase = (None, None)  # (dtype, layout, weight version), the phase kernel

    def _taps(self, dim: int) -> tuple[int, int]:
        """Offsets u of the gradient rows feeding output pixel ``s*a + r``: the weight row
        ``r + p - s*u`` must exist, for some phase r."""
        s, k, p = self.stride[0], self.kernel_size[dim], self.padding[dim]
        return (min((r + p - k) // s + 1 for r in range(s)), max((r + p) // s for r in range(s)))

    def phase_kernel(self, dtype, channels_last: bool) -> torch.Tensor:
        key = (dtype, channels_last, self.weight._version)
        if self._phase[0] != key:
            s, w = self.stride[0], self.weight.detach()
            (lo_h, hi_h), (lo_w, hi_w) = self._taps(0), self._taps(1)
            k = w.new_zeros(self.in_channels, s, s, self.out_channels, hi_h - lo_h + 1, hi_w - lo_w + 1)
            for r in range(s):
                for t in range(hi_h - lo_h + 1):
                    kh = r + self.padding[0] - s * (t + lo_h)
                    for q in range(s):
                        for v in range(hi_w - lo_w + 1):
                            kw = q + self.padding[1] - s * (v + lo_w)
                            if 0 <= kh < self.kernel_size[0] and 0 <= kw < self.kernel_size[1]:
                                k[:, r, q, :, t, v] = w[:, :, kh, kw].t()
            k = k.reshape(self.in_channels * s * s, self.out_channels, *k.shape[-2:]).to(dtype)
            self._phase = (key, k.contiguous(memory_format=torch.channels_last) if channels_last else k)
        return self._phase[1]

    def input_grad(self, grad: torch.Tensor, size) -> torch.Tensor:
        """The gradient of the input (of spatial ``size``) from the output's ``grad``."""
        s, (h, w) = self.stride[0], size
        a, b = -(-h // s), -(-w // s)  # phase rows and columns
        (lo_h, hi_h), (lo_w, hi_w) = self._taps(0), self._taps(1)
        # rows lo .. hi around each phase row; the convolution's own (symmetric) padding
        # and a crop: a padded copy of the gradient costs more than the convolution
        ph = max(-lo_h, a - 1 + hi_h - (grad.shape[-2] - 1), 0)
        pw = max(-lo_w, b - 1 + hi_w - (grad.shape[-1] - 1), 0)
        kernel = self.phase_kernel(grad.dtype, grad.is_contiguous(memory_format=torch.channels_last))
        out = F.conv2d(grad, kernel, padding=(ph, pw))[..., ph + lo_h:ph + lo_h + a, pw + lo_w:pw + lo_w + b]
        return F.pixel_shuffle(out, s)[..., :h, :w]

    def forward(self, x):
        return _PhaseConv.apply(x, self.weight, self.bias, self)


class _PhaseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv):
        ctx.conv, ctx.size, ctx.x_dtype = conv, x.shape[-2:], x.dtype
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        return F.conv2d(x, weight, bias, conv.stride, conv.padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        conv, gx = ctx.conv, None
        if ctx.needs_input_grad[0]:
            if grad.device.type in conv.PHASE_DEVICES:
                gx = conv.input_grad(grad, ctx.size)
            else:
                shape = (grad.shape[0], conv.in_channels, *ctx.size)
                gx = torch.nn.grad.conv2d_input(shape, weight.to(grad.dtype), grad, conv.stride, conv.padding)
            gx = gx.to(ctx.x_dtype)
        gw = (torch.nn.grad.conv2d_weight(x, weight.shape, grad.to(x.dtype), conv.stride, conv.padding)
              if ctx.needs_input_grad[1] else None)
        gb = grad.sum((0, 2, 3)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class SmallMapConv2d(nn.Conv2d):
    """A frozen convolution that, on a map with fewer pixels than its kernel has taps
    (``h * w * groups < kh * kw``), runs as the one dense matrix it is on that map: the
    image of every basis input, built once per map size, dtype and layout (and again
    when the weights move or change in place). Most taps of a 3x3 kernel on a 2x2 or 1x1
    map fall into the zero padding; the matrix holds only the taps that meet a pixel, and
    a matrix product runs near the CPU's bf16 rate, where oneDNN's convolution on such
    maps does not (256 images, bf16: 512 channels on 1x1, 2.0 ms against 0.35; 256 on
    2x2, 3.0 against 1.4). On the demo's 32-px ResNet-18 that is layer3 and layer4, and
    a bf16 attack pass gets 1.29x faster. The same function up to float rounding, for the
    inference copy. Larger maps (on 4x4 the matrix took 5.4 ms against 2.3), a weight
    that needs a gradient, devices other than the CPU (measured there only) and matrices
    of more than ``MAX_ENTRIES`` take the convolution itself."""

    DENSE_DEVICES = frozenset({"cpu"})
    MAX_ENTRIES = 1 << 24  # 64 MB in fp32: a wide ResNet's 1024-channel 3x3 conv on 2x2

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        return _as(cls, conv) if type(conv) is nn.Conv2d else conv

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._dense, self._dense_of = {}, None  # (h, w, dtype, layout) -> matrix; of which weights

    def dense(self, h: int, w: int, dtype, channels_last: bool):
        """(matrix, bias, output side) of this convolution on an ``h x w`` map. Rows and
        columns are pixels in the layout's order: (h, w, c) for channels_last, else (c, h, w)."""
        weights = (self.weight.data_ptr(), self.weight._version)
        if self._dense_of != weights:
            self._dense, self._dense_of = {}, weights
        key = (h, w, dtype, channels_last)
        if key in self._dense:
            return self._dense[key]
        if dtype != torch.float32:  # cast once from the fp32 matrix
            matrix, bias, side = self.dense(h, w, torch.float32, channels_last)
            self._dense[key] = matrix.to(dtype), bias.to(dtype), side
            return self._dense[key]
        n, weight = self.in_channels * h * w, self.weight.detach().float()
        basis = torch.eye(n, device=weight.device)
        basis = basis.view(n, h, w, -1).permute(0, 3, 1, 2) if channels_last else basis.view(n, -1, h, w)
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
            image = self._conv_forward(basis, weight, None)  # (n, out, oh, ow), in fp32
        side = tuple(image.shape[-2:])
        image = image.permute(0, 2, 3, 1) if channels_last else image
        bias = self.bias.detach().float() if self.bias is not None else weight.new_zeros(self.out_channels)
        bias = bias.repeat(side[0] * side[1]) if channels_last else bias.repeat_interleave(side[0] * side[1])
        self._dense[key] = image.reshape(n, -1).t().contiguous(), bias, side
        return self._dense[key]

    def forward(self, x):
        h, w = x.shape[-2:]
        if (h * w * self.groups >= self.kernel_size[0] * self.kernel_size[1] or self.weight.requires_grad
                or x.device.type not in self.DENSE_DEVICES
                or self.in_channels * self.out_channels * (h * w) ** 2 > self.MAX_ENTRIES):
            return super().forward(x)
        kind = x.device.type  # under autocast the product runs in its dtype: no cast per call
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        channels_last = x.is_contiguous(memory_format=torch.channels_last)
        matrix, bias, (oh, ow) = self.dense(h, w, dtype, channels_last)
        n = len(x)
        if channels_last:
            y = F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), matrix, bias)
            return y.view(n, oh, ow, -1).permute(0, 3, 1, 2)
        return F.linear(x.reshape(n, -1), matrix, bias).view(n, -1, oh, ow)


def inference_copy(model: StudyModel) -> StudyModel:
    """A frozen copy of ``model`` for evaluation: every BatchNorm folded into the
    convolution before it (in eval mode BN is an affine map, so the function is the same
    up to float rounding), channels_last memory, the stem's input gradient in its
    polyphase form (``PhaseConv2d``) and the blocks' convolutions as dense matrices on
    maps smaller than their kernels (``SmallMapConv2d``). Attacks run 10+
    forward/backward passes per image, and these make each one cheaper on CPU. The
    original is not touched; the copy has no parameter that requires a gradient."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(model).eval()

    def fold(block: nn.Module, pairs) -> None:
        for conv, bn in pairs:
            c, b = getattr(block, conv, None), getattr(block, bn, None)
            if isinstance(c, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                setattr(block, conv, fuse_conv_bn_eval(c, b))
                setattr(block, bn, nn.Identity())

    trunk = fast.f.backbone  # torchvision ResNet: the pairs are known by name
    fold(trunk, [("conv1", "bn1")])
    for layer in LAYERS:
        for block in getattr(trunk, layer):
            fold(block, [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")])
            if block.downsample is not None:
                fold(block.downsample, [("0", "1")])
    trunk.conv1 = PhaseConv2d.from_conv(trunk.conv1)
    for layer in LAYERS:
        for name, conv in list(getattr(trunk, layer).named_modules()):
            if type(conv) is nn.Conv2d:
                parent, _, leaf = name.rpartition(".")
                setattr(getattr(trunk, layer).get_submodule(parent), leaf, SmallMapConv2d.from_conv(conv))
    for p in fast.parameters():
        p.requires_grad_(False)
    return fast.to(memory_format=torch.channels_last)


def _torchvision_resnet(name: str) -> nn.Module:
    import torchvision.models as tvm

    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return getattr(tvm, name)(weights=None)


def build_model(backbone: str, num_classes: int) -> StudyModel:
    return StudyModel(backbone, num_classes)


def load_trunk_weights(model: StudyModel, source: str, keep_classifier: bool = False) -> str:
    """Loads ImageNet weights into f; returns the format it found. ``source`` is
    ``imagenet`` (torchvision's, downloaded and cached by torchvision) or a file:

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
    """
    mean = std = None
    if source == "imagenet":
        import torchvision.models as tvm

        weights = tvm.get_model_weights(model.backbone_name).DEFAULT
        state = weights.get_state_dict(progress=True)
        origin, kind = f"torchvision {weights}", "torchvision"
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt, truncated or not a tensor-only pickle
            raise ModelError(f"{path}: cannot be read as a weights-only checkpoint ({err})") from None
        origin = str(path)
        state, mean, std, kind = _unwrap_state(state, origin)
    if not isinstance(state, dict):
        raise ModelError(f"{origin}: expected a state dict, got {type(state).__name__}")
    trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_state(model.f.backbone, trunk_state, origin, model.backbone_name)
    if mean is not None and std is not None:
        model.f.normalize.mean.copy_(mean.reshape(1, -1, 1, 1))
        model.f.normalize.std.copy_(std.reshape(1, -1, 1, 1))
    if keep_classifier:
        fc = {k[3:]: v for k, v in state.items() if k.startswith("fc.")}
        if not fc:
            raise ModelError(f"{origin}: has no classifier (fc) to keep")
        load_state(model.g, fc, origin + " (classifier)", f"a {model.num_classes}-class g")
    return kind


def _unwrap_state(state, origin: str):
    """(torchvision-style state dict, normaliser mean, std, format name) of a loaded file."""
    if not isinstance(state, dict):
        return state, None, None, "unknown"
    for key in ("model", "state_dict"):  # robustness: "model"; many others: "state_dict"
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    bare = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    if any(k.startswith(("model.", "attacker.model.")) for k in bare):
        net = {k[len("model."):]: v for k, v in bare.items() if k.startswith("model.")}
        if not net:  # only the attacker's copy was saved
            net = {k[len("attacker.model."):]: v for k, v in bare.items()
                   if k.startswith("attacker.model.")}
        mean = bare.get("normalizer.new_mean", bare.get("attacker.normalize.new_mean"))
        std = bare.get("normalizer.new_std", bare.get("attacker.normalize.new_std"))
        if mean is not None and (mean.numel() != 3 or std is None or std.numel() != 3):
            raise ModelError(f"{origin}: a robustness-library normaliser with "
                             f"{mean.numel()} channels; expected 3")
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
            detail.append(f"{len(wrong)} tensors of another shape, e.g. {k}: "
                          f"{tuple(state[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            detail.append(f"{len(missing)} missing, e.g. {missing[0]}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise ModelError(f"{origin} does not fit {arch}: " + "; ".join(detail))
    module.load_state_dict(state)


def save_checkpoint(model: StudyModel, path: Path, extra: dict | None = None) -> None:
    """A tensors-only checkpoint (loadable with weights_only=True), written atomically."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({"backbone": model.backbone_name, "num_classes": model.num_classes,
                "state_dict": model.state_dict(), **(extra or {})}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, backbone: str | None = None) -> StudyModel:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"checkpoint not found: {path}") from None
    except Exception as err:
        raise ModelError(f"{path}: cannot be read as a weights-only checkpoint ({err})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "backbone" not in ckpt:
        raise ModelError(f"{path}: not a study checkpoint (no backbone/state_dict)")
    if backbone is not None and ckpt["backbone"] != backbone:
        raise ModelError(f"{path}: checkpoint is a {ckpt['backbone']}, expected {backbone}")
    model = build_model(ckpt["backbone"], int(ckpt["num_classes"]))
    load_state(model, ckpt["state_dict"], str(path), ckpt["backbone"])
    return model
