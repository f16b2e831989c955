"""The whole job: ``JobConfig``, the checks that need more than one part of it, and the
questions the stages ask of it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from study import corruptions
from study.config.evaluation import EvalSpec
from study.config.specs import (
    AnalysesSpec,
    DatasetSpec,
    DataSpec,
    FinetuneSpec,
    LimitsSpec,
    PretrainSpec,
    RaySpec,
    WeightsRef,
    _checks_paths,
    _FieldError,
    _no_repeats,
    _Strict,
)
from study.data.registry import DatasetError, build_split, get_info, resolve_params
from study.files import config_hash
from study.methods import METHODS
from study.objectives import ObjectiveError
from study.objectives import check as check_objective
from study.weights import WeightsError
from study.weights import parse as parse_weights

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
    def _check_datasets(self, info: ValidationInfo):
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
                if _checks_paths(info) and not Path(root).expanduser().is_dir():
                    raise _FieldError(f"datasets.{key}.root", f"data root does not exist: {root}")
        return self

    @model_validator(mode="after")
    def _check_pretrain(self, info: ValidationInfo):
        p = self.pretrain
        if p.weights is None:
            if p.dataset is None:
                raise _FieldError("pretrain.dataset", "needed unless pretrain.weights imports weights")
            self._known_dataset("pretrain.dataset", p.dataset)
        else:
            self._check_weights(_checks_paths(info))
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

    def _check_weights(self, check_paths: bool) -> None:
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
            if src.kind == "file" and check_paths and not Path(spec).expanduser().is_file():
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
