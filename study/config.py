"""Job files: YAML in, a validated and hashed config out, before any work starts.

Every mistake is reported as one line naming the field, e.g.
``pretrain.backbones[0]: unknown backbone 'resnet9' (known: resnet18, ...)``.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from study import corruptions
from study.attacks import Attack, AttackError, parse_attack
from study.data.registry import DatasetError, build_split, get_info, resolve_params
from study.engine import OPTIMIZERS, TrainSettings, one_of
from study.files import config_hash
from study.methods import DEFAULT_LAMBDA, METHODS, TABLE1
from study.models import BACKBONES
from study.objectives import ObjectiveError
from study.objectives import check as check_objective
from study.weights import SHA256, WeightsError
from study.weights import parse as parse_weights

_CHECK_PATHS: ContextVar[bool] = ContextVar("check_paths", default=True)


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
    def _costs(self):
        if self.gpu_hours is not None and not self.costs:
            raise ValueError("gpu_hours needs costs: a file written by `study plan JOB --costs FILE` on a GPU node")
        if self.costs and _CHECK_PATHS.get() and not Path(self.costs).expanduser().is_file():
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


MODELS = ("pretrain",) + tuple(METHODS)  # what an attack may be limited to
_LIMITS = ("methods", "datasets", "seeds")


class AttackEntry(BaseModel):
    """One attack of the suite, parsed once: the Attack, and the models (``methods``:
    ``pretrain`` or stage-2 methods) and dataset keys it is limited to (None: all). A job
    file writes a name or a mapping ``{name: ..., <option>: ..., methods: [...],
    datasets: [...]}``; the entry dumps back to what was written."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    attack: Attack
    methods: tuple[str, ...] | None = None
    datasets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    written: Any = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, spec):
        if isinstance(spec, AttackEntry):
            return spec
        rest, limits = spec, {}
        if isinstance(spec, dict):
            rest = {k: v for k, v in spec.items() if k not in _LIMITS}
            limits = {k: spec[k] for k in _LIMITS if k in spec}
        try:
            attack = parse_attack(rest)
        except AttackError as err:
            raise ValueError(str(err)) from None
        only, data, seeds = limits.get("methods"), limits.get("datasets"), limits.get("seeds")
        if seeds is not None and (
            not isinstance(seeds, list)
            or not seeds
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
        ):
            raise ValueError(f"attack {attack.name!r}: seeds must be a list of seeds of the job, got {seeds!r}")
        if only is not None and (not isinstance(only, list) or not only or any(m not in MODELS for m in only)):
            raise ValueError(
                f"attack {attack.name!r}: methods must be a list drawn from {', '.join(MODELS)}, got {only!r}"
            )
        if data is not None and (not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data)):
            raise ValueError(f"attack {attack.name!r}: datasets must be a list of keys of datasets, got {data!r}")
        return {
            "attack": attack,
            "methods": None if only is None else tuple(only),
            "datasets": None if data is None else tuple(data),
            "seeds": None if seeds is None else tuple(seeds),
            "written": spec,
        }

    @model_serializer
    def _dump(self):
        return self.written

    def applies(self, method: str | None, dataset: str | None, seed: int | None = None) -> bool:
        return (
            (method is None or self.methods is None or method in self.methods)
            and (dataset is None or self.datasets is None or dataset in self.datasets)
            and (seed is None or self.seeds is None or seed in self.seeds)
        )


class CorruptionsSpec(_Strict):
    """The common corruptions a job evaluates (``study.corruptions``): ``names`` a subset
    (``common``: ImageNet-C's 15, ``extra``: the 4 others, ``all``) or a list of names,
    ``severities`` drawn from 1-5; ``max_images``, ``methods``, ``datasets`` and ``seeds``
    limit them as they limit an attack."""

    names: str | list[str] = "common"
    severities: list[int] = Field(default_factory=lambda: list(corruptions.SEVERITIES))
    max_images: int | None = Field(None, gt=0)
    methods: list[str] | None = None
    datasets: list[str] | None = None
    seeds: list[int] | None = None

    @model_validator(mode="after")
    def _known(self):
        try:
            corruptions.check(self.names, self.severities)
        except corruptions.CorruptionError as err:
            raise ValueError(str(err)) from None
        if self.methods is not None and (not self.methods or any(m not in MODELS for m in self.methods)):
            raise ValueError(f"methods must be a list drawn from {', '.join(MODELS)}, got {self.methods!r}")
        for name in ("datasets", "seeds"):
            if getattr(self, name) == []:
                raise ValueError(f"{name}: an empty list selects nothing (leave it out for all)")
        return self

    def items(self) -> list[corruptions.Corruption]:
        names, severities = corruptions.check(self.names, self.severities)
        return [corruptions.Corruption(n, s, self.max_images) for n in names for s in severities]

    def applies(self, method: str | None, dataset: str | None, seed: int | None = None) -> bool:
        return (
            (method is None or self.methods is None or method in self.methods)
            and (dataset is None or self.datasets is None or dataset in self.datasets)
            and (seed is None or self.seeds is None or seed in self.seeds)
        )


class EvalSpec(_Strict):
    batch_size: int = Field(256, gt=0)
    max_images: int | None = Field(None, gt=0)  # cap on evaluated test images
    # the inference copy's CPU conversions (study.fastcopy), where the backbone allows them
    fast_copy: bool = True
    # the attack suite, by the paper's names, or {name: ..., <option>: ...} mappings;
    # `methods: [scratch, full]` limits an (expensive) attack to those models,
    # `datasets: [alphabet]` to those datasets
    attacks: list[AttackEntry] = Field(default_factory=list)
    # common corruptions, e.g. {names: common, severities: [1, 3, 5]} (study.corruptions)
    corruptions: CorruptionsSpec | None = None

    @field_validator("attacks")
    @classmethod
    def _distinct(cls, entries):
        _no_repeats([e.attack.name for e in entries], "attack")
        return entries

    def suite(self, method: str | None = None, dataset: str | None = None, seed: int | None = None) -> list[Attack]:
        """The attacks, or those that run on models of ``method`` on ``dataset`` (of replicate
        ``seed``), then the corruption items that do."""
        out = [e.attack for e in self.attacks if e.applies(method, dataset, seed)]
        c = self.corruptions
        if c is not None and c.applies(method, dataset, seed):
            out += c.items()
        return out


Seed = Annotated[int, Field(ge=0, lt=2**31)]


class JobConfig(_Strict):
    # a plain identifier: it names the default OUT (runs/NAME) and the MLflow experiment
    name: str = Field(min_length=1)
    seed: Seed = 0
    # replicates: every seed trains its own models (stage 1 too, unless pretrain.replicate
    # is false); default: the one `seed`
    seeds: list[Seed] | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CUDA kernels that repeat bit for bit (study.engine.deterministic_kernels); slower.
    # Not part of any stage's identity: a model trained either way is the same stage
    deterministic: bool = False
    data: DataSpec = Field(default_factory=DataSpec)
    datasets: dict[str, DatasetSpec] = Field(min_length=1)
    pretrain: PretrainSpec
    finetune: FinetuneSpec | None = None  # None: a job that only pre-trains
    eval: EvalSpec = Field(default_factory=EvalSpec)
    ray: RaySpec = Field(default_factory=RaySpec)
    analyses: AnalysesSpec = Field(default_factory=AnalysesSpec)
    limits: LimitsSpec = Field(default_factory=LimitsSpec)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name):
        if len(name) > 100 or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise ValueError(
                f"{name[:40]!r}{'...' if len(name) > 40 else ''} is no plain name: letters, digits, '-', '_' and "
                "'.' (not first), at most 100 (it names the default OUT, runs/NAME, and the MLflow experiment)"
            )
        return name

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds):
        if seeds is not None:
            if not seeds:
                raise ValueError("give at least one seed (or leave seeds out: the one `seed`)")
            _no_repeats(seeds, "seed")
        return seeds

    @model_validator(mode="after")
    def _seed_of_seeds(self):
        """With seeds, ``seed`` is one of them: the replicate a config stands for (the
        first unless set; ``for_seed`` sets the others)."""
        if self.seeds is not None:
            if "seed" in self.model_fields_set and self.seed not in self.seeds:
                raise _FieldError(
                    "seed",
                    f"{self.seed} is not one of seeds ({', '.join(map(str, self.seeds))}): leave seed out with seeds",
                )
            if "seed" not in self.model_fields_set:
                self.seed = self.seeds[0]
        return self

    # -- checks across sections, one per section ---------------------------------------
    @model_validator(mode="after")
    def _check_datasets(self):
        for key, spec in self.datasets.items():
            name = spec.name or key
            try:
                if get_info(name).generated:  # cheap: nothing is drawn until an item is read
                    build_split(name, "test", params=spec.params)  # resolves params too
                else:
                    resolve_params(name, spec.params)
            except (DatasetError, ValueError) as err:
                raise _FieldError(f"datasets.{key}", str(err)) from err
            root = self.dataset_root(key)
            if not get_info(name).generated:
                if root is None:
                    raise _FieldError(
                        f"datasets.{key}.root", f"dataset {name!r} needs a data root (datasets.{key}.root or data.root)"
                    )
                if _CHECK_PATHS.get() and not Path(root).expanduser().is_dir():
                    raise _FieldError(f"datasets.{key}.root", f"data root does not exist: {root}")
        return self

    @model_validator(mode="after")
    def _check_pretrain(self):
        p = self.pretrain
        if p.weights is None:
            if p.dataset is None:
                raise _FieldError("pretrain.dataset", "needed unless pretrain.weights imports weights")
            self._known_dataset("pretrain.dataset", p.dataset)
        else:
            self._check_weights()
            if p.dataset is not None:  # imported weights: the source data for the UAP and MMD analyses
                self._known_dataset("pretrain.dataset", p.dataset)
        if p.weights is not None and p.objectives != ["standard"]:
            raise _FieldError(
                "pretrain.objectives",
                "imported weights are not trained here: "
                "leave objectives out with pretrain.weights (a mapping "
                "{objective: weights} names imported adversarial backbones)",
            )
        if p.train.batch_size % p.scaling.workers:
            raise _FieldError(
                "pretrain.train.batch_size",
                f"{p.train.batch_size} is not divisible "
                f"by pretrain.scaling.workers ({p.scaling.workers}): each worker "
                f"takes an equal share of the global batch",
            )
        return self

    def _check_weights(self) -> None:
        p = self.pretrain
        given = p.weights if isinstance(p.weights, dict) else {None: p.weights}
        if not given:
            raise _FieldError("pretrain.weights", "an empty mapping imports nothing")
        for objective, w in given.items():
            where = "pretrain.weights" + (f".{objective}" if objective else "")
            if objective is not None:
                try:
                    check_objective(objective)
                except ObjectiveError as err:
                    raise _FieldError(where, str(err)) from err
            spec = w.source if isinstance(w, WeightsRef) else w
            try:  # names only: nothing is fetched here (study run fetches before any work)
                for backbone in p.backbones:
                    src = parse_weights(spec, backbone)
            except WeightsError as err:
                raise _FieldError(where, str(err)) from err
            if src.kind == "file" and _CHECK_PATHS.get() and not Path(spec).expanduser().is_file():
                raise _FieldError(where, f"weights file not found: {spec}")
        _no_repeats(p.objective_names(), "objective")

    def _known_dataset(self, where: str, key: str) -> None:
        if key not in self.datasets:
            raise _FieldError(where, f"{key!r} is not a key of datasets (have: {', '.join(self.datasets)})")

    @model_validator(mode="after")
    def _check_finetune(self):
        ft, p = self.finetune, self.pretrain
        if p.weights is None:
            s = p.train.settings()
            if s.lr_f == 0 and s.lr_g == 0:
                raise _FieldError("pretrain.train.lr", "every learning rate is 0: stage 1 would train nothing")
        if ft is None:
            return self
        for method in ft.methods:
            s, parts = ft.train_for(method).settings(), METHODS[method].trains.split("+")
            fixed = ft.fixed_by_override(method)
            rates = {
                part: [getattr(s, f"lr_{part}")]
                if f"lr_{part}" in fixed or not isinstance(getattr(ft.space, f"lr_{part}"), list)
                else getattr(ft.space, f"lr_{part}")
                for part in parts
            }
            if all(r == 0 for part in parts for r in rates[part]):
                where = "finetune.overrides." + method if fixed & {"lr", "lr_f", "lr_g"} else "finetune.train"
                raise _FieldError(
                    where,
                    f"every learning rate of what {method} trains ({', '.join(parts)}) is 0: it would train nothing",
                )
        have = p.objective_names()
        for field in ("source", "robust_source"):
            name = getattr(ft, field)
            if name is not None and name not in have:
                raise _FieldError(
                    f"finetune.{field}", f"{name!r} is not one of pretrain.objectives (have: {', '.join(have)})"
                )
        if ft.kd.teacher is not None and ft.kd.teacher not in have:
            raise _FieldError(
                "finetune.kd.teacher", f"{ft.kd.teacher!r} is not one of pretrain.objectives (have: {', '.join(have)})"
            )
        if "kd_stage2" in ft.all_methods() and ft.kd.teacher is None and self.robust_objective() is None:
            raise _FieldError(
                "finetune.kd.teacher",
                "KD@stage-2 distils the robust source's features (Shafahi "
                "et al. 2020): add an adversarial objective to pretrain.objectives, or name "
                "the teacher",
            )
        robust = [m for m in ft.all_methods() if METHODS[m].starts_from == "robust"]
        if robust and self.robust_objective() is None:
            raise _FieldError(
                "finetune.methods",
                f"{', '.join(robust)} start(s) from an adversarially "
                f"pre-trained backbone: add one to pretrain.objectives "
                f"(e.g. pgd3_linf_4.0 or fgsm_linf_2.0)",
            )
        for i, b in enumerate(ft.backbones or []):
            if b not in p.backbones:
                raise _FieldError(
                    f"finetune.backbones[{i}]",
                    f"{b!r} is not pre-trained (pretrain.backbones: {', '.join(p.backbones)})",
                )
        for i, d in enumerate(ft.datasets):
            self._known_dataset(f"finetune.datasets[{i}]", d)
        for d in ft.methods_for:
            if d not in ft.datasets:
                raise _FieldError(
                    f"finetune.methods_for.{d}",
                    f"{d!r} is not one of finetune.datasets (have: {', '.join(ft.datasets)})",
                )
        return self

    def _evaluated(self, methods=None) -> list[str]:
        """The dataset keys whose models meet the suite: the fine-tuning targets, and the
        source where stage 1 trains there (and ``methods``, a limit, includes pretrain)."""
        keys = list(self.finetune.datasets if self.finetune else [])
        trains = self.pretrain.weights is None and self.pretrain.dataset in self.datasets
        if trains and (methods is None or "pretrain" in methods):
            keys.append(self.pretrain.dataset)
        return list(dict.fromkeys(keys))

    def _selects_some(self, where: str, entry) -> None:
        """An eval entry whose methods and datasets meet no model of the job would add no
        row and say nothing: refused, naming the models there are."""
        models = [(m, key) for key in self._evaluated() for m in self._methods_at(key)]
        if models and not any(entry.applies(m, key) for m, key in models):
            have = ", ".join(f"{m} on {key}" for m, key in models)
            raise _FieldError(where, f"its methods and datasets select no model of the job (the job has: {have})")

    def _methods_at(self, key: str) -> list[str]:
        methods = list(self.finetune.methods_of(key)) if self.finetune and key in self.finetune.datasets else []
        trains = self.pretrain.weights is None and key == self.pretrain.dataset
        return methods + (["pretrain"] if trains else [])

    def _known_seed(self, where: str, seed: int) -> None:
        if seed not in self.replicate_seeds():
            raise _FieldError(
                where, f"{seed} is not a seed of the job (seeds: {', '.join(map(str, self.replicate_seeds()))})"
            )

    @model_validator(mode="after")
    def _check_eval(self):
        evaluated = self._evaluated()
        for i, entry in enumerate(self.eval.attacks):
            for d in entry.datasets or ():
                self._known_dataset(f"eval.attacks[{i}].datasets", d)
            a = entry.attack
            for key in evaluated if a.norm == "l2" else ():
                side = self.resolution(key)
                if entry.datasets in (None, ()) or key in entry.datasets:
                    if a.eps > (3 * side * side) ** 0.5:
                        raise _FieldError(
                            f"eval.attacks[{i}]",
                            f"{a.name}: an L2 eps of {a.eps:g} exceeds the largest distance between two images of "
                            f"{key!r} at {side} px ({(3 * side * side) ** 0.5:.1f}): every image would break",
                        )
            for seed in entry.seeds or ():
                self._known_seed(f"eval.attacks[{i}].seeds", seed)
            self._selects_some(f"eval.attacks[{i}]", entry)
        c = self.eval.corruptions
        if c is not None:
            for d in c.datasets or ():
                self._known_dataset("eval.corruptions.datasets", d)
            for seed in c.seeds or ():
                self._known_seed("eval.corruptions.seeds", seed)
            self._selects_some("eval.corruptions", c)
            for key in self._evaluated(c.methods):
                side = self.resolution(key)
                if (c.datasets is None or key in c.datasets) and side < corruptions.MIN_SIDE:
                    first = c.items()[0].corruption
                    raise _FieldError(
                        "eval.corruptions",
                        f"{first} cannot run on {key!r} at {side} px: the corruptions need at least "
                        f"{corruptions.MIN_SIDE} px (limit them with datasets: [...], or raise its resolution)",
                    )
        return self

    @model_validator(mode="after")
    def _check_limits(self):
        cap, p, ft = self.limits.gpus, self.pretrain, self.finetune
        if cap is None:  # the largest GPU request of any stage must fit the limit
            return self
        sc = p.scaling
        if p.weights is None and sc.use_gpu and sc.workers * sc.gpus_per_worker > cap:
            raise _FieldError(
                "pretrain.scaling", f"{sc.workers} workers x {sc.gpus_per_worker:g} GPU exceed limits.gpus ({cap:g})"
            )
        if ft is not None and ft.resources.gpus > 0:
            most = ft.resources.gpus * (ft.max_concurrent_trials or 10**9)
            if ft.max_concurrent_trials is None or most > cap:
                raise _FieldError(
                    "finetune.max_concurrent_trials",
                    f"trials of {ft.resources.gpus:g} GPU each could hold more than limits.gpus "
                    f"({cap:g}): set max_concurrent_trials to at most "
                    f"{int(cap // ft.resources.gpus)}",
                )
        a = self.analyses.resources
        if ft is not None and self.analyses.enabled and a.gpus * self.analyses.actors > cap:
            raise _FieldError(
                "analyses.actors", f"{self.analyses.actors} actors x {a.gpus:g} GPU exceed limits.gpus ({cap:g})"
            )
        return self

    # -- derived --------------------------------------------------------------------
    def dataset_name(self, key: str) -> str:
        return self.datasets[key].name or key

    def dataset_root(self, key: str) -> str | None:
        """The dataset's root: its own, else data.root, else its registry default (Debian's
        Fashion-MNIST folder) where that exists."""
        return get_info(self.dataset_name(key)).root_or_default(self.datasets[key].root or self.data.root)

    def dataset_params(self, key: str) -> dict:
        return resolve_params(self.dataset_name(key), self.datasets[key].params)

    def resolution(self, key: str) -> int:
        spec = self.datasets[key]
        if spec.resolution:
            return spec.resolution
        return int(self.dataset_params(key).get("image_size", 224))

    def replicate_seeds(self) -> list[int]:
        """The seeds the job replicates its models over."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def for_seed(self, seed: int) -> JobConfig:
        """This job as one of its replicates: everything seeded draws from ``seed``."""
        return self.model_copy(update={"seed": int(seed)})

    def source_objective(self) -> str:
        """The standard pre-training: the objective whose backbone fine-tunes start from."""
        names = self.pretrain.objective_names()
        if self.finetune and self.finetune.source:
            return self.finetune.source
        return "standard" if "standard" in names else names[0]

    def robust_objective(self) -> str | None:
        """The adversarial pre-training (AT@stage-1, AT@stage-1&2, DM@stage-1&2), if any."""
        if self.finetune and self.finetune.robust_source:
            return self.finetune.robust_source
        return next((n for n in self.pretrain.objective_names() if n != "standard"), None)

    def finetune_backbones(self) -> list[str]:
        return self.finetune.backbones if self.finetune and self.finetune.backbones else self.pretrain.backbones

    def resolved(self) -> dict:
        return json.loads(self.model_dump_json())

    def hash(self) -> str:
        return config_hash(self.resolved())


class _FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if e["type"] == "extra_forbidden":
        msg = "unknown field (a typo?)"
    elif e["type"] == "missing":
        msg = "required field is missing"
    loc = _loc(e["loc"])
    return f"{loc}: {msg}" if loc else msg  # _cross's errors carry their own field path


def parse(raw: dict, source: str = "job", check_paths: bool = True) -> JobConfig:
    """A checked job. ``check_paths=False`` skips the checks that data roots and weights
    files exist (``study plan`` on a laptop, for a job whose data lies on the cluster)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping")
    token = _CHECK_PATHS.set(check_paths)
    try:
        return JobConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None
    finally:
        _CHECK_PATHS.reset(token)


def load(path, check_paths: bool = True) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"job file not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (a job file is YAML)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_error(err)})") from None
    return parse(raw, str(path), check_paths)


def _yaml_error(err: yaml.YAMLError) -> str:
    where = getattr(err, "problem_mark", None)
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{what}, line {where.line + 1}" if where is not None else str(what)


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: PyYAML
    keeps the last silently, and a second ``eval:`` would drop the first block whole."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    None,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)
