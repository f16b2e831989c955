"""Training objectives: what the one training engine minimises.

An objective is ``objective(model, images, labels) -> (loss, logits)``. Pre-training,
fine-tuning and every defense pick one by name in the job file:

* ``standard`` -- cross-entropy on clean images.
* ``pgd<k>_<linf|l2>_<eps>`` -- Madry et al.'s PGD-k adversarial training: every batch
  is replaced by its PGD-k adversarial version (random start, step 2.5 * eps / k, the
  last iterate, never an early exit) and the model is trained on it. eps as in attack
  names: 1/255 units for L-inf, pixel L2 norm for L2 (Salman et al.'s grids: L-inf 0.5,
  1, 2, 4, 8 and L2 0.01 ... 5).
* ``fgsm_<linf|l2>_<eps>`` -- "fast" adversarial training (Wong et al. 2020): one FGSM
  step of 1.25 * eps from a uniformly random start. About half the cost of PGD-2.

Stage 2's defenses add two that need more than a name (study.methods builds them):

* ``distillation`` (KD@stage-2, after Shafahi et al. 2020): cross-entropy plus
  ``weight`` times the mean squared distance between the fine-tuned features f(x) and
  a frozen pre-trained model's: by default the *robust* source's (Shafahi et al. distil
  a robust teacher's features into the student), so fine-tuning takes up its robust
  features rather than keep the standard ones it starts from.
* ``discrepancy_mitigating`` (DM, the paper's Eq. 5): cross-entropy plus lambda times
  LL(f(X)), the local-Lipschitz steepness of the features (Eq. 4), its inner
  maximisation by PGD (study.attacks.steepest_neighbour).
* ``trades`` (TRADES@stage-2, Zhang et al. 2019, a baseline beside DM): cross-entropy
  plus beta times KL(p(x) || p(x')), x' found by PGD maximising that KL.

The attack comes from the one attack engine (study.attacks), which takes gradients with
respect to the input only, so the k attack steps build no weight gradients. A mapping
``{name: pgd3_linf_4.0, rel_step: 2.0}`` overrides the attack's options.

Stage 2's objectives are a registry, ``KINDS``: each kind (``ce``, ``at``, ``kd``,
``dm``, ...) is one ``Kind`` entry that says what of the job goes into a trained model's
identity (its stage hash), how the objective is built from that identity, which
pre-trained backbone it needs besides its own (KD's teacher), and its cost in attack
passes per training image for ``study plan``. A method (``study.methods``) names its
kind; the sweep and the plan read the entry and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from study.attacks import Attack, AttackError, parse_attack, pgd, steepest_neighbour, steepness
from study.models import unwrap

STANDARD = "standard"
# Training defaults differ from evaluation ones: a random start (without one, training
# on PGD from the clean image overfits to a single attack path), Madry's 2.5 eps / k
# step for PGD and Wong et al.'s 1.25 eps for FGSM.
TRAIN_DEFAULTS = {"pgd": {"random_start": True, "rel_step": 2.5}, "fgsm": {"random_start": True, "rel_step": 1.25}}


class ObjectiveError(ValueError):
    """An objective that cannot be built: unknown name or bad attack options."""


def training_attack(spec) -> Attack:
    """The attack an adversarial objective trains on (see the module docstring)."""
    options = dict(spec) if isinstance(spec, dict) else {"name": spec}
    try:
        base = parse_attack({"name": options["name"]} if "name" in options else options)
    except AttackError as err:
        raise ObjectiveError(str(err)) from None
    if base.kind == "autoattack":
        raise ObjectiveError(f"objective {options['name']!r}: AutoAttack evaluates; train with pgd<k>_... or fgsm_...")
    if "restarts" in options or "max_images" in options:
        raise ObjectiveError(f"objective {options['name']!r}: restarts and max_images are evaluation options")
    try:
        return parse_attack({**TRAIN_DEFAULTS[base.kind], **options})
    except AttackError as err:
        raise ObjectiveError(str(err)) from None


def objective_name(spec) -> str:
    """A stable name: ``standard``, or the training attack's name with any option that
    differs from the training defaults (``pgd3_linf_4.0``, ``pgd3_linf_4.0[rel_step=2.0]``)."""
    if spec == STANDARD:
        return STANDARD
    attack = training_attack(spec)
    head = f"pgd{attack.steps}" if attack.kind == "pgd" else "fgsm"
    plain = training_attack(f"{head}_{attack.norm}_{float(attack.eps)!r}")
    extra = [
        f"{k}={getattr(attack, k)}"
        for k in ("random_start", "rel_step", "targeted", "loss")
        if getattr(attack, k) != getattr(plain, k)
    ]
    return f"{head}_{attack.norm}_{float(attack.eps)!r}" + (f"[{','.join(extra)}]" if extra else "")


def check(spec) -> str:
    """Validates an objective entry; returns its name (raises ObjectiveError)."""
    if isinstance(spec, str) and spec.strip() == STANDARD:
        return STANDARD
    if not isinstance(spec, (str, dict)):
        raise ObjectiveError(f"an objective is 'standard' or an attack name like pgd3_linf_4.0, got {spec!r}")
    try:
        return objective_name(spec)
    except (AttackError, KeyError) as err:
        raise ObjectiveError(str(err)) from None


def cross_entropy(label_smoothing: float = 0.0) -> Callable:
    def objective(model, images, labels):
        logits = model(images)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits

    return objective


def adversarial(attack: Attack, label_smoothing: float = 0.0, generator=None) -> Callable:
    """Trains on the attack's last iterate (no early exit). The attack runs on the bare
    module (never through a DDP wrapper: its input-only backward must not trigger DDP's
    gradient all-reduce) and in eval mode, as MadryLab's AttackerModel does."""

    def objective(model, images, labels):
        bare = unwrap(model)
        was = bare.training
        bare.eval()
        try:
            x_adv = pgd(bare, images, labels, attack, generator=generator)
        finally:
            bare.train(was)
        logits = model(x_adv)
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits

    return objective


def distillation(teacher_f, weight: float, label_smoothing: float = 0.0) -> Callable:
    """KD@stage-2: CE + weight * mean_i ||f(x_i) - f_source(x_i)||_2^2 / d, d the feature
    dimension (so one weight suits every backbone). The teacher's features are computed
    without a graph, in eval mode; it never trains."""
    teacher_f.eval()
    for p in teacher_f.parameters():
        p.requires_grad_(False)

    def objective(model, images, labels):
        m = unwrap(model)
        feats = m.f(images)
        logits = m.g(feats)
        with torch.no_grad():
            target = teacher_f(images)
        kd = (feats.float() - target.float()).pow(2).mean()
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + weight * kd, logits

    return objective


def discrepancy_mitigating(
    lam: float, eps: float, steps: int = 1, rel_step: float = 2.5, label_smoothing: float = 0.0, generator=None
) -> Callable:
    """DM (Eq. 5): CE(y, g(f(x))) + lam * LL(f(X)), LL as in Eq. 4 at L-inf radius
    ``eps`` (1/255 units) with ``steps`` PGD steps for the inner max. The clean and the
    steepest points go through f in separate passes, so the CE term is exactly plain
    cross-entropy (BatchNorm sees the clean batch alone) and lam = 0 is plain fine-tuning;
    then the inner max is skipped, as it would be multiplied by 0."""
    eps_pixels = eps / 255.0

    def objective(model, images, labels):
        m = unwrap(model)
        feats = m.f(images)
        logits = m.g(feats)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if lam == 0:
            return loss, logits
        x_adv = steepest_neighbour(m.f, images, eps_pixels, steps, rel_step, generator)
        ll = steepness(feats.flatten(1).float(), m.f(x_adv).flatten(1).float(), images, x_adv).mean()
        return loss + lam * ll, logits

    return objective


# the authors' code draws x' from x + 0.001 N(0, 1) on inputs scaled to [-1, 1]
CODE_START_STD = 0.0005


def discrepancy_mitigating_code(
    beta: float, eps: float, steps: int = 10, rel_step: float = 1.25, label_smoothing: float = 0.0, generator=None
) -> Callable:
    """DM as the authors' released ``train_dm.py`` computes it: CE + beta * (1/B) *
    MSE(f(x'), f(x)), the MSE a mean over the B x d features, x' from ``steps`` PGD steps
    of ``rel_step * eps / steps`` (eps in 1/255 units) that ascend the same MSE in eval
    mode, starting from x plus small Gaussian noise. Both feature passes carry gradients,
    as there; the clean pass is the one the CE term uses (the released code repeats it,
    which gives the same gradient). x' is found first, as there, so the eval-mode search
    sees BatchNorm's running statistics before this batch moves them."""
    eps_pixels = eps / 255.0

    def objective(model, images, labels):
        m = unwrap(model)
        x_adv = (
            None
            if beta == 0
            else steepest_neighbour(
                m.f, images, eps_pixels, steps, rel_step, generator, distance="mse", start_std=CODE_START_STD
            )
        )
        feats = m.f(images)
        logits = m.g(feats)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        if x_adv is None:
            return loss, logits
        mse = F.mse_loss(m.f(x_adv).flatten(1).float(), feats.flatten(1).float())
        return loss + beta * mse / len(images), logits

    return objective


def trades(attack: Attack, beta: float, label_smoothing: float = 0.0, generator=None) -> Callable:
    """TRADES (Zhang et al. 2019): CE(y, p(x)) + beta * KL(p(x) || p(x')), where x' is the
    attack's PGD on the KL to the clean prediction (in eval mode, from a random point of
    the ball: at x itself the KL's gradient is zero; the original starts at x + 0.001 N(0, 1)).
    Both terms take their own forward pass in the model's training mode, as the
    original's do; the KL is the batch mean of the per-sample sums."""

    def kl(clean_p):
        return lambda logits, _: F.kl_div(F.log_softmax(logits, 1), clean_p, reduction="none").sum(1)

    def objective(model, images, labels):
        bare = unwrap(model)
        was = bare.training
        bare.eval()
        try:
            with torch.no_grad():
                clean_p = F.softmax(bare(images).float(), 1)
            x_adv = pgd(bare, images, labels, attack, generator=generator, loss=kl(clean_p))
        finally:
            bare.train(was)
        logits = model(images)
        adv = F.kl_div(F.log_softmax(model(x_adv).float(), 1), F.softmax(logits.float(), 1), reduction="batchmean")
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing) + beta * adv, logits

    return objective


def build(spec, label_smoothing: float = 0.0, generator=None) -> Callable:
    """The objective function of a job-file entry."""
    if check(spec) == STANDARD:
        return cross_entropy(label_smoothing)
    return adversarial(training_attack(spec), label_smoothing, generator)


# -- stage 2's kinds ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Kind:
    """One stage-2 objective kind (see the module docstring).

    ``identity(ft, point, source, robust)``: plain data of what the objective minimises,
    from the job's FinetuneSpec ``ft``, the trial's ``point`` (λ, rates), the name of the
    pre-training objective the model starts from and that of the job's adversarial
    pre-training (None without one); it always holds ``kind``.
    ``build(identity, label_smoothing, generator, teacher)``: the objective function.
    ``teacher(identity)``: the pre-training objective whose frozen model it needs, or None.
    ``passes(identity)``: attack passes (forward and input backward) per training image.
    ``uses_lambda``: λ (``finetune.space.lam``) is a dimension of its trials."""

    name: str
    identity: Callable[..., dict]
    build: Callable[..., Callable]
    passes: Callable[[dict], int]
    teacher: Callable[[dict], str | None] = lambda ident: None
    uses_lambda: bool = False


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"objective kind {kind.name!r} is registered twice")
    KINDS[kind.name] = kind
    return kind


def _attack_passes(spec) -> int:
    attack = training_attack(spec)
    return attack.steps * attack.restarts


register(
    Kind(
        name="ce",
        identity=lambda ft, point, source, robust: {"kind": "ce"},
        build=lambda ident, ls, generator, teacher: cross_entropy(ls),
        passes=lambda ident: 0,
    )
)
register(
    Kind(
        name="at",
        identity=lambda ft, point, source, robust: {"kind": "at", "attack": check(ft.at)},
        build=lambda ident, ls, generator, teacher: adversarial(training_attack(ident["attack"]), ls, generator),
        passes=lambda ident: _attack_passes(ident["attack"]),
    )
)
register(
    Kind(
        name="kd",
        identity=lambda ft, point, source, robust: {
            "kind": "kd",
            "weight": ft.kd.weight,
            "teacher": ft.kd.teacher or robust,
        },
        build=lambda ident, ls, generator, teacher: distillation(teacher.f, ident["weight"], ls),
        teacher=lambda ident: ident["teacher"],
        passes=lambda ident: 0,
    )
)


def _dm_identity(ft, point, source, robust) -> dict:
    # Eq. 4's identity holds no form, as before the switch existed: its models keep their keys
    dump = ft.dm.model_dump(exclude={"form"} if ft.dm.form == "eq4" else set())
    return {"kind": "dm", "lam": point["lam"], **dump}


def _dm_build(ident, ls, generator, teacher):
    form = discrepancy_mitigating_code if ident.get("form") == "code" else discrepancy_mitigating
    return form(ident["lam"], ident["eps"], ident["steps"], ident["rel_step"], ls, generator)


register(
    Kind(name="dm", identity=_dm_identity, build=_dm_build, passes=lambda ident: ident["steps"] + 1, uses_lambda=True)
)
register(
    Kind(
        name="trades",
        identity=lambda ft, point, source, robust: {
            "kind": "trades",
            "beta": ft.trades.beta,
            "attack": check(ft.trades.attack),
        },
        build=lambda ident, ls, generator, teacher: trades(
            training_attack(ident["attack"]), ident["beta"], ls, generator
        ),
        passes=lambda ident: _attack_passes(ident["attack"]) + 1,
    )
)
