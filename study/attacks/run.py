"""Running an attack: ``perturb`` (one batch, any kind) and ``robust_accuracy`` (a
model's AOI, AAI and DR under an attack, with what the sanity checks need), and the
evaluation record both write."""

from __future__ import annotations

import time

import torch
from torch import nn

from study.attacks.engine import VANISHING, Outcome, _pgd, _Stream, step_dtype
from study.attacks.strong import _autoattack, _worst_case
from study.items import AttackError, Item


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: Item,
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


def _batchwise(model, chunks, attack: Item, generator, account) -> tuple[list, dict]:
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


def robust_accuracy(model: nn.Module, batches, attack: Item, max_images: int | None = None, seed: int = 0) -> dict:
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


def changed_record(name: str, model: nn.Module, batches, cap, change, clean_too: bool, eps_pixels: float, **extra):
    """The evaluation record of an item that changes the images without searching (a
    corruption, crafted perturbations): ``clean_and_changed``'s masks, no gradient taken."""
    correct, robust, largest, start = clean_and_changed(model, batches, cap, change, clean_too)
    return evaluation_record(
        name,
        correct,
        robust,
        start,
        max_delta=largest,
        eps_pixels=eps_pixels,
        in_range=True,
        vanishing_gradients=0,
        notes=[],
        precision="fp32",
        **extra,
    )


def clean_and_changed(model: nn.Module, batches, cap: int | None, change, clean_too: bool):
    """The model's answers on the first ``cap`` images of ``batches`` as they are and as
    ``change(x, first index)`` makes them (a corruption, a crafted perturbation): per-image
    masks ``correct`` and ``robust`` (right on the changed image; with ``clean_too``, right on
    both), the largest change of a pixel, and the start time."""
    start = time.perf_counter()
    correct, robust, seen, largest = [], [], 0, 0.0
    was = model.training
    model.eval()
    try:
        for x, y in batches:
            if cap is not None:
                if seen >= cap:
                    break
                x, y = x[: cap - seen], y[: cap - seen]
            changed = change(x, seen)
            with torch.no_grad():
                right = (model(x).argmax(1) == y).cpu()
                still = (model(changed).argmax(1) == y).cpu()
            correct.append(right)
            robust.append(right & still if clean_too else still)
            largest = max(largest, float((changed - x).abs().amax()) if len(x) else 0.0)
            seen += len(x)
    finally:
        model.train(was)
    empty = torch.zeros(0, dtype=torch.bool)
    return (torch.cat(correct) if correct else empty), (torch.cat(robust) if robust else empty), largest, start


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
