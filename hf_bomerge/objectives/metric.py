"""An `evaluate` metric of multiple-choice predictions (maximized): the objective of any other `--objective` value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Objective, register

if TYPE_CHECKING:
    import torch

    from .tasks import Metric


@register
class MetricObjective(Objective):
    """An `evaluate` metric (a name, or a local path to a metric script) of the predictions on the search part of
    the questions (computed whole on each process); `confirm_fraction` of the questions are kept apart for
    `confirm_scores`, one prediction per question. It claims every name: what no other objective claims."""

    higher_is_better = True
    confirm_units = "questions"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return True

    @classmethod
    def key(cls, spec: str) -> str:
        from .tasks import objective_key  # torch (tasks): the objectives' registry stays light for --help

        return objective_key(spec)

    @classmethod
    def check(cls, spec: str, evaluation=None) -> None:
        from .tasks import Metric  # torch (tasks): the objectives' registry stays light for --help

        Metric.load(spec)

    @classmethod
    def remedy(cls) -> str:
        return "add questions to the --dataset file (every 4th is a confirm question), or raise --confirm-fraction"

    @classmethod
    def describe(cls, name: str) -> str:
        return f"{name} of multiple-choice questions (maximized)"

    @classmethod
    def build(cls, evaluator, data, spec: str, confirm_fraction: float) -> MetricObjective:
        from .tasks import Metric, choice_set  # torch (tasks): the objectives' registry stays light for --help

        pairs = choice_set(data, evaluator.tokenizer, evaluator.tokenizer_folder, evaluator.context,
                           evaluator.max_eval_tokens, evaluator.cache_dir, evaluator.token)
        return cls(Metric.load(spec), pairs, evaluator.batch_size * evaluator.block_size, confirm_fraction)

    def __init__(self, metric: Metric, pairs: dict[str, torch.Tensor], batch_tokens: int,
                 confirm_fraction: float = 0.0):
        import torch

        from .heldout import blocks_digest  # torch: imported where a model is scored, not for --help
        from .tasks import split_questions  # torch (tasks): the objectives' registry stays light for --help

        self.metric, self.name, self.batch_tokens = metric, metric.name, batch_tokens
        self.pairs, self.confirm = split_questions(pairs, confirm_fraction)
        self.confirm_size = len(self.confirm["answers"]) if self.confirm else 0
        self.confirm_unit = "questions"
        self.tokens, self.questions = int(self.pairs["lengths"].sum()), len(self.pairs["answers"])
        digest = blocks_digest(torch.cat([pairs["ids"].reshape(-1), pairs["answers"].reshape(-1)]))
        self.identity = f"{digest}/{confirm_fraction:g}"

    def __call__(self, model: torch.nn.Module) -> float:
        from .tasks import predict  # torch (tasks): the objectives' registry stays light for --help

        return self.metric(predict(model, self.pairs, self.batch_tokens), self.pairs["answers"].tolist())

    def confirm_scores(self, model: torch.nn.Module) -> list[int]:
        """The prediction for each confirm question."""
        from .tasks import predict  # torch (tasks): the objectives' registry stays light for --help

        return predict(model, self.confirm, self.batch_tokens)

    def statistic(self, predictions: Sequence[int], idx: Sequence[int]) -> float:
        """The metric of the confirm questions at `idx` (a bootstrap draw repeats some)."""
        answers = self.confirm["answers"].tolist()
        return self.metric([predictions[i] for i in idx], [answers[i] for i in idx])
