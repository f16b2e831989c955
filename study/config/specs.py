"""The job file's schema, part by part: data, datasets, stage 1, stage 2 and its space,
the analyses, the limits. Every model refuses a key it does not know."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from study.engine import OPTIMIZERS, TrainSettings, one_of
from study.methods import DEFAULT_LAMBDA, METHODS, TABLE1
from study.models import BACKBONES
from study.objectives import ObjectiveError
from study.objectives import check as check_objective
from study.weights import SHA256


def _checks_paths(info: ValidationInfo) -> bool:
    """Whether data roots and weights files must exist here: ``parse``'s ``check_paths``,
    passed to the validators as pydantic's validation context."""
    return bool((info.context or {}).get("check_paths", True))


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


class ConfigError(ValueError):
    """A job file that cannot run; the message is one line naming the field."""


class _Strict(BaseModel):
    # strict: a number written as a string ("0.1") is a mistake, not something to guess at
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Backbone = Annotated[str, one_of(BACKBONES, "backbone")]
MethodName = Annotated[str, one_of(list(METHODS), "method")]


class TrainSpec(TrainSettings):
    """The engine's TrainSettings as a job file writes them, plus ``lr``, a shorthand for
    lr_f = lr_g (each defaults to lr, else 0.1)."""

    lr: float | None = Field(None, ge=0)
    lr_f: float | None = Field(None, ge=0)
    lr_g: float | None = Field(None, ge=0)

    def settings(self) -> TrainSettings:
        d = self.model_dump(exclude={"lr"})
        base = 0.1 if self.lr is None else self.lr
        d["lr_f"] = base if self.lr_f is None else self.lr_f
        d["lr_g"] = base if self.lr_g is None else self.lr_g
        return TrainSettings(**d)


class DatasetSpec(_Strict):
    name: str | None = None  # registry name; defaults to the key in `datasets`
    root: str | None = None  # for real datasets; defaults to data.root
    resolution: int | None = Field(None, gt=0)  # training/eval image side
    params: dict = Field(default_factory=dict)


class DataSpec(_Strict):
    root: str | None = None  # default root of real datasets
    dir: str = "data"  # .beton folder, relative to OUT unless absolute
    workers: int = Field(2, gt=0)  # loader threads and writer processes


def _no_repeats(names: list, what: str) -> None:
    seen = set()
    for name in names:
        key = json.dumps(name, sort_keys=True, default=str)  # dicts and lists too, in one pass
        if key in seen:
            raise ValueError(f"{what} {name!r} is listed twice")
        seen.add(key)


def _check_objective(spec):
    try:
        check_objective(spec)
    except ObjectiveError as err:
        raise ValueError(str(err)) from None
    return spec


Objective = Annotated[Any, AfterValidator(_check_objective)]


class ScalingSpec(_Strict):
    """Ray Train's ScalingConfig: DDP workers, each with its own FFCV loader."""

    workers: int = Field(1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)  # also the worker's loader threads
    gpus_per_worker: float = Field(1, gt=0)  # with use_gpu


class Progressive(_Strict):
    """ffcv-imagenet's progressive resizing: min_res until start_ramp, then linearly to
    max_res at end_ramp (epochs, 0-based), in steps of `step` pixels."""

    min_res: int = Field(gt=0)
    max_res: int = Field(gt=0)
    start_ramp: int = Field(ge=0)
    end_ramp: int = Field(gt=0)
    step: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _order(self):
        if self.min_res > self.max_res or self.start_ramp >= self.end_ramp:
            raise ValueError("progressive needs min_res <= max_res and start_ramp < end_ramp")
        return self


class WeightsRef(_Strict):
    """A weights entry with its pin: ``{from: salman/resnet18_linf_eps4.0, sha256: <64 hex>}``;
    a file whose sha256 differs is refused before any work."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, allow_inf_nan=False)
    source: str = Field(alias="from")
    sha256: str

    @model_serializer
    def _dump(self):
        return {"from": self.source, "sha256": self.sha256}


def _weights_entry(v, where: str):
    """A weights entry as written: a string, or {from: ..., sha256: ...} (a WeightsRef)."""
    if isinstance(v, (str, WeightsRef)):
        return v
    if isinstance(v, dict) and set(v) == {"from", "sha256"} and isinstance(v["from"], str):
        digest = str(v["sha256"]).lower()
        if not SHA256.match(digest):
            raise ValueError(f"{where}sha256 is 64 hexadecimal digits, got {v['sha256']!r}")
        return WeightsRef(source=v["from"], sha256=digest)
    raise ValueError(
        f"{where}a weights entry is a name, an hf:// address, a path or {{from: ..., sha256: ...}}, got {v!r}"
    )


class PretrainSpec(_Strict):
    dataset: str | None = None  # a key of `datasets`; with weights, the source data of the analyses
    backbones: list[Backbone] = Field(default_factory=lambda: ["resnet18"], min_length=1)
    # None: train; a weights entry (study.weights: imagenet, IMAGENET1K_V2, a catalog name,
    # hf://OWNER/REPO/FILE, a path; or {from: ..., sha256: ...} to pin it) imports a standard
    # backbone instead; a mapping {objective: entry} imports one backbone per objective, e.g.
    # Salman et al.'s: {standard: imagenet, pgd3_linf_4.0: salman/resnet18_linf_eps4.0}
    weights: Any | None = None
    weights_cache: str | None = None  # hub and torchvision downloads (relative to OUT); default
    #                                      huggingface_hub's cache ($HF_HOME) and torch's ($TORCH_HOME)
    # one pre-trained backbone per objective: standard, pgd<k>_<norm>_<eps> (Madry), or
    # fgsm_<norm>_<eps> (fast AT, random start); see study.objectives
    objectives: list[Objective] = Field(default_factory=lambda: ["standard"], min_length=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    max_failures: int = Field(2, ge=-1)  # worker-group restarts from the last checkpoint
    progressive: Progressive | None = None
    replicate: bool = True  # false: every seed fine-tunes the first seed's backbones

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_shape(cls, w):
        if isinstance(w, dict) and "from" not in w:  # {objective: entry}
            return {k: _weights_entry(v, f"{k}: ") for k, v in w.items()}
        return None if w is None else _weights_entry(w, "")

    @field_validator("objectives")
    @classmethod
    def _distinct_objectives(cls, specs):
        _no_repeats([check_objective(s) for s in specs], "objective")
        return specs

    def objective_specs(self) -> list:
        """The objectives with a backbone each: the imported ones, or those trained here."""
        return list(self.weights) if isinstance(self.weights, dict) else list(self.objectives)

    def objective_names(self) -> list[str]:
        return [check_objective(s) for s in self.objective_specs()]

    def weights_entry(self, objective: str) -> tuple[str, str | None] | None:
        """(weights entry, sha256 pin or None) the backbone of ``objective`` is imported
        from (None: trained here)."""
        w = self.weights
        if isinstance(w, dict):
            w = next(v for k, v in w.items() if check_objective(k) == objective)
        if w is None:
            return None
        return (w.source, w.sha256) if isinstance(w, WeightsRef) else (w, None)

    def weights_for(self, objective: str) -> str | None:
        """What the backbone of ``objective`` is imported from (None: trained here)."""
        entry = self.weights_entry(objective)
        return entry and entry[0]


class RaySpec(_Strict):
    address: str | None = None  # a running cluster; default $RAY_ADDRESS or a local Ray
    num_cpus: int | None = Field(None, gt=0)  # a local Ray's CPUs (default: all)
    storage: str = "ray"  # Ray Train/Tune storage: relative to OUT, a path or a URI


class Distribution(_Strict):
    """A range for random search: exactly one of ``loguniform: [lo, hi]`` or ``uniform: [lo, hi]``."""

    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _one(self):
        given = [k for k in ("loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a range is {loguniform: [lo, hi]} or {uniform: [lo, hi]}")
        lo, hi = getattr(self, given[0])
        if not 0 <= lo <= hi or (given[0] == "loguniform" and lo == 0):
            raise ValueError(
                f"{given[0]}: need 0 {'<' if given[0] == 'loguniform' else '<='} lo <= hi, got [{lo}, {hi}]"
            )
        return self


Rate = Annotated[float, Field(ge=0)]


class SpaceSpec(_Strict):
    """The sweep's space. A list is a grid dimension (grid search: every value; random
    search: one drawn per sample); a range is for random search only. Unset: the train
    spec's value. λ applies to the DM methods only and is always a grid dimension."""

    lr_f: list[Rate] | Distribution | None = None
    lr_g: list[Rate] | Distribution | None = None
    optimizer: list[Annotated[str, one_of(OPTIMIZERS, "optimizer")]] | None = None
    lam: list[Rate] = Field(default_factory=lambda: [DEFAULT_LAMBDA], min_length=1)

    @field_validator("lr_f", "lr_g", "optimizer", "lam")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list leaves nothing to try")
            _no_repeats(v, "value")
        return v


class KDSpec(_Strict):
    """KD@stage-2: CE + weight * ||f(x) - f_teacher(x)||^2 / d (Shafahi et al. 2020)."""

    weight: float = Field(1.0, ge=0)
    teacher: str | None = None  # a pretrain objective; default the robust source (Shafahi et al.)


class DMSpec(_Strict):
    """DM's regulariser and the radius (1/255), PGD steps and step size of its inner
    maximisation. ``form: eq4``: the paper's Eq. 4, LL = ||f(x) - f(x')||_1 / ||x - x'||_inf
    (defaults eps 2, 1 step of 2.5 eps). ``form: code``: what the authors' train_dm.py
    minimises, (1/B) MSE(f(x'), f(x)) (defaults eps 0.5, 10 steps of 1.25 eps / 10)."""

    form: Literal["eq4", "code"] = "eq4"
    eps: float = Field(2.0, gt=0)
    steps: int = Field(1, gt=0)
    rel_step: float = Field(2.5, gt=0)

    @model_validator(mode="after")
    def _code_defaults(self):
        if self.form == "code":
            for k, v in {"eps": 0.5, "steps": 10, "rel_step": 1.25}.items():
                if k not in self.model_fields_set:
                    setattr(self, k, v)
        return self


class TradesSpec(_Strict):
    """TRADES@stage-2: CE + beta * KL(p(x) || p(x')), x' by the attack (Zhang et al. 2019: beta 6)."""

    beta: float = Field(6.0, ge=0)
    attack: Objective = "pgd10_linf_2.0"  # the inner maximisation; its training defaults (random start)

    @field_validator("attack")
    @classmethod
    def _adversarial(cls, v):
        if check_objective(v) == "standard":
            raise ValueError("TRADES needs an attack for its inner maximisation, such as pgd10_linf_2.0")
        return v


class SchedulerSpec(_Strict):
    """ASHA early stopping on validation accuracy (epochs are Tune's time unit)."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesSpec(_Strict):
    cpus: float = Field(1, gt=0)  # also the trial's torch threads
    gpus: float = Field(0, ge=0)  # fractions share a GPU between trials


class FinetuneSpec(_Strict):
    """Stage 2 on Ray Tune: one trial per (dataset, backbone, method, λ, point of the space)."""

    datasets: list[str] = Field(min_length=1)
    backbones: list[Backbone] | None = None  # default: pretrain.backbones
    methods: list[MethodName] = Field(default_factory=lambda: list(TABLE1), min_length=1)
    # per-dataset method lists that replace `methods` there, e.g. {shapes10: [full]} to
    # add a cheap target that only Fig. 6 (MMD against DR) needs
    methods_for: dict[str, list[MethodName]] = Field(default_factory=dict)
    source: str | None = None  # the standard pre-training: default `standard` or the first
    robust_source: str | None = None  # the adversarial one: default the first that is not standard
    train: TrainSpec = Field(default_factory=TrainSpec)
    overrides: dict[MethodName, TrainSpec] = Field(default_factory=dict)  # per-method changes; they win over the space
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, gt=0)  # random search: points drawn per (dataset, backbone, method, λ)
    at: Objective = "pgd10_linf_2.0"  # AT@stage-2's adversarial objective (study.objectives)
    kd: KDSpec = Field(default_factory=KDSpec)
    dm: DMSpec = Field(default_factory=DMSpec)
    trades: TradesSpec = Field(default_factory=TradesSpec)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)  # held out of train for model selection
    # the validation images the strong evaluation attacks to choose a λ method's λ (all of
    # them if unset; AutoAttack on a CPU needs a cap)
    val_attack_images: int | None = Field(None, gt=0)
    # the partial fine-tune's BatchNorm: train (batch statistics, running statistics that
    # follow the target, as the authors' code) or frozen (eval mode, the source's statistics)
    partial_bn: Literal["train", "frozen"] = "train"
    scheduler: SchedulerSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(1, ge=-1)  # retries of a failed trial, from its last checkpoint
    checkpoint_every_s: float = Field(60.0, ge=0)  # a trial's checkpoints: at most this often (0: every epoch)

    @field_validator("methods", "datasets")
    @classmethod
    def _distinct(cls, v):
        _no_repeats(v, "entry")
        return v

    @field_validator("methods_for")
    @classmethod
    def _distinct_each(cls, v):
        for key, methods in v.items():
            if not methods:
                raise ValueError(f"{key}: give at least one method")
            _no_repeats(methods, f"{key}: entry")
        return v

    def methods_of(self, dataset: str) -> list[str]:
        """The methods that run on ``dataset``."""
        return self.methods_for.get(dataset, self.methods)

    def all_methods(self) -> list[str]:
        return list(dict.fromkeys(self.methods + [m for ms in self.methods_for.values() for m in ms]))

    @model_validator(mode="after")
    def _search(self):
        if self.search == "grid":
            for k in ("lr_f", "lr_g"):
                if isinstance(getattr(self.space, k), Distribution):
                    raise ValueError(f"space.{k}: a range needs search: random (grid search takes a list)")
        if self.search == "grid" and self.num_samples != 1:
            raise ValueError("num_samples is for search: random (a grid runs every point once)")
        if check_objective(self.at) == "standard":
            raise ValueError("at: AT@stage-2 needs an adversarial objective such as pgd10_linf_2.0")
        return self

    def train_for(self, method: str) -> TrainSpec:
        over = self.overrides.get(method)
        changes = over.model_dump(exclude_unset=True) if over else {}
        base = self.train.model_dump(exclude_unset=True)
        if "lr" in changes:  # an override's lr sets both rates, whatever the base set
            base = {k: v for k, v in base.items() if k not in ("lr_f", "lr_g")}
        return TrainSpec(**{**base, **changes})

    def fixed_by_override(self, method: str) -> set[str]:
        over = self.overrides.get(method)
        return set(over.model_dump(exclude_unset=True)) if over else set()


class CCASpec(_Strict):
    images: int = Field(512, gt=1)  # test images whose activations are compared
    max_rows: int = Field(4096, gt=1)  # spatial positions sampled per layer (SVCCA rows)
    keep: float = Field(0.99, gt=0, le=1)  # variance the SVD step keeps
    resamples: int = Field(100, ge=0)  # bootstrap draws of the images for the bottom layer's SVCCA (the CCA claim)


class UAPSpec(_Strict):
    eps: float = Field(10.0, gt=0)  # L-inf bound, 1/255 units (Poursaeed et al.: 10)
    target: int = Field(0, ge=0)  # the class the UAP pushes to
    steps: int = Field(200, gt=0)  # generator updates
    lr: float = Field(2e-3, gt=0)
    train_images: int = Field(512, gt=0)


class MMDSpec(_Strict):
    images: int = Field(256, gt=1)  # per side


class LLSpec(_Strict):
    eps: float = Field(2.0, gt=0)  # L-inf radius of Eq. 4's neighbourhood, 1/255 units
    steps: int = Field(10, gt=0)
    images: int = Field(128, gt=0)


class LimitsSpec(_Strict):
    """What the job may use on a real cluster. ``gpus``: the most GPUs it holds at once
    (checked against its resource requests here); ``gpu_hours``: its budget, checked by
    ``study run`` against ``study plan``'s estimate before anything starts."""

    gpus: float | None = Field(None, ge=0)
    gpu_hours: float | None = Field(None, gt=0)
    costs: str | None = None  # per-image costs (written by study plan --costs FILE) the check uses

    @model_validator(mode="after")
    def _costs(self, info: ValidationInfo):
        if self.gpu_hours is not None and not self.costs:
            raise ValueError("gpu_hours needs costs: a file written by `study plan JOB --costs FILE` on a GPU node")
        if self.costs and _checks_paths(info) and not Path(self.costs).expanduser().is_file():
            raise ValueError(f"costs file not found: {self.costs}")
        return self


class AnalysesSpec(_Strict):
    """Section 4's analyses (study.analyses) on Ray actors, after the sweep."""

    enabled: bool = True
    actors: int = Field(2, gt=0)  # at most this many actors run tasks in parallel
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)  # per actor
    images: int = Field(512, gt=0)  # test images for the UAP attacks
    # fine-tuning snapshots for Fig. 5a, as fractions of the training steps (scratch and
    # full fine-tune only); the final model is the last point
    snapshots: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.02, 0.1, 0.3])
    cca: CCASpec = Field(default_factory=CCASpec)
    uap: UAPSpec = Field(default_factory=UAPSpec)
    mmd: MMDSpec = Field(default_factory=MMDSpec)
    ll: LLSpec = Field(default_factory=LLSpec)
