"""The job file's ``eval``: the attack suite and the corruptions, and which of them meet
which model (``applies``, one rule for both)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from study import corruptions
from study.attacks import Attack, AttackError, Transfer, parse_attack
from study.config.specs import _no_repeats, _Strict
from study.items import Item
from study.methods import METHODS

MODELS = ("pretrain",) + tuple(METHODS)  # what an attack may be limited to
_LIMITS = ("methods", "datasets", "seeds")


def applies(item, method: str | None, dataset: str | None, seed: int | None = None) -> bool:
    """Whether an item of the suite (an attack entry or the corruptions) meets a model:
    each of its ``methods``, ``datasets`` and ``seeds`` limits, where it has one, holds
    (a question asked without one, None, is not limited by it)."""
    return all(
        asked is None or limit is None or asked in limit
        for asked, limit in ((method, item.methods), (dataset, item.datasets), (seed, item.seeds))
    )


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
        return applies(self, method, dataset, seed)


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
        return applies(self, method, dataset, seed)


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

    def suite(self, method: str | None = None, dataset: str | None = None, seed: int | None = None) -> list[Item]:
        """The attacks, or those that run on models of ``method`` on ``dataset`` (of replicate
        ``seed``), then the corruption items that do."""
        out = [e.attack for e in self.attacks if e.applies(method, dataset, seed)]
        if method == "pretrain":  # a transfer attack is crafted on the pre-trained model: it meets its fine-tunes
            out = [a for a in out if not isinstance(a, Transfer)]
        c = self.corruptions
        if c is not None and c.applies(method, dataset, seed):
            out += c.items()
        return out
