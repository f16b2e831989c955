"""AutoAttack (the original package) and the strong evaluation's worst case over its
members, each on what the ones before it left."""

from __future__ import annotations

import functools
import logging

import torch

from study.attacks.engine import Outcome, _input_grad_norm, _pgd


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


def _worst_case(model, x, y, attack, generator) -> Outcome:
    """The strong evaluation of one batch: each member attacks only the samples that every
    member before it left correct and unbroken; a sample is broken by the first that
    breaks it. ``tally``: member -> [samples attacked, samples it broke]."""
    with torch.no_grad():
        alive = model(x).argmax(1) == y
    x_adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    grad_norm = torch.full((len(x),), float("nan"), device=x.device)
    notes, tally = [], {}
    for i, member in enumerate(attack.members()):
        idx = alive.nonzero().flatten()
        tally[member.name] = [len(idx), 0]
        if not len(idx):
            continue
        run = _autoattack if member.kind == "autoattack" else functools.partial(_pgd, target=None, early_stop=True)
        out = run(model, x[idx], y[idx], member, generator=generator)
        if i == 0:
            grad_norm[idx] = out.grad_norm.to(grad_norm.dtype)
        hit = idx[out.fooled]
        x_adv[hit], fooled[hit], alive[hit] = out.x_adv[out.fooled].to(x_adv.dtype), True, False
        tally[member.name][1] = len(hit)
        notes += [m for m in out.notes if m not in notes]
    return Outcome(x_adv, fooled, grad_norm, notes, tally)
