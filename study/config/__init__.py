"""Job files: YAML in, a validated and hashed config out, before any work starts.

Every mistake is reported as one line naming the field, e.g.
``pretrain.backbones[0]: unknown backbone 'resnet9' (known: resnet18, ...)``.
"""

from study.config.evaluation import MODELS, AttackEntry, CorruptionsSpec, EvalSpec
from study.config.job import JobConfig
from study.config.loading import load, parse
from study.config.specs import (
    AnalysesSpec,
    CCASpec,
    ConfigError,
    DatasetSpec,
    DataSpec,
    Distribution,
    DMSpec,
    FinetuneSpec,
    LimitsSpec,
    PretrainSpec,
    RaySpec,
    TrainSpec,
    _no_repeats,
)

__all__ = [
    "MODELS",
    "AnalysesSpec",
    "AttackEntry",
    "CCASpec",
    "ConfigError",
    "CorruptionsSpec",
    "DMSpec",
    "DataSpec",
    "DatasetSpec",
    "Distribution",
    "EvalSpec",
    "FinetuneSpec",
    "JobConfig",
    "LimitsSpec",
    "PretrainSpec",
    "RaySpec",
    "TrainSpec",
    "_no_repeats",
    "load",
    "parse",
]
