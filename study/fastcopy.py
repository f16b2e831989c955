"""The inference copy every evaluation and analysis attacks: a frozen copy of a model
with its normalisation folded (the family's ``fold``), and, on families whose registry
entry allows it (``fast_copy``), two CPU conversions of its convolutions that make each
attack pass cheaper there: the stem's input gradient in polyphase form (``PhaseConv2d``)
and convolutions on maps smaller than their kernels as dense matrices
(``SmallMapConv2d``). Both compute the same function up to float rounding; other devices
take the native paths. ``eval.fast_copy: false`` in a job turns the conversions off.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from study.backbones import family


def _as(cls, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` as a ``cls``, a subclass of Conv2d: the same hyperparameters, weights and
    requires_grad flags."""
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.load_state_dict(conv.state_dict())
    for name, p in new.named_parameters():
        p.requires_grad_(getattr(conv, name).requires_grad)
    return new


class PhaseConv2d(nn.Conv2d):
    """A convolution whose input gradient on CPU is one stride-1 convolution giving all
    ``stride**2`` phases of it (output pixel ``s*a + r`` sees its own sub-kernel of the
    weights), interleaved by ``pixel_shuffle``: the polyphase form of the transposed
    convolution, the same gradient up to float rounding. For the stem of the inference
    copy: oneDNN's own backward of a convolution whose input has 3 channels is several
    times slower than its forward on CPU (docs/benchmarks.md, "Where the gain comes from"). Other devices
    use the native backward. Square strides, no dilation or groups (``from_conv`` keeps
    any other conv as it is)."""

    PHASE_DEVICES = frozenset({"cpu"})  # measured there only

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        if (
            type(conv) is not nn.Conv2d
            or conv.stride[0] != conv.stride[1]
            or conv.dilation != (1, 1)
            or conv.groups != 1
            or conv.padding_mode != "zeros"
            or isinstance(conv.padding, str)
        ):
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
        out = F.conv2d(grad, kernel, padding=(ph, pw))[..., ph + lo_h : ph + lo_h + a, pw + lo_w : pw + lo_w + b]
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
        gw = (
            torch.nn.grad.conv2d_weight(x, weight.shape, grad.to(x.dtype), conv.stride, conv.padding)
            if ctx.needs_input_grad[1]
            else None
        )
        gb = grad.sum((0, 2, 3)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None


class SmallMapConv2d(nn.Conv2d):
    """A frozen convolution that, on a map with fewer pixels than its kernel has taps
    (``h * w * groups < kh * kw``), runs as the one dense matrix it is on that map: the
    image of every basis input, built once per map size, dtype and layout (and again
    when the weights move or change in place). Most taps of a 3x3 kernel on a 2x2 or 1x1
    map fall into the zero padding; the matrix holds only the taps that meet a pixel, and
    a matrix product runs near the CPU's bf16 rate, where oneDNN's convolution on such
    maps does not (docs/benchmarks.md, "Where the gain comes from"). On the demo's 32-px ResNet-18 that is
    layer3 and layer4. The same function up to float rounding, for the inference copy.
    Larger maps (where the matrix loses), a weight that needs a gradient, devices other
    than the CPU (measured there only) and matrices of more than ``MAX_ENTRIES`` take the
    convolution itself."""

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
        if (
            h * w * self.groups >= self.kernel_size[0] * self.kernel_size[1]
            or self.weight.requires_grad
            or x.device.type not in self.DENSE_DEVICES
            or self.in_channels * self.out_channels * (h * w) ** 2 > self.MAX_ENTRIES
        ):
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


def inference_copy(model, fast: bool = True):
    """A frozen copy of ``model`` (a StudyModel) for evaluation: eval mode, its family's
    normalisation folded (in eval mode BatchNorm is an affine map, so the function is the
    same up to float rounding), no parameter that requires a gradient; with ``fast`` and
    a family that allows it, the CPU conversions of this module and channels_last memory.
    Attacks run 10+ forward/backward passes per image, and these make each one cheaper.
    The original is not touched."""
    fam = family(model.backbone_name)
    copied = copy.deepcopy(model).eval()
    trunk = copied.f.backbone
    if fam.fold is not None:
        fam.fold(trunk)
    for p in copied.parameters():
        p.requires_grad_(False)
    if not (fast and fam.fast_copy):
        return copied
    convs = [(n, m) for n, m in trunk.named_modules() if type(m) is nn.Conv2d]
    for i, (name, conv) in enumerate(convs):  # the stem first: its input is the image
        parent, _, leaf = name.rpartition(".")
        form = PhaseConv2d if i == 0 and conv.in_channels == 3 else SmallMapConv2d
        setattr(trunk.get_submodule(parent) if parent else trunk, leaf, form.from_conv(conv))
    return copied.to(memory_format=torch.channels_last)
