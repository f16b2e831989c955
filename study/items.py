"""The evaluation item: one entry of a model's evaluation suite. An attack and the strong
evaluation (``study.attacks.Attack``) and a common corruption (``study.corruptions.
Corruption``) are items; ``EvalSpec.suite`` lists them, ``study.evaluate`` runs each on a
model's test images, and ``study plan`` prices each. A new kind of item implements this
and touches nothing else."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class AttackError(ValueError):
    """An item that cannot be run: an unknown name, a negative or non-numeric eps, a
    targeted attack without targets."""


@runtime_checkable
class Item(Protocol):
    kind: str
    max_images: int | None  # a cap of its own on the test images (None: the suite's)

    @property
    def name(self) -> str:
        """Its name in results.csv's ``attack`` column, in tables and in MLflow."""
        ...

    def run(self, model, batches, max_images: int | None = None, seed: int = 0) -> dict:
        """The item on the model's first ``max_images`` test images: an evaluation record
        (``study.attacks.evaluation_record``: AOI, AAI, DR, images, and the per-image
        ``correct`` and ``robust`` masks)."""
        ...

    def passes(self, shares: dict) -> float:
        """Gradient passes per test image as the engine runs it (``shares``: the share of
        images the model gets right, and the share an attack leaves; study.plan)."""
        ...

    def host_seconds(self, side: int) -> float:
        """Seconds per image of ``side`` px spent off the model (a corruption's own work)."""
        ...
