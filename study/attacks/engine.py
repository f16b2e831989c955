"""The PGD engine: one ascent step, the fixed-batch PGD that training calls, and the
streaming evaluator (``_Stream``) that refills a batch as samples break; precision of
the ascent steps."""

from __future__ import annotations

import contextlib
import functools
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from study.items import Item


@functools.cache
def _cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: without them oneDNN emulates bf16, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_dtype(attack: Item, device: torch.device, early_stop: bool) -> torch.dtype | None:
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


def ascend(x0: torch.Tensor, cur: torch.Tensor, grad: torch.Tensor, attack: Item) -> torch.Tensor:
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


def attack_loss(attack: Item):
    """The per-sample loss the attack ascends (``loss``: ``ce`` or ``cw``)."""
    if attack.loss == "cw":
        return margin_loss
    return lambda logits, labels: F.cross_entropy(logits, labels, reduction="none")


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Item,
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

    def __init__(self, model, chunks, attack: Item, early_stop: bool, generator):
        self.model, self.attack, self.early_stop, self.generator = model, attack, early_stop, generator
        self.loss = attack_loss(attack)
        source = iter(chunks)
        first = next(source, None)  # the pool's size, device and step precision are the first chunk's
        self.source, self.arrived = itertools.chain([first] if first is not None else [], source), 0
        self.device = first[0].device if first is not None else torch.device("cpu")
        self.cap = len(first[0]) if first is not None else 0
        self.dtype = step_dtype(attack, self.device, early_stop) if first is not None else None
        self.nchw = self.dtype is not None and self.device.type == "cpu"  # oneDNN's bf16 convs on CPU prefer NCHW
        self.defer = early_stop and self.dtype is not None  # bf16 verdicts wait for an fp32 pass
        self.pool = self.pending = self.held = None  # in the pool, waiting to enter it, waiting for fp32
        self.judged = False  # the waiting had their fp32 pass since the last pass of the pool

    def __iter__(self):
        while True:
            yield from self._refill()
            dry = self.pool is None or len(self.pool) < self.cap  # nothing left to wait for
            idle = self.pool is None or len(self.pool) == 0
            if self._judge_now(dry, idle):
                self.judged = True  # at most one fp32 pass of the waiting between two passes
                yield from self._judge()
                continue
            if idle:
                return
            self.judged = False
            yield from self._pass()

    def _judge_now(self, dry: bool, idle: bool) -> bool:
        """Whether the samples waiting for an fp32 verdict get it now: when the pool is
        empty; else at most once between two passes, once they fill a quarter of the pool
        (a last iterate can wait for company), or once the stream runs dry while one of
        them may still go on (it waits only while others can take its place)."""
        held = self.held
        if held is None:
            return False
        if idle:
            return True
        may_go_on = bool((held.step < self.attack.steps).any())
        return not self.judged and (4 * len(held) >= self.cap or dry and may_go_on)

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
