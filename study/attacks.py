"""The one attack engine: FGSM and PGD under L-inf or L2, in [0, 1] pixel space.

Names follow the paper: ``pgd10_linf_0.5`` is PGD with 10 steps at eps = 0.5/255,
``fgsm_linf_2.0`` one signed-gradient step at 2/255, ``autoattack_linf_0.5`` the
standard AutoAttack (the original implementation, PyPI ``pyautoattack``); L2 eps is in
[0, 1]-pixel L2 norm (``pgd10_l2_3.0``). ``strong_linf_0.5`` is the strong evaluation:
the worst case of the paper's PGD-10, PGD-50 from a random start with 5 restarts and the
standard AutoAttack, each run on the images the ones before it left unbroken (cheapest
first), so an image counts as robust only when it survives all three;
``strong_linf_0.5[version=apgd]`` runs AutoAttack's APGD-CE and APGD-DLR in its place.
PGD's step size defaults to the paper's 1.25 * eps / steps, starting from the clean
image as in the iterative attack of Kurakin et al. (2017) that the paper cites for
PGD-10. Why no random start by default: with one, the paper's step travels 1.25 eps in
all, so a coordinate that starts near -eps cannot reach +eps, so PGD-10 can lose to FGSM
at the same eps (the ``pgd_le_fgsm`` sanity flag, docs/guide/attacks.md). ``random_start:
true`` gives Madry's PGD.

Gradients are taken with respect to the input only (``torch.autograd.grad``), so no
parameter ever accumulates a gradient. For evaluation (``early_stop=True``) a sample
counts as broken as soon as *any* iterate -- the random start included -- is
misclassified, and from then on it costs no compute; adversarial training calls the
same engine with ``early_stop=False`` and gets the last iterate of every sample.

Mixed precision (``precision``: ``fp32``, the default, | ``bf16`` | ``auto``): an
evaluation may take its ascent steps in bfloat16, which halves the cost of a step where
the hardware has bf16 units (CUDA, or a CPU with AVX512-BF16/AMX), while keeping every
verdict in fp32:
bf16 logits only *propose* that a sample broke, and the sample counts as broken only
when an fp32 forward pass of that very iterate confirms it; otherwise it stays in the
attack. The last iterate of every sample is judged in fp32 alone. So AAI is never
lowered by rounding -- at worst bf16 misses a break at a middle iterate that fp32 would
have seen there. It is not the default: at a small eps one bf16 step moves only part of
the input's coordinates (the rounding of x + step), so the search itself is weaker and
AAI can only come out higher (``benchmarks/attack_precision.py`` measures the gap).
``auto`` means bf16 for evaluation where it is fast, fp32 otherwise; adversarial
training (``early_stop=False``) uses fp32 unless ``bf16`` is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

_NAME = re.compile(
    r"^(?:(?P<pgd>pgd)(?P<steps>\d+)|(?P<fgsm>fgsm)|(?P<aa>autoattack)|(?P<strong>strong))"
    r"_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)$"
)


class AttackError(ValueError):
    """An attack that cannot be run: unknown name, negative or non-numeric eps."""


@dataclass(frozen=True)
class Attack:
    kind: str  # "pgd" | "fgsm" | "autoattack" | "strong"
    norm: str  # "linf" | "l2"
    eps: float  # as written: 1/255 units for linf, pixel L2 norm for l2
    steps: int = 10
    restarts: int = 1
    random_start: bool = False
    rel_step: float = 1.25  # step size = rel_step * eps / steps (the paper's 1.25)
    targeted: bool = False
    max_images: int | None = None  # a cap of its own (AutoAttack on CPU needs one)
    precision: str = "fp32"  # of the ascent steps; verdicts are always fp32 (see above)
    loss: str = "ce"  # what the steps ascend: cross-entropy, or "cw" (C&W's margin)
    version: str = "standard"  # AutoAttack's: "standard", or "apgd" (its APGD-CE and APGD-DLR only)

    @property
    def name(self) -> str:
        """The paper's name, with any option that changes the attack appended:
        ``pgd10_linf_2.0[rel_step=2.5]``. Tables match on it, so a variant is never
        shown beside the paper's number for the standard attack."""
        head = f"pgd{self.steps}" if self.kind == "pgd" else self.kind
        base = parse_attack(f"{head}_{self.norm}_{float(self.eps)!r}")
        extra = [f"{k}={getattr(self, k)}" for k in NAMED if getattr(self, k) != getattr(base, k)]
        return f"{head}_{self.norm}_{float(self.eps)!r}" + (f"[{','.join(extra)}]" if extra else "")

    @property
    def eps_pixels(self) -> float:
        """eps in [0, 1] pixel units."""
        return self.eps / 255.0 if self.norm == "linf" else self.eps

    @property
    def step_pixels(self) -> float:
        return self.rel_step * self.eps_pixels / self.steps


LINF_MAX = 255.0  # an L-inf eps beyond the pixel range breaks every image: refused
NAMED = ("restarts", "random_start", "rel_step", "targeted", "loss", "version")  # options a name shows
LOSSES = ("ce", "cw")
# AutoAttack's versions: the standard one (APGD-CE, APGD-T, FAB-T, Square), and its two
# untargeted APGD runs alone (cross-entropy and DLR loss, 100 steps, one restart each):
# what a CPU can afford on every model and seed (Square's 5,000 queries and the targeted
# runs are most of the standard version's cost on a model that resists)
VERSIONS = ("standard", "apgd")


def _bracket(spec: str) -> tuple[str, dict]:
    """A name with options in brackets, as ``Attack.name`` writes them
    (``pgd10_linf_0.5[loss=cw,rel_step=2.5]``): the bare name and the options."""
    m = re.match(r"^(?P<base>[^\[]+)\[(?P<opts>[^\]]*)\]$", spec.strip())
    if not m:
        return spec, {}
    options = {}
    for part in filter(None, (p.strip() for p in m["opts"].split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            raise AttackError(f"attack {spec!r}: options in brackets are key=value, got {part!r}")
        words = {"True": True, "False": False, "true": True, "false": False}
        if value in words:
            options[key] = words[value]
        else:
            try:
                options[key] = int(value)
            except ValueError:
                try:
                    options[key] = float(value)
                except ValueError:
                    options[key] = value
    return m["base"], options


def parse_attack(spec) -> Attack:
    """An Attack from a paper name (``pgd10_linf_0.5``, options in brackets as
    ``Attack.name`` writes them: ``pgd10_linf_0.5[loss=cw]``) or a mapping ``{name: ...,
    eps: 1.0, random_start: true, restarts: 2, rel_step: 2.5, targeted: true, loss: cw,
    max_images: 64, precision: fp32}`` (``eps`` there overrides the name's). AutoAttack
    takes only ``eps``, ``max_images`` and ``version`` (``VERSIONS``): each version fixes
    everything else, its losses included; the strong evaluation those three and
    ``precision`` (of its PGD members). ``precision`` is not part of the name: it changes the
    arithmetic, not the attack."""
    options = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name", None)
    if not isinstance(spec, str):
        raise AttackError(f"an attack is a name like 'pgd10_linf_0.5', got {spec!r}")
    spec, named = _bracket(spec)
    options = {**named, **options}
    m = _NAME.match(spec.strip())
    if not m:
        if re.match(r"^\w+_(linf|l2)_-", spec):
            raise AttackError(f"attack {spec!r}: eps must not be negative")
        raise AttackError(
            f"unknown attack {spec!r} (expected pgd<steps>_<linf|l2>_<eps>, "
            f"fgsm_<linf|l2>_<eps>, autoattack_<linf|l2>_<eps> or strong_<linf|l2>_<eps>, e.g. pgd10_linf_0.5)"
        )
    if m["aa"] or m["strong"]:
        kind = "autoattack" if m["aa"] else "strong"
        base = Attack(kind, m["norm"], float(m["eps"]), steps=0, random_start=False, rel_step=1.0)
    elif m["fgsm"]:
        base = Attack("fgsm", m["norm"], float(m["eps"]), steps=1, random_start=False, rel_step=1.0)
    else:
        steps = int(m["steps"])
        if steps < 1:
            raise AttackError(f"attack {spec!r}: PGD needs at least one step")
        base = Attack("pgd", m["norm"], float(m["eps"]), steps=steps)
    number, integer, flag = ((int, float), "a number"), (int, "an integer"), (bool, "true or false")
    allowed = {"eps": number, "max_images": integer}
    if m["aa"] or m["strong"]:
        allowed["version"] = (str, f"one of {', '.join(VERSIONS)}")
    if m["strong"]:
        allowed["precision"] = (str, "one of auto, fp32, bf16")
    elif not m["aa"]:
        allowed.update(
            restarts=integer,
            random_start=flag,
            rel_step=number,
            targeted=flag,
            precision=(str, "one of auto, fp32, bf16"),
            loss=(str, "one of ce, cw"),
        )
    for key, value in options.items():
        if key == "loss" and m["aa"]:
            raise AttackError(
                f"attack {spec!r}: AutoAttack's standard version fixes its own losses "
                f"(APGD-CE, APGD-T, FAB-T, Square); loss applies to pgd and fgsm"
            )
        if key not in allowed:
            raise AttackError(f"attack {spec!r}: unknown option {key!r} (allowed: {', '.join(allowed)})")
        types, words = allowed[key]
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            raise AttackError(f"attack {spec!r}: {key} must be {words}, got {value!r}")
    attack = replace(base, **options)
    _check_values(attack, spec)
    return attack


def _check_values(attack: Attack, spec) -> None:
    """An AttackError naming what is wrong with a parsed attack's numbers and words."""
    if attack.eps < 0:
        raise AttackError(f"attack {spec!r}: eps must not be negative, got {attack.eps}")
    if attack.eps != attack.eps or attack.eps == float("inf"):
        raise AttackError(f"attack {spec!r}: eps must be a finite number, got {attack.eps}")
    if attack.norm == "linf" and attack.eps > LINF_MAX:
        raise AttackError(
            f"attack {spec!r}: an L-inf eps is in 1/255 of the pixel range, at most {LINF_MAX:g} "
            f"(the whole range), got {attack.eps:g}"
        )
    if attack.restarts < 1 or not 0 < attack.rel_step < float("inf"):  # NaN fails it too
        raise AttackError(f"attack {spec!r}: restarts must be >= 1 and rel_step a finite number > 0")
    if attack.version not in VERSIONS:
        raise AttackError(f"attack {spec!r}: version must be one of {', '.join(VERSIONS)}, got {attack.version!r}")
    if attack.restarts > 1 and not attack.random_start:
        raise AttackError(f"attack {spec!r}: restarts without random_start: true repeat one run")
    if attack.loss not in LOSSES:
        raise AttackError(f"attack {spec!r}: loss must be one of {', '.join(LOSSES)}, got {attack.loss!r}")
    if attack.precision not in PRECISIONS:
        raise AttackError(
            f"attack {spec!r}: precision must be one of {', '.join(PRECISIONS)}, got {attack.precision!r}"
        )
    if attack.max_images is not None and attack.max_images < 1:
        raise AttackError(f"attack {spec!r}: max_images must be >= 1")


PRECISIONS = ("auto", "fp32", "bf16")


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: without them oneDNN emulates bf16, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_dtype(attack: Attack, device: torch.device, early_stop: bool) -> torch.dtype | None:
    """The autocast dtype of the ascent steps, None for plain fp32."""
    if attack.precision == "fp32" or (attack.precision == "auto" and not early_stop):
        return None
    if attack.precision == "bf16":
        return torch.bfloat16
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and _cpu_has_bf16_units()
    return torch.bfloat16 if fast else None


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# -- geometry of the two norm balls ----------------------------------------------------
def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    return grad / _flat_norm(grad).clamp_min(1e-12)


def _random_start(x: torch.Tensor, norm: str, eps: float, generator) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        return (2 * u - 1) * eps
    d = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
    radius = torch.rand(len(x), generator=generator, device="cpu").to(x.device)
    radius = radius.pow(1.0 / x[0].numel()).view(-1, *([1] * (x.dim() - 1)))
    return d / _flat_norm(d).clamp_min(1e-12) * eps * radius


# -- the engine ----------------------------------------------------------------------------
# An input gradient this small is noise (float32 denormals): the sign step of PGD/FGSM
# is then meaningless, the classic symptom of gradient masking.
VANISHING = 1e-30


@dataclass
class Outcome:
    x_adv: torch.Tensor  # the iterate that broke each sample, else the last one
    fooled: torch.Tensor  # bool per sample: misclassified (untargeted) or hit (targeted)
    grad_norm: torch.Tensor  # input-gradient norm at the first step (gradient-masking check)
    notes: list = field(default_factory=list)  # warnings of AutoAttack's own checks
    tally: dict = field(default_factory=dict)  # the strong evaluation's: member -> [attacked, broke]


def _success(logits, labels, targeted: bool):
    """Untargeted: the true label is lost. Targeted: the target label is hit."""
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    target: torch.Tensor | None = None,
    early_stop: bool = True,
    generator: torch.Generator | None = None,
) -> Outcome:
    """Runs ``attack`` on a batch. The model is put in eval mode for the attack and
    restored after. ``target`` (targeted attacks) is the class each sample is pushed to.
    Restarts serve evaluation only: with ``early_stop=False`` one run gives the last iterate."""
    if attack.targeted and target is None:
        raise AttackError(f"{attack.name}: a targeted attack needs target labels")
    was_training = model.training
    model.eval()
    try:
        if attack.kind in ("autoattack", "strong"):
            if not early_stop:
                raise AttackError(f"{attack.name}: {attack.kind} evaluates; it cannot train")
            run = _autoattack if attack.kind == "autoattack" else _worst_case
            return run(model, x.detach(), y, attack, generator)
        return _pgd(model, x.detach(), y, attack, target, early_stop, generator)
    finally:
        model.train(was_training)


class _Pool:
    """Samples under attack, each at its own step: ``ids`` (arrival order), ``x0`` (clean
    images), ``cur`` (iterates), ``lab`` (the labels the loss is taken against: targets
    when targeted), ``correct`` (fp32 verdict on the clean image), ``gn`` (input-gradient
    norm at the first step), ``step`` and ``restart`` counters; samples waiting for their
    fp32 verdict also carry ``nxt``, the iterate they go on from if it is not a break."""

    def __init__(self, **tensors):
        self.__dict__.update(tensors)

    def __len__(self):
        return len(self.ids)

    def take(self, keep: torch.Tensor) -> _Pool:
        return _Pool(**{k: v[keep] for k, v in vars(self).items()})

    def join(self, other: _Pool) -> _Pool:
        return _Pool(**{k: torch.cat([v, getattr(other, k)]) for k, v in vars(self).items()})


def _start(x0, attack, generator):
    """The first iterate: the clean image, or a random point of the ball (Madry)."""
    if attack.random_start and attack.eps_pixels > 0:
        return (x0 + _random_start(x0, attack.norm, attack.eps_pixels, generator)).clamp(0, 1)
    return x0.clone()


def ascend(x0: torch.Tensor, cur: torch.Tensor, grad: torch.Tensor, attack: Attack) -> torch.Tensor:
    """One step of the paper's update from iterate ``cur`` of clean images ``x0``: ``step``
    along the gradient's sign (L-inf) or direction (L2), descending for a targeted attack,
    then projected into the eps-ball around ``x0`` and into [0, 1]."""
    sign = -1.0 if attack.targeted else 1.0  # targeted: descend the loss of the target
    moved = cur + sign * attack.step_pixels * _ascent(grad, attack.norm)
    return (x0 + _project(moved - x0, attack.norm, attack.eps_pixels)).clamp(0, 1)


def margin_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Carlini & Wagner's margin per sample: the best other logit minus the label's
    (positive once the sample is misclassified; targeted, ``labels`` are the targets)."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def attack_loss(attack: Attack):
    """The per-sample loss the attack ascends (``loss``: ``ce`` or ``cw``)."""
    if attack.loss == "cw":
        return margin_loss
    return lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Attack,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    loss=None,
) -> torch.Tensor:
    """The paper's PGD (FGSM: one step) on a fixed batch: ``attack.steps`` ascent steps of
    ``attack``'s loss from its start (the clean image, or a random point of the ball), each
    taken by ``ascend``; returns the last iterate, detached, with no early exit: what
    adversarial training trains on. ``loss(logits, labels)`` (per sample) replaces the
    attack's own, for objectives that ascend something else (TRADES' KL). Gradients are
    taken with respect to the input only; the model's mode is the caller's."""
    lab = target if attack.targeted else y
    loss_fn = loss or attack_loss(attack)
    x0 = x.detach()
    cur = _start(x0, attack, generator)
    for _ in range(attack.steps):
        cur = cur.detach().requires_grad_(True)
        with torch.enable_grad():
            total = loss_fn(model(cur).float(), lab).sum()
        (grad,) = torch.autograd.grad(total, cur)
        with torch.no_grad():
            cur = ascend(x0, cur.detach(), grad, attack)
    return cur.detach()


class _Stream:
    """PGD/FGSM (``ascend``, as ``pgd`` takes it) over a stream of chunks
    ``(x, y, target|None)``. Yields ``(pool, fooled)`` of the samples that finish, as they
    finish: ``pool.cur`` is the iterate that broke a sample, else its last one.

    The samples of the stream flow through one pool of the first chunk's size: broken
    samples leave (early stop) and new ones take their place, so every pass runs on a
    full batch however many samples break -- on CPU a quarter of a batch costs over half
    of a whole one, so shrinking batches would waste most of the early exit.

    With ``early_stop`` the clean image counts as an iterate, classified in fp32 on
    arrival: a sample the model already gets wrong (targeted: already in the target
    class) never enters. Without it (adversarial training) every sample takes exactly
    ``steps`` steps and ``fooled`` is the verdict on its last iterate.

    bf16 evaluation: a sample whose bf16 logits say it broke leaves the pool with that
    iterate and with the next one (its gradient came with the same pass) and waits for an
    fp32 pass, and so does every last iterate, as soon as its step makes it. The waiting
    samples are judged together once they fill a quarter of the pool, or at once when the
    stream runs dry. A break ends there; any other goes back to the queue and carries on
    from its next iterate, so the wait costs no step. So every final verdict is fp32, and
    a last iterate costs an fp32 forward pass instead of a bf16 forward and backward one.
    (Not an fp32 pass per bf16 pass on the few samples near the boundary: a pass pays a
    fixed price, the weights' reorder, whatever its batch.) bf16 logits are off by a
    little, so a middle iterate that fp32 would call a break may pass unseen; the last
    iterates are judged in fp32, and proposing near-breaks as well found
    no more breaks (docs/benchmarks.md, "Where the gain comes from")."""

    def __init__(self, model, chunks, attack: Attack, early_stop: bool, generator):
        self.model, self.attack, self.early_stop, self.generator = model, attack, early_stop, generator
        self.loss = attack_loss(attack)
        self.source, self.arrived = iter(chunks), 0
        self.pool = self.pending = self.held = self.cap = self.device = self.dtype = None
        self.nchw = self.defer = self.judged = False

    def __iter__(self):
        steps = self.attack.steps
        while True:
            yield from self._refill()
            dry = self.pool is None or len(self.pool) < self.cap  # nothing left to wait for
            idle = self.pool is None or len(self.pool) == 0
            # a last iterate can wait for company; a sample that may go on waits while the
            # stream has others to fill its place, and not once it runs dry
            held = self.held
            if held is not None and (
                idle or not self.judged and (4 * len(held) >= self.cap or dry and bool((held.step < steps).any()))
            ):
                self.judged = True  # at most one fp32 pass of the waiting between two passes
                yield from self._judge()
                continue
            if idle:
                return
            self.judged = False
            yield from self._pass()

    # -- the phases ----------------------------------------------------------------------
    def _refill(self):
        """Fills the pool to its size: the pending samples first, then new chunks."""
        while self.pool is None or len(self.pool) < self.cap:
            if self.pending is not None and len(self.pending):
                room = self.cap - (len(self.pool) if self.pool is not None else 0)
                head = torch.arange(len(self.pending), device=self.device) < room
                taken = self.pending.take(head)
                self.pool = taken if self.pool is None else self.pool.join(taken)
                self.pending = self.pending.take(~head)
                continue
            chunk = next(self.source, None)
            if chunk is None:
                return
            yield from self._arrive(*chunk)

    def _arrive(self, x, y, target):
        """A new chunk: classified clean in fp32 (with early stop), the rest pending from
        their start."""
        a = self.attack
        x = x.detach()
        if self.device is None:
            self.device, self.cap = x.device, len(x)
            self.dtype = step_dtype(a, self.device, self.early_stop)
            self.nchw = self.dtype is not None and self.device.type == "cpu"  # oneDNN's bf16 convs on CPU prefer NCHW
            self.defer = self.early_stop and self.dtype is not None
        if self.nchw:
            x = x.contiguous()
        lab = target if a.targeted else y
        n = len(x)
        correct = torch.zeros(n, dtype=torch.bool, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        if self.early_stop:
            with torch.no_grad():
                pred = self.model(x).argmax(1)
            correct = pred == y
            done = pred == lab if a.targeted else ~correct
        zeros = torch.zeros(n, dtype=torch.long, device=self.device)
        new = _Pool(
            ids=torch.arange(self.arrived, self.arrived + n, device=self.device),
            x0=x,
            cur=x,
            lab=lab,
            correct=correct,
            gn=torch.full((n,), float("nan"), device=self.device),
            step=zeros,
            restart=zeros,
        )
        self.arrived += n
        if done.any():
            yield new.take(done), done[done]
        self.pending = new.take(~done)
        self.pending.cur = _start(self.pending.x0, a, self.generator)

    def _judge(self):
        """The waiting samples' fp32 pass: breaks end, last iterates end, the rest go on
        from their next iterate (a restart from a fresh start where a run is over)."""
        held, a = self.held, self.attack
        with torch.no_grad():
            ok = _success(self.model(held.cur), held.lab, a.targeted)
        if ok.any():
            yield held.take(ok), ok[ok]
        rest = held.take(~ok)
        self.held = None
        fin = (rest.step >= a.steps) & (rest.restart >= a.restarts - 1)
        if fin.any():
            yield rest.take(fin), ok[:0].new_zeros(int(fin.sum()))
        rest = rest.take(~fin)
        if not len(rest):
            return
        over = rest.step >= a.steps  # a restart from a fresh random start
        rest.cur = rest.nxt
        if over.any():
            rest.cur = rest.cur.clone()
            rest.cur[over] = _start(rest.x0[over], a, self.generator)
        rest.step = torch.where(over, torch.zeros_like(rest.step), rest.step + 1)
        rest.restart = rest.restart + over.long()
        final = rest.step >= a.steps  # its next iterate is its last: it waits for fp32 again
        if final.any():
            self.held = rest.take(final)
        rest = rest.take(~final)
        del rest.nxt
        if len(rest):
            self.pending = rest if self.pending is None or not len(self.pending) else rest.join(self.pending)

    def _verdicts(self, logits, cur, last):
        """(broken, parked) per sample of the pool from this pass's logits: fp32 decides at
        once; bf16 proposes and fp32 confirms, or, deferred, parks the sample to wait."""
        pool, targeted = self.pool, self.attack.targeted
        none = torch.zeros_like(last)
        if self.dtype is None:
            return _success(logits, pool.lab, targeted), none
        if self.defer:  # broken in bf16: fp32 decides later (see above)
            return none, _success(logits.detach(), pool.lab, targeted)
        ok = _success(logits.detach(), pool.lab, targeted)
        if ok.any():
            idx = ok.nonzero().flatten()
            with torch.no_grad():
                ok[idx] = _success(self.model(cur.detach()[idx]), pool.lab[idx], targeted)
        return ok, none

    def _pass(self):
        """One pass: classify every iterate of the pool, step the unfinished ones."""
        pool, a = self.pool, self.attack
        last = pool.step >= a.steps
        need_grad = bool((~last).any())
        grad = None
        with torch.enable_grad() if need_grad else torch.no_grad():
            cur = pool.cur.requires_grad_(need_grad)
            with _autocast(self.device, self.dtype):
                logits = self.model(cur)
            logits = logits.float()
            ok, park = self._verdicts(logits, cur, last)
            leave = (last | ok) & ~park if self.early_stop else last
            again = leave & ~ok & (pool.restart < a.restarts - 1) if self.early_stop else last & False
            leave = leave & ~again  # a restart: a fresh random start, no step this pass
            move = ~leave & ~again & ~park
            stepping = (move | park) & ~last  # the waiting ones take their next iterate along
            if need_grad:
                loss = self.loss(logits, pool.lab) * stepping  # the rest pull on nothing
                (grad,) = torch.autograd.grad(loss.sum(), cur)
        if leave.any():
            out = pool.take(leave)
            out.cur = out.cur.detach()
            yield out, ok[leave]
        with torch.no_grad():
            self._advance(grad, leave, move, park, again, stepping)

    def _advance(self, grad, leave, move, park, again, stepping):
        """The pool after a pass: next iterates, restarts, and the samples that now wait."""
        pool, a = self.pool, self.attack
        pool.cur = pool.cur.detach()
        nxt, step, restart, gn = pool.cur, pool.step + move.long(), pool.restart, pool.gn
        if grad is not None and stepping.any():
            first = stepping & (pool.step == 0) & (pool.restart == 0)
            gn = torch.where(first, _flat_norm(grad).flatten(), gn)
            nxt = nxt.clone()
            nxt[stepping] = ascend(pool.x0[stepping], nxt[stepping], grad[stepping], a)
        if again.any():
            nxt = nxt.clone()
            nxt[again] = _start(pool.x0[again], a, self.generator)
            step = torch.where(again, torch.zeros_like(step), step)
            restart = restart + again.long()
        pool.gn = gn
        final = move & (step >= a.steps) if self.defer else torch.zeros_like(move)  # judged in fp32 only
        wait = park | final
        if wait.any():  # cur: the iterate to judge; nxt: where it goes on from
            waiting = pool.take(wait)
            ahead = final[wait].view(-1, *([1] * (nxt.dim() - 1)))
            waiting.cur = torch.where(ahead, nxt[wait], waiting.cur)
            waiting.nxt, waiting.step = nxt[wait], step[wait]
            self.held = waiting if self.held is None else self.held.join(waiting)
        pool.cur, pool.step, pool.restart = nxt, step, restart
        self.pool = pool.take(~leave & ~wait)


def _pgd(model, x, y, attack, target, early_stop, generator) -> Outcome:
    """One batch: through the stream with early stop, else the fixed-batch ``pgd``."""
    if not early_stop:
        x_adv = pgd(model, x, y, attack, target, generator)
        with torch.no_grad():
            fooled = _success(model(x_adv), target if attack.targeted else y, attack.targeted)
        return Outcome(x_adv, fooled, _input_grad_norm(model, x, y))
    x_adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    grad_norm = torch.full((len(x),), float("nan"), device=x.device)
    for out, ok in _Stream(model, [(x, y, target)], attack, True, generator):
        x_adv[out.ids], fooled[out.ids], grad_norm[out.ids] = out.cur.to(x_adv.dtype), ok, out.gn
    return Outcome(x_adv, fooled, grad_norm)


def _input_grad_norm(model, x, y) -> torch.Tensor:
    with torch.enable_grad():
        x = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return _flat_norm(grad).flatten()


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _autoattack(model, x, y, attack, generator) -> Outcome:
    """AutoAttack of the original package: the standard version (APGD-CE, APGD-T, FAB-T,
    Square; targeting every other class where a task has fewer than 10), or its APGD-CE and
    APGD-DLR alone (``version: apgd``, one restart each, as its ``rand`` version runs them).
    Its own checks (randomised or dynamic defences, zero gradients, Square beating the
    gradient attacks) come back as notes instead of log lines."""
    if attack.eps == 0:  # APGD divides by eps; at eps = 0 the only adversary is x itself
        with torch.no_grad():
            fooled = model(x).argmax(1) != y
        return Outcome(x.clone(), fooled, _input_grad_norm(model, x, y))
    from pyautoattack import AutoAttack

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator else 0
    apgd = attack.version == "apgd"
    aa = AutoAttack(
        model,
        norm={"linf": "Linf", "l2": "L2"}[attack.norm],
        eps=attack.eps_pixels,
        version="custom" if apgd else "standard",
        attacks=["apgd-ce", "apgd-dlr"] if apgd else None,
        device=x.device,
        seed=seed,
    )
    if apgd:
        aa.apgd.n_restarts = 1
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    if classes <= aa.apgd_targeted.n_target_classes:  # the standard version targets 9 classes: fewer exist here
        aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = classes - 1
    collect, logger = _Collect(), aa.logger
    saved = logger.level, logger.propagate
    logger.addHandler(collect)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        # contiguous: AutoAttack's checks .view() the gradient, which a channels_last
        # input (FFCV's layout) would make fail
        x_adv, y_adv = aa.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
    finally:
        logger.removeHandler(collect)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    notes = [r.getMessage() for r in collect.records if r.levelno >= logging.WARNING]
    return Outcome(x_adv.detach(), y_adv != y, _input_grad_norm(model, x, y), notes)


def members(attack: Attack) -> list[Attack]:
    """The strong evaluation's attacks at its norm and eps, cheapest first: the paper's
    PGD-10, PGD-50 from a random start with 5 restarts (step 2.5 eps / 50, Madry et
    al.'s, so a run can cross the ball), and AutoAttack in the evaluation's version."""
    kw = dict(norm=attack.norm, eps=attack.eps)
    return [
        Attack("pgd", steps=10, precision=attack.precision, **kw),
        Attack("pgd", steps=50, restarts=5, random_start=True, rel_step=2.5, precision=attack.precision, **kw),
        Attack("autoattack", steps=0, rel_step=1.0, version=attack.version, **kw),
    ]


def title(attack: Attack) -> str:
    """A reader's name of an attack, for captions and claim lines: ``PGD-50 × 5 restarts``,
    ``AutoAttack's APGD-CE and APGD-DLR``; the strong evaluation lists its members."""
    if attack.kind == "strong":
        return "worst case of " + ", ".join(title(m) for m in members(attack))
    if attack.kind == "autoattack":
        return "AutoAttack's APGD-CE and APGD-DLR" if attack.version == "apgd" else "the standard AutoAttack"
    head = "FGSM" if attack.kind == "fgsm" else f"PGD-{attack.steps}"
    return head + (f" × {attack.restarts} restarts" if attack.restarts > 1 else "")


def _worst_case(model, x, y, attack, generator) -> Outcome:
    """The strong evaluation of one batch: each member attacks only the samples that every
    member before it left correct and unbroken; a sample is broken by the first that
    breaks it. ``tally``: member -> [samples attacked, samples it broke]."""
    with torch.no_grad():
        alive = model(x).argmax(1) == y
    x_adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    grad_norm = torch.full((len(x),), float("nan"), device=x.device)
    notes, tally = [], {}
    for i, member in enumerate(members(attack)):
        idx = alive.nonzero().flatten()
        tally[member.name] = [len(idx), 0]
        if not len(idx):
            continue
        out = perturb(model, x[idx], y[idx], member, generator=generator)
        if i == 0:
            grad_norm[idx] = out.grad_norm.to(grad_norm.dtype)
        hit = idx[out.fooled]
        x_adv[hit], fooled[hit], alive[hit] = out.x_adv[out.fooled].to(x_adv.dtype), True, False
        tally[member.name][1] = len(hit)
        notes += [m for m in out.notes if m not in notes]
    return Outcome(x_adv, fooled, grad_norm, notes, tally)


def _capped(batches, cap: int | None):
    """The first ``cap`` images of ``batches`` (all without a cap), as stream chunks."""
    seen = 0
    for x, y in batches:
        if cap is not None:
            if seen >= cap:
                return
            x, y = x[: cap - seen], y[: cap - seen]
        seen += len(x)
        yield x, y, None


def _batchwise(model, chunks, attack: Attack, generator, account) -> tuple[list, dict]:
    """AutoAttack and the strong evaluation, batch by batch as the package works: each
    batch's outcome to ``account``; their notes, and the strong evaluation's tally."""
    notes, tally, first = [], {}, 0
    for x, y, _ in chunks:
        with torch.no_grad():
            ok = model(x).argmax(1) == y
        out = perturb(model, x, y, attack, generator=generator)
        notes += [m for m in out.notes if m not in notes]
        for name, counts in out.tally.items():
            tally[name] = [a + b for a, b in zip(tally.get(name, [0, 0]), counts)]
        account(torch.arange(first, first + len(x)), x, out.x_adv, ok, out.fooled, out.grad_norm)
        first += len(x)
    return notes, tally


def robust_accuracy(model: nn.Module, batches, attack: Attack, max_images: int | None = None, seed: int = 0) -> dict:
    """AOI, AAI and DR (percent) of ``model`` under ``attack`` on the same images, plus what
    the sanity checks need: per-sample clean and robust correctness, the largest
    perturbation norm, whether every adversarial image stays in [0, 1], the count of
    vanished input gradients and AutoAttack's own warnings. The cap is the smaller of
    ``max_images`` and the attack's own. ``model`` is attacked as it is: evaluations
    pass the inference copy (``study.fastcopy``)."""
    caps = [c for c in (max_images, attack.max_images) if c is not None]
    cap = min(caps) if caps else None
    generator = torch.Generator().manual_seed(seed)
    correct, robust = {}, {}  # by arrival id
    notes, vanished, max_delta, in_range, tally = [], 0, 0.0, True, {}
    start = time.perf_counter()

    def account(ids, x0, x_adv, ok, fooled, grad_norm):
        nonlocal vanished, max_delta, in_range
        delta = (x_adv - x0).flatten(1)
        norms = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
        max_delta = max(max_delta, float(norms.max()) if len(ids) else 0.0)
        in_range &= bool(((x_adv >= 0) & (x_adv <= 1)).all())
        unbroken = ok & ~fooled  # the clean image counts as an iterate: AAI <= AOI
        if attack.eps > 0:
            g = grad_norm[unbroken]
            vanished += int(((g <= VANISHING) | ~torch.isfinite(g)).sum())
        for i, c, r in zip(ids.tolist(), ok.tolist(), unbroken.tolist()):
            correct[i], robust[i] = c, r

    was = model.training
    model.eval()
    try:
        if attack.kind in ("autoattack", "strong"):
            notes, tally = _batchwise(model, _capped(batches, cap), attack, generator, account)
        else:
            for out, fooled in _Stream(model, _capped(batches, cap), attack, True, generator):
                account(out.ids, out.x0, out.cur, out.correct, fooled, out.gn)
    finally:
        model.train(was)
    n = len(correct)
    correct = torch.tensor([correct[i] for i in range(n)], dtype=torch.bool)
    robust = torch.tensor([robust[i] for i in range(n)], dtype=torch.bool)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = None if attack.kind == "autoattack" else step_dtype(attack, device, early_stop=True)
    extra = {"members": [{"attack": k, "attacked": a, "broke": b} for k, (a, b) in tally.items()]} if tally else {}
    return evaluation_record(
        attack.name,
        correct,
        robust,
        start,
        max_delta=max_delta,
        eps_pixels=attack.eps_pixels,
        in_range=in_range,
        vanishing_gradients=vanished,
        notes=notes,
        precision="fp32" if dtype is None else "bf16",
        **extra,
    )


def evaluation_record(name: str, correct: torch.Tensor, robust: torch.Tensor, start: float, **fields) -> dict:
    """One evaluation's record (an attack's, or a corruption's: study.corruptions): AOI,
    AAI and DR in percent from the per-image masks, the masks, the seconds since
    ``start``, and ``fields`` (max_delta, eps_pixels, in_range, vanishing_gradients,
    notes, precision, and any extra)."""
    n = len(correct)
    aoi = 100.0 * float(correct.sum()) / max(n, 1)
    aai = 100.0 * float(robust.sum()) / max(n, 1)
    head = {
        "attack": name,
        "images": n,
        "AOI": aoi,
        "AAI": aai,
        "DR": 100.0 * (aoi - aai) / aoi if aoi > 0 else float("nan"),
    }
    members = fields.pop("members", None)  # last, where records have always kept it
    record = {**head, **fields, "seconds": time.perf_counter() - start, "correct": correct, "robust": robust}
    if members is not None:
        record["members"] = members
    return record


# -- feature-space steepness (the paper's Eq. 4) ---------------------------------------
def steepest_neighbour(
    f: nn.Module,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 2.5,
    generator: torch.Generator | None = None,
    distance: str = "l1",
    start_std: float | None = None,
) -> torch.Tensor:
    """The inner maximisation of the paper's Eq. 4 by PGD: for each x, a point x' of the
    L-inf ball of radius ``eps`` (pixels) that maximises ||f(x) - f(x')||_1 / ||x - x'||_inf.

    It starts at a random point of the ball (x itself has ratio 0/0) and takes signed
    ascent steps of ``rel_step * eps / steps`` on the numerator ||f(x) - f(x')||_1, each
    projected back into the ball and [0, 1]: sign steps end on the ball's surface, where
    the denominator is eps, and the denominator's own gradient touches only its largest
    coordinate, which it would make oscillate. f runs in eval mode and only the input gets
    a gradient, as in every attack of this engine. Returns x' detached.

    The authors' released DM (``distance="mse"``, ``start_std``): the steps ascend the mean
    squared feature distance instead, from x plus Gaussian noise of std ``start_std``."""
    if eps <= 0:
        raise AttackError(f"local Lipschitz: eps must be positive, got {eps}")
    if distance not in ("l1", "mse"):
        raise AttackError(f"feature distance must be l1 or mse, got {distance!r}")
    was = f.training
    f.eval()
    try:
        x = x.detach()
        with torch.no_grad():
            fx = f(x).flatten(1)
        if start_std is None:
            cur = (x + _random_start(x, "linf", eps, generator)).clamp(0, 1)
        else:
            cur = x + start_std * torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        alpha = rel_step * eps / max(steps, 1)
        for _ in range(steps):
            cur.requires_grad_(True)
            with torch.enable_grad():  # the search needs input gradients even when measuring
                gap = fx - f(cur).flatten(1)
                spread = gap.abs().sum() if distance == "l1" else gap.pow(2).mean()
                (grad,) = torch.autograd.grad(spread, cur)
            with torch.no_grad():
                cur = (x + _project(cur + alpha * grad.sign() - x, "linf", eps)).clamp(0, 1)
        return cur.detach()
    finally:
        f.train(was)


def steepness(fx: torch.Tensor, fx_adv: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """Per sample ||f(x) - f(x')||_1 / ||x - x'||_inf (Eq. 4's ratio)."""
    dist = (x - x_adv).flatten(1).abs().amax(1).clamp_min(1e-12)
    return (fx - fx_adv).abs().sum(1) / dist


def local_lipschitz(
    f: nn.Module,
    x: torch.Tensor,
    eps: float,
    steps: int = 10,
    rel_step: float = 2.5,
    generator: torch.Generator | None = None,
    x_adv: torch.Tensor | None = None,
) -> torch.Tensor:
    """LL(f(X)) of the paper's Eq. 4 on the batch ``x``: the mean over samples of the
    steepest ratio found by ``steepest_neighbour`` (pass ``x_adv`` to reuse one). The
    value keeps f's graph, so the DM objective can minimise it; under ``torch.no_grad()``
    it only measures (the search still takes its input gradients)."""
    if x_adv is None:
        x_adv = steepest_neighbour(f, x, eps, steps, rel_step, generator)
    both = f(torch.cat([x, x_adv])).flatten(1)  # one pass: BatchNorm sees both halves together
    fx, fx_adv = both[: len(x)], both[len(x) :]
    return steepness(fx, fx_adv, x, x_adv).mean()
