import pytest
import torch
import torchvision

from study.backbones import family
from study.models import BACKBONES, ModelError, build_model, load_checkpoint, load_trunk_weights, save_checkpoint


@pytest.mark.parametrize("backbone", [b for b in BACKBONES if family(b).name == "resnet"])
def test_backbones_split_into_f_and_g(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=7).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        emb = model.f(x)
        logits = model(x)
        layers = model.layers(x)
    assert logits.shape == (2, 7) and torch.allclose(logits, model.g(emb))
    assert list(layers) == list(family(backbone).stages) == ["layer1", "layer2", "layer3", "layer4"]
    assert layers["layer4"].shape[1] == emb.shape[1] == model.g.in_features
    # f's first layer is the normalisation: the model takes [0, 1] pixels
    assert isinstance(model.f.normalize, torch.nn.Module)
    assert torch.allclose(model.f.normalize(torch.full((1, 3, 1, 1), 0.485)).flatten()[0], torch.tensor(0.0), atol=1e-6)


def test_model_matches_torchvision_on_normalised_input():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    model = build_model("resnet18", 5).eval()
    state = {k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    model.f.backbone.load_state_dict(state, strict=False)
    model.g.load_state_dict({"weight": tv.fc.weight, "bias": tv.fc.bias})
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), tv((x - mean) / std), atol=1e-5)


def test_imagenet_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", 3)
    load_trunk_weights(model, str(path))
    assert torch.equal(model.f.backbone.conv1.weight, tv.conv1.weight)
    assert model.g.out_features == 3  # the ImageNet classifier is not taken


def test_wrong_architecture_and_corrupt_files_are_refused(tmp_path):
    wrong = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    with pytest.raises(ModelError, match="resnet50.pth does not fit resnet18"):
        load_trunk_weights(build_model("resnet18", 3), str(wrong))
    corrupt = tmp_path / "bad.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="bad.pth: cannot be read"):
        load_trunk_weights(build_model("resnet18", 3), str(corrupt))
    with pytest.raises(ModelError, match="unknown backbone 'resnet9'"):
        build_model("resnet9", 3)


def test_checkpoint_roundtrip_and_architecture_check(tmp_path):
    model = build_model("resnet18", 4)
    save_checkpoint(model, tmp_path / "m.pt")
    back = load_checkpoint(tmp_path / "m.pt", "resnet18")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ModelError, match="is a resnet18, expected resnet50"):
        load_checkpoint(tmp_path / "m.pt", "resnet50")


def _robustness_checkpoint(tv, mean, std, path, prefix="module."):
    """A checkpoint as MadryLab's robustness library writes it (Salman et al.'s models):
    the AttackerModel's state dict under "model" -- the network twice (model, and the
    attacker's model), the input normaliser twice -- plus optimiser state and epoch."""
    net = tv.state_dict()
    state = {
        f"{prefix}normalizer.new_mean": mean.view(3, 1, 1),
        f"{prefix}normalizer.new_std": std.view(3, 1, 1),
        f"{prefix}attacker.normalize.new_mean": mean.view(3, 1, 1),
        f"{prefix}attacker.normalize.new_std": std.view(3, 1, 1),
    }
    state.update({f"{prefix}model.{k}": v for k, v in net.items()})
    state.update({f"{prefix}attacker.model.{k}": v for k, v in net.items()})
    opt = torch.optim.SGD(tv.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model": state, "optimizer": opt.state_dict(), "schedule": None, "epoch": 90}, path)


@pytest.mark.parametrize("prefix", ["module.", ""])
def test_robustness_library_checkpoint_imports_with_the_same_logits(tmp_path, prefix):
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    for m in tv.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    path = tmp_path / "imagenet_linf_4.pt"
    _robustness_checkpoint(tv, mean, std, path, prefix)

    model = build_model("resnet18", 10)
    assert load_trunk_weights(model, str(path), keep_classifier=True) == "robustness"
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = tv((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
        assert torch.allclose(model.eval()(x), want, atol=1e-5)
    # for a target task the classifier is left out, the trunk and normaliser are not
    target = build_model("resnet18", 3)
    load_trunk_weights(target, str(path))
    assert torch.equal(target.f.backbone.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    assert torch.equal(target.f.normalize.std.flatten(), std)


def test_robustness_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet50_l2_eps3.ckpt"
    _robustness_checkpoint(
        torchvision.models.resnet50(weights=None),
        torch.tensor([0.485, 0.456, 0.406]),
        torch.tensor([0.229, 0.224, 0.225]),
        path,
    )
    with pytest.raises(ModelError, match="resnet50_l2_eps3.ckpt does not fit resnet18"):
        load_trunk_weights(build_model("resnet18", 3), str(path))
    truncated = tmp_path / "cut.ckpt"
    truncated.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(ModelError, match="cut.ckpt: cannot be read"):
        load_trunk_weights(build_model("resnet18", 3), str(truncated))


@pytest.mark.parametrize(
    "kernel,stride,padding,side",
    [
        (7, 2, 3, 32),
        (7, 2, 3, 33),  # torchvision's stem, even and odd sides
        (3, 2, 1, 15),
        (1, 2, 0, 9),  # a phase with no weight at all (1x1, stride 2)
        (5, 3, 2, 20),
        ((3, 5), 2, (1, 2), 17),
        (2, 2, 3, 11),  # padding wider than the kernel
        (3, 1, 1, 10),
    ],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_phase_conv_has_the_native_gradients(kernel, stride, padding, side, channels_last):
    """The polyphase input gradient is the transposed convolution's, whatever the kernel,
    stride, padding, side (odd, non-square) and layout; weight and bias gradients too."""
    from study.fastcopy import PhaseConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel, stride, padding)
    phase = PhaseConv2d.from_conv(conv)
    assert type(phase) is PhaseConv2d
    x = torch.randn(4, 3, side, side + 1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = conv(a), phase(b)
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert b.grad.shape == a.grad.shape and b.grad.dtype == a.grad.dtype
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(phase.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(phase.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-5)
    # under bf16 autocast the gradient is bf16 arithmetic of the same sum, back in fp32
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = conv(a), phase(b)
    assert yb.dtype == torch.bfloat16
    (ga,) = torch.autograd.grad((ya.float() * g).sum(), a)
    (gb,) = torch.autograd.grad((yb.float() * g).sum(), b)
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb, ga, rtol=0.05, atol=0.05 * float(ga.abs().max()))


def test_phase_conv_keeps_what_it_cannot_do_and_follows_weight_changes(monkeypatch):
    from study.fastcopy import PhaseConv2d

    for conv in (
        torch.nn.Conv2d(3, 8, 3, (2, 1)),
        torch.nn.Conv2d(3, 8, 3, dilation=2),
        torch.nn.Conv2d(4, 8, 3, groups=2),
        torch.nn.Conv2d(3, 8, 3, padding="same"),
        torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"),
    ):
        assert PhaseConv2d.from_conv(conv) is conv
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 7, 2, 3)
    phase = PhaseConv2d.from_conv(conv)
    x = torch.randn(2, 3, 16, 16)
    g = torch.randn(2, 8, 8, 8)
    phase.input_grad(g, (16, 16))  # the phase kernel is cached ...
    with torch.no_grad():
        conv.weight.mul_(-2)
        phase.weight.mul_(-2)  # ... and rebuilt once the weights change in place
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (conv(a) * g).sum().backward()
    (phase(b) * g).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)
    # where the phase form is not used (off the CPU) the native backward gives them
    monkeypatch.setattr(PhaseConv2d, "PHASE_DEVICES", frozenset())
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (conv(a) * g).sum().backward()
    (phase(b) * g).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-5)


def _dense_maps(conv) -> set:
    """The (h, w, dtype) of the dense matrices a SmallMapConv2d keeps."""
    return {key[:3] for key in conv._dense}


@pytest.mark.parametrize(
    "kernel,stride,padding,groups,dilation,side",
    [
        (3, 1, 1, 1, 1, (1, 1)),
        (3, 1, 1, 1, 1, (2, 2)),  # layer4 and layer3 of a 32-px ResNet
        (3, 2, 1, 1, 1, (2, 2)),
        (3, 1, 1, 1, 1, (1, 2)),  # stride 2 into 1x1; a non-square map
        (3, 1, 2, 2, 1, (2, 1)),
        (3, 1, 2, 1, 2, (2, 2)),  # groups; dilation; output larger than input
        (5, 1, 0, 1, 1, (6, 6)),
        (3, 1, 1, 1, 1, (4, 4)),
    ],
)  # maps as large as the kernel: the conv
@pytest.mark.parametrize("channels_last", [False, True])
def test_small_map_conv_is_the_convolution(kernel, stride, padding, groups, dilation, side, channels_last):
    """On a map with fewer pixels than kernel taps, the dense matrix gives the convolution's
    output (in the input's layout) and its input gradient; elsewhere the convolution runs."""
    from study.fastcopy import SmallMapConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, kernel, stride, padding, dilation, groups).requires_grad_(False)
    small = SmallMapConv2d.from_conv(conv)
    x = torch.randn(5, 4, *side)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = conv(a), small(b)
    dense = side[0] * side[1] * groups < kernel * kernel
    assert _dense_maps(small) == ({(*side, torch.float32)} if dense else set())
    assert yb.shape == ya.shape and yb.dtype == ya.dtype
    assert yb.is_contiguous(memory_format=torch.channels_last) == ya.is_contiguous(memory_format=torch.channels_last)
    assert yb.is_contiguous() == ya.is_contiguous()
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    (ga,) = torch.autograd.grad((ya * g).sum(), a)
    (gb,) = torch.autograd.grad((yb * g).sum(), b)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-5)
    # under bf16 autocast: bf16 arithmetic of the same sums, from a matrix cast once
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = conv(a), small(b)
    assert yb.dtype == ya.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), ya.float(), rtol=0.02, atol=0.02 * float(ya.detach().abs().max()))
    (ga,) = torch.autograd.grad((ya.float() * g).sum(), a)
    (gb,) = torch.autograd.grad((yb.float() * g).sum(), b)
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb, ga, rtol=0.05, atol=0.05 * float(ga.abs().max()))
    assert _dense_maps(small) == ({(*side, torch.float32), (*side, torch.bfloat16)} if dense else set())
    # a matrix first needed under autocast is still built in fp32
    small = SmallMapConv2d.from_conv(conv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small(x)
    torch.testing.assert_close(small(x), conv(x), rtol=1e-5, atol=1e-5)


def test_small_map_conv_follows_weight_changes_and_leaves_trainable_weights_alone(monkeypatch):
    from study.fastcopy import PhaseConv2d, SmallMapConv2d

    stem = PhaseConv2d.from_conv(torch.nn.Conv2d(3, 8, 7, 2, 3))
    assert SmallMapConv2d.from_conv(stem) is stem  # another form is kept as it is
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    small = SmallMapConv2d.from_conv(conv)
    x = torch.randn(3, 8, 2, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small(x).float().sum().backward()  # a weight that wants its gradient: the convolution itself
    assert not small._dense and small.weight.grad is not None
    small.requires_grad_(False)
    conv.requires_grad_(False)
    torch.testing.assert_close(small(x), conv(x), rtol=1e-5, atol=1e-5)  # the matrix is kept ...
    with torch.no_grad():
        conv.weight.mul_(-2)
        small.weight.mul_(-2)  # ... and rebuilt once the weights change in place
    torch.testing.assert_close(small(x), conv(x), rtol=1e-5, atol=1e-5)
    assert _dense_maps(small) == {(2, 2, torch.float32)}
    # off the CPU (where it was not measured) the convolution runs
    monkeypatch.setattr(SmallMapConv2d, "DENSE_DEVICES", frozenset())
    small._dense.clear()
    torch.testing.assert_close(small(x), conv(x), rtol=1e-5, atol=1e-5)
    assert not _dense_maps(small)


def test_a_checkpoint_from_before_the_registry_loads(tmp_path):
    """Checkpoints written before the backbone registry had no resolution and the same
    state-dict keys: torchvision's ResNet trunk under f.backbone, the normaliser, g."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=4)
    old = {f"f.backbone.{k}": v for k, v in tv.state_dict().items() if not k.startswith("fc.")}
    old |= {
        "f.normalize.mean": torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1),
        "f.normalize.std": torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1),
        "g.weight": tv.fc.weight.detach(),
        "g.bias": tv.fc.bias.detach(),
    }
    path = tmp_path / "old.pt"
    torch.save({"backbone": "resnet18", "num_classes": 4, "state_dict": old, "stage_key": "k"}, path)
    model = load_checkpoint(path, "resnet18").eval()
    assert set(model.state_dict()) == set(old)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), tv.eval()(model.f.normalize(x)), atol=1e-5)
