"""What a merge is scored by: the `Objective` contract, its registry, and the built-in objectives (the held-out
loss, lm-evaluation-harness tasks, and any `evaluate` metric of multiple-choice questions). A new objective is one
class with `@register`."""

from .base import OBJECTIVES, Objective, check_evaluation, objective_class, register
from .lmeval import LMEvalMinimized, LMEvalObjective
from .loss import HeldOutLoss
from .metric import MetricObjective

__all__ = ["OBJECTIVES", "HeldOutLoss", "LMEvalMinimized", "LMEvalObjective", "MetricObjective", "Objective",
           "check_evaluation", "objective_class", "register"]
