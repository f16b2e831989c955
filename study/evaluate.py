"""Robustness evaluation: one model x the job's attack suite -> AOI, AAI and DR per attack,
and the sanity flags that say whether those numbers can be trusted.

Every attack sees the same test images in the same order (the first ``max_images`` of
the test split, or fewer where an attack has its own cap), so any two results can be
compared sample by sample on their common images. The flags, in the spirit of
AutoAttack's own checks:

``in_ball``               every adversarial image lies in its eps-ball (up to float error)
``in_range``              ... and in [0, 1]
``aai_le_aoi``            AAI <= AOI (the clean image is one of the iterates)
``eps0_aai_eq_aoi``       the first PGD/FGSM attack of the suite at eps = 0 gives AAI = AOI
                          (on the first EPS0_IMAGES images: nothing breaks at eps 0, so
                          every image takes every step)
``monotone_eps``          for one attack family, AAI does not rise with eps
``pgd_le_fgsm``           PGD's AAI is not above FGSM's at the same eps and norm
``autoattack_le_pgd``     AutoAttack's AAI is not above PGD's at the same eps and norm
``no_vanishing_gradients`` no unbroken sample had a zero/denormal input gradient
                          (possible gradient masking)
``autoattack_checks``     AutoAttack raised none of its own warnings
``pgd_near_worst``        the strong evaluation's stronger members (PGD-50 with restarts,
                          AutoAttack) broke no more of the images the paper's PGD-10 left
                          robust than WORST_GAP points, judged over the images: fails when
                          the gap's Wilson interval lies wholly above it, i.e. the paper's
                          attack misses beyond doubt what stronger ones find (gradient
                          masking, or a step too short to cross the ball)

Corruption items (``study.corruptions``) run through the same evaluation and records
but take no flag: they have no eps-ball and no search whose strength could be checked.

A failed flag is a finding to show, not an error: with the paper's PGD step (1.25 eps /
steps) ``pgd_le_fgsm`` can fail on near-linear models, and that is worth seeing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

import torch

from study.fastcopy import inference_copy
from study.files import config_hash
from study.items import Item
from study.models import StudyModel

EPS0_IMAGES = 32  # the eps = 0 check needs few images: it must reproduce AOI exactly
# AAI points between the paper's PGD-10 and the worst case that an unmasked model shows at
# most: AutoAttack's gain over PGD is about a point or less there (Croce & Hein 2020,
# Table 2: 0.0-1.6 points for undefended and adversarially trained models, tens of points
# on the masked defenses they broke); 2 rounds that up. The flag fails when the gap's 95 %
# interval over the images lies wholly above it: beyond doubt more than an unmasked
# model's gap
WORST_GAP = 2.0


@dataclass(frozen=True)
class Flag:
    name: str
    attack: str  # the attack (or "a vs b") it concerns; "" for the model as a whole
    passed: bool
    detail: str = ""


def mask_bits(t: torch.Tensor) -> str:
    """Per-image booleans as the 0/1 string results keep (study.stats.mask reads it back)."""
    return "".join("1" if v else "0" for v in t.tolist())


def spec_of(item: Item) -> dict:
    """An item's settings as records keep them (a transfer item's file path is where its
    perturbations lie, not what they are: its ``source`` says that)."""
    spec = asdict(item)
    spec.pop("path", None)
    return spec


def attack_key(attack: Item, cap: int | None, seed: int) -> str:
    spec = spec_of(attack)
    if spec.get("loss") == "ce":  # the default: keys from before the loss option stay valid
        del spec["loss"]
    return config_hash({"attack": spec, "cap": cap, "seed": seed})


def eps0_probe(attacks: list[Item]) -> Item | None:
    """The eps = 0 twin of the suite's first gradient attack (AutoAttack at eps 0 is x)."""
    for a in attacks:
        if a.kind in ("pgd", "fgsm"):
            return replace(a, eps=0.0, max_images=None)
    return None


def plan(attacks: list[Item], max_images: int | None, seed: int) -> list[tuple]:
    """(attack, image cap, is the eps = 0 probe, cache key) for every run of the suite."""
    runs = [(a, max_images, False) for a in attacks]
    probe = eps0_probe(attacks)
    if probe is not None:
        runs.append((probe, EPS0_IMAGES if max_images is None else min(EPS0_IMAGES, max_images), True))
    return [(a, cap, is_probe, attack_key(a, cap, seed)) for a, cap, is_probe in runs]


def missing(attacks: list[Item], max_images: int | None, seed: int, cache: dict) -> bool:
    return any(key not in cache for *_, key in plan(attacks, max_images, seed))


def evaluate(
    model,
    batches: Iterable,
    attacks: list[Item],
    max_images: int | None = None,
    seed: int = 0,
    cache: dict | None = None,
    on_result: Callable[[str, dict], None] | None = None,
    fast_copy: bool = True,
) -> list[dict]:
    """Runs every item of the suite (study.items.Item: attacks, the strong evaluation,
    corruptions; and the eps = 0 probe) not already in ``cache`` (attack key ->
    record) on the model's inference copy (``study.fastcopy``; ``fast_copy``: with its
    CPU conversions) and returns the records in suite order, the probe last.
    ``on_result(key, record)`` is called after each new one, so a caller can persist it
    at once."""
    cache = {} if cache is None else cache
    records = []
    frozen = None
    for attack, cap, is_probe, key in plan(attacks, max_images, seed):
        if key not in cache:
            if frozen is None:  # one copy for the whole suite
                frozen = inference_copy(model, fast_copy) if isinstance(model, StudyModel) else model
            res = attack.run(frozen, batches, max_images=cap, seed=seed)
            rec = {k: v for k, v in res.items() if k not in ("correct", "robust")}
            rec.update(
                correct=mask_bits(res["correct"]),
                robust=mask_bits(res["robust"]),
                spec=spec_of(attack),
                probe=is_probe,
                key=key,
            )
            cache[key] = rec
            if on_result is not None:
                on_result(key, rec)
        records.append(cache[key])
    return records


# -- the flags ------------------------------------------------------------------------
def _robust_on(rec: dict, n: int) -> float:
    """AAI (percent) on the first n images."""
    return 100.0 * rec["robust"][:n].count("1") / max(n, 1)


def _cmp(name: str, low: dict, high: dict) -> Flag:
    """Passes when ``low``'s AAI is not above ``high``'s on their common images."""
    n = min(low["images"], high["images"])
    a, b = _robust_on(low, n), _robust_on(high, n)
    return Flag(
        name,
        f"{low['attack']} vs {high['attack']}",
        a <= b,
        f"{low['attack']} {a:.2f} {'<=' if a <= b else '>'} {high['attack']} {b:.2f} on {n} images",
    )


def _near_worst(rec: dict) -> Flag:
    """How much of AAI the strong evaluation's stronger members took from the paper's PGD-10."""
    from study.stats import wilson

    first, *rest = rec["members"]
    beyond = sum(m["broke"] for m in rest)
    gap = 100.0 * beyond / max(rec["images"], 1)
    lo, hi = wilson(beyond, rec["images"]) if rec["images"] else (0.0, 0.0)
    return Flag(
        "pgd_near_worst",
        rec["attack"],
        lo <= WORST_GAP,
        f"{first['attack']} AAI {rec['AAI'] + gap:.2f}, worst case {rec['AAI']:.2f} on {rec['images']} images "
        f"(gap {gap:.2f} [{lo:.2f}, {hi:.2f}] points, bound {WORST_GAP:g}): "
        + ", ".join(f"{m['attack']} broke {m['broke']} of the {m['attacked']} left" for m in rest),
    )


def sanity_flags(records: list[dict]) -> list[Flag]:
    flags = []
    records = [r for r in records if r["spec"]["kind"] != "corruption"]  # no eps-ball, no search to check
    main = [r for r in records if not r.get("probe")]
    for r in main:
        spec = r["spec"]
        tol = r["eps_pixels"] * 1e-5 + 1e-6
        flags.append(
            Flag(
                "in_ball",
                r["attack"],
                r["max_delta"] <= r["eps_pixels"] + tol,
                f"largest perturbation {r['max_delta']:.3g} vs eps {r['eps_pixels']:.3g}",
            )
        )
        flags.append(Flag("in_range", r["attack"], bool(r["in_range"])))
        flags.append(Flag("aai_le_aoi", r["attack"], r["AAI"] <= r["AOI"], f"AAI {r['AAI']:.2f}, AOI {r['AOI']:.2f}"))
        flags.append(
            Flag(
                "no_vanishing_gradients",
                r["attack"],
                r["vanishing_gradients"] == 0,
                f"{r['vanishing_gradients']} unbroken samples with a vanished input gradient",
            )
        )
        if spec["kind"] in ("autoattack", "strong"):
            flags.append(Flag("autoattack_checks", r["attack"], not r["notes"], " | ".join(r["notes"])))
        if spec["kind"] == "strong" and r.get("members"):
            flags.append(_near_worst(r))
    for r in records:
        if r.get("probe"):
            flags.append(
                Flag(
                    "eps0_aai_eq_aoi",
                    r["attack"],
                    r["AAI"] == r["AOI"],
                    f"AAI {r['AAI']:.2f}, AOI {r['AOI']:.2f} on {r['images']} images",
                )
            )

    def family(spec):
        return tuple((k, v) for k, v in spec.items() if k not in ("eps", "max_images"))

    by_family: dict = {}
    for r in records:  # the eps = 0 probe joins its family as the lowest point
        by_family.setdefault(family(r["spec"]), []).append(r)
    for group in by_family.values():
        group = sorted(group, key=lambda r: r["spec"]["eps"])
        for small, large in zip(group, group[1:]):
            if large["spec"]["eps"] > small["spec"]["eps"]:
                flags.append(_cmp("monotone_eps", large, small))

    def same_ball(a, b):  # and the same loss: a CW attack is no rival of a CE one
        return all(a["spec"].get(k, "ce") == b["spec"].get(k, "ce") for k in ("norm", "eps", "loss"))

    untargeted = [r for r in main if not r["spec"]["targeted"]]
    for p in (r for r in untargeted if r["spec"]["kind"] == "pgd"):
        for f in (r for r in untargeted if r["spec"]["kind"] == "fgsm" and same_ball(p, r)):
            flags.append(_cmp("pgd_le_fgsm", p, f))
        for aa in (r for r in untargeted if r["spec"]["kind"] == "autoattack" and same_ball(p, r)):
            flags.append(_cmp("autoattack_le_pgd", aa, p))
    return flags


def failed(flags: list[Flag], attack: str | None = None) -> list[Flag]:
    """The failed flags, optionally only those that concern ``attack``."""
    out = [f for f in flags if not f.passed]
    if attack is not None:
        out = [f for f in out if attack in f.attack.split(" vs ")]
    return out
