"""The attack grammar: paper names (``pgd10_linf_0.5``, ``strong_linf_0.5[version=apgd]``)
and mappings of options, parsed into ``Attack``; the strong evaluation's members; a
reader's name of each."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from study.items import AttackError

_NAME = re.compile(
    r"^(?:(?P<pgd>pgd)(?P<steps>\d+)|(?P<fgsm>fgsm)|(?P<aa>autoattack)|(?P<strong>strong))"
    r"_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)$"
)


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

    # -- the evaluation item (study.items.Item) --
    def run(self, model, batches, max_images: int | None = None, seed: int = 0) -> dict:
        from study.attacks.run import robust_accuracy

        return robust_accuracy(model, batches, self, max_images=max_images, seed=seed)

    def members(self) -> list[Attack]:
        """The strong evaluation's members, in the order they run; an attack is its own."""
        return members(self)

    def steps_at_most(self) -> int:
        """Gradient passes an image can take."""
        if self.kind == "autoattack":
            return AUTOATTACK_STEPS[self.version]
        if self.kind == "strong":
            return sum(m.steps_at_most() for m in self.members())
        return self.steps * self.restarts

    def passes(self, shares: dict) -> float:
        """As the engine runs it: only on the images the model gets right, a broken image
        leaving early (half-way on average), and each later member of the strong
        evaluation only on what the ones before it left."""
        if self.kind == "strong":
            first, *rest = self.members()
            left = shares["correct"] * shares["survive"]
            return first.passes(shares) + left * sum(m.steps_at_most() for m in rest)
        survive = shares["survive"]
        return shares["correct"] * self.steps_at_most() * (survive + (1 - survive) / 2)

    def host_seconds(self, side: int) -> float:
        return 0.0


@dataclass(frozen=True)
class Transfer(Attack):
    """An attack crafted on the public pre-trained model f₀ alone and applied to the models
    fine-tuned from it (study.threat): ``feature`` pushes f₀'s features of x+δ away from
    those of x at ``layer`` (the penultimate: f's output, where empty), label-blind
    (Abdelkader et al. 2020; Ban & Dong 2022 at a low layer); ``surrogate`` is PGD on f₀
    with a linear probe trained on the target's training split (what a grey-box attacker
    builds without the fine-tune). ``source``: the stage key of the f₀ it was crafted on,
    and ``path`` its crafted perturbations' file, both bound per unit (study.threat.bind)."""

    layer: str = ""
    source: str = ""
    path: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        head = f"{self.kind}_{self.norm}_{float(self.eps)!r}"
        base = Transfer(self.kind, self.norm, self.eps, **TRANSFER_DEFAULTS[self.kind])
        extra = [f"{k}={getattr(self, k)}" for k in TRANSFER_NAMED if getattr(self, k) != getattr(base, k)]
        return head + (f"[{','.join(extra)}]" if extra else "")

    def run(self, model, batches, max_images: int | None = None, seed: int = 0) -> dict:
        from study.attacks.transfer import apply

        return apply(model, batches, self, max_images)

    def steps_at_most(self) -> int:
        return 0  # crafted once on f₀ (study.threat), not on the model it is applied to: no passes


TRANSFER_KINDS = ("feature", "surrogate")
# feature: the distance has no gradient at δ = 0, so it starts from a random point of the ball
TRANSFER_DEFAULTS = {
    "feature": {"steps": 10, "random_start": True, "rel_step": 2.5},
    "surrogate": {"steps": 10, "random_start": False, "rel_step": 1.25},
}
TRANSFER_NAMED = ("steps", "random_start", "rel_step", "layer")
_TRANSFER = re.compile(r"^(?P<kind>feature|surrogate)_(?P<norm>linf|l2)_(?P<eps>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)$")


def parse_transfer(spec: str, options: dict) -> Transfer | None:
    """A transfer item from its name and options, or None for another name."""
    m = _TRANSFER.match(spec.strip())
    if not m:
        return None
    kind = m["kind"]
    allowed = {"eps": _NUMBER, "max_images": _INTEGER, "steps": _INTEGER, "random_start": _FLAG, "rel_step": _NUMBER}
    if kind == "feature":
        allowed["layer"] = (str, "a stage of the backbone (layer1 ... layer4), or empty for f's output")
    _check_options(spec, options, allowed)
    item = replace(Transfer(kind, m["norm"], float(m["eps"]), **TRANSFER_DEFAULTS[kind]), **options)
    _check_values(item, spec)
    if item.steps < 1:
        raise AttackError(f"attack {spec!r}: a transfer attack needs at least one step")
    return item


PRECISIONS = ("auto", "fp32", "bf16")  # of the ascent steps
# an option's value types and the words an error says for them
_NUMBER, _INTEGER, _FLAG = ((int, float), "a number"), (int, "an integer"), (bool, "true or false")
LINF_MAX = 255.0  # an L-inf eps beyond the pixel range breaks every image: refused
NAMED = ("restarts", "random_start", "rel_step", "targeted", "loss", "version")  # options a name shows
LOSSES = ("ce", "cw")
# AutoAttack's versions: the standard one (APGD-CE, APGD-T, FAB-T, Square), and its two
# untargeted APGD runs alone (cross-entropy and DLR loss, 100 steps, one restart each):
# what a CPU can afford on every model and seed (Square's 5,000 queries and the targeted
# runs are most of the standard version's cost on a model that resists)
VERSIONS = ("standard", "apgd")
AUTOATTACK_STEPS = {"standard": 1000, "apgd": 200}  # gradient passes an image takes, at most


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
    transfer = parse_transfer(spec, options)
    if transfer is not None:
        return transfer
    m = _NAME.match(spec.strip())
    if not m:
        if re.match(r"^\w+_(linf|l2)_-", spec):
            raise AttackError(f"attack {spec!r}: eps must not be negative")
        raise AttackError(
            f"unknown attack {spec!r} (expected pgd<steps>_<linf|l2>_<eps>, "
            f"fgsm_<linf|l2>_<eps>, autoattack_<linf|l2>_<eps>, strong_<linf|l2>_<eps>, or a transfer attack "
            f"from the public backbone, feature_<linf|l2>_<eps> or surrogate_<linf|l2>_<eps>; e.g. pgd10_linf_0.5)"
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
    allowed = {"eps": _NUMBER, "max_images": _INTEGER}
    if m["aa"] or m["strong"]:
        allowed["version"] = (str, f"one of {', '.join(VERSIONS)}")
    if m["strong"]:
        allowed["precision"] = (str, "one of auto, fp32, bf16")
    elif not m["aa"]:
        allowed.update(
            restarts=_INTEGER,
            random_start=_FLAG,
            rel_step=_NUMBER,
            targeted=_FLAG,
            precision=(str, "one of auto, fp32, bf16"),
            loss=(str, "one of ce, cw"),
        )
    refused = {}
    if m["aa"]:
        refused["loss"] = (
            "AutoAttack's standard version fixes its own losses (APGD-CE, APGD-T, FAB-T, Square); "
            "loss applies to pgd and fgsm"
        )
    _check_options(spec, options, allowed, refused)
    attack = replace(base, **options)
    _check_values(attack, spec)
    return attack


def _check_options(spec, options: dict, allowed: dict, refused: dict | None = None) -> None:
    """An AttackError for the first option a name may not take (``refused``: with why), does
    not know, or whose value is not of its type (``allowed``: key -> (types, words))."""
    for key, value in options.items():
        if key in (refused or {}):
            raise AttackError(f"attack {spec!r}: {refused[key]}")
        if key not in allowed:
            raise AttackError(f"attack {spec!r}: unknown option {key!r} (allowed: {', '.join(allowed)})")
        types, words = allowed[key]
        if isinstance(value, bool) != (types is bool) or not isinstance(value, types):
            raise AttackError(f"attack {spec!r}: {key} must be {words}, got {value!r}")


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
