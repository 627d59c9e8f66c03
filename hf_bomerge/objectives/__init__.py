"""What a merge is scored by: the `Objective` contract, its registry, and the built-in objectives (the held-out
loss, and any `evaluate` metric of multiple-choice questions). A new objective is one class with `@register`."""

from .base import OBJECTIVES, Objective, objective_class, register
from .loss import HeldOutLoss
from .metric import MetricObjective

__all__ = ["OBJECTIVES", "HeldOutLoss", "MetricObjective", "Objective", "objective_class", "register"]
