"""The default objective: the mean next-token NLL of the held-out blocks (minimized)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Objective, register
from .confirm import split_blocks

if TYPE_CHECKING:
    import torch


@register
class HeldOutLoss(Objective):
    """Mean next-token NLL over the search part of the held-out blocks (each process of `accelerate launch` scores
    its share); `confirm_fraction` of the blocks are kept apart for `confirm_scores`, one loss per block."""

    name = "loss"
    higher_is_better = False
    unit = " nats/token"
    confirm_units = "blocks"
    layout = "loss"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec == "loss"

    @classmethod
    def header(cls, name: str) -> str:
        return "loss (nats/token)"

    @classmethod
    def perplexity(cls, value: float) -> float | None:
        return math.exp(value) if value < 700 else float("inf")

    @classmethod
    def build(cls, evaluator, data, spec: str, confirm_fraction: float) -> HeldOutLoss:
        return cls(evaluator.blocks_for(data), evaluator.batch_size, confirm_fraction)

    def __init__(self, blocks: torch.Tensor, batch_size: int, confirm_fraction: float = 0.0):
        from .heldout import blocks_digest  # torch: imported where a model is scored, not for --help

        self.blocks, self.confirm = split_blocks(blocks, confirm_fraction)
        self.batch_size, self.confirm_size = batch_size, len(self.confirm)
        self.tokens, self.questions = int(self.blocks.numel()), 0
        self.identity = f"{blocks_digest(blocks)}/{confirm_fraction:g}"

    def __call__(self, model: torch.nn.Module) -> float:
        from . import parallel  # torch: imported where a model is scored, not for --help
        from .heldout import nll_sums  # torch: imported where a model is scored, not for --help

        total, count = parallel.reduce_sums(*nll_sums(model, self.blocks, self.batch_size, *parallel.world()))
        return total / count

    def confirm_scores(self, model: torch.nn.Module) -> list[float]:
        """Each confirm block's loss (computed whole on every process: the confirm part is small)."""
        from .heldout import block_losses  # torch: imported where a model is scored, not for --help

        return block_losses(model, self.confirm, self.batch_size)

    def statistic(self, outcomes: Sequence[float], idx: Sequence[int]) -> float:
        """The mean of the per-block losses at `idx`."""
        return sum(outcomes[i] for i in idx) / len(idx)
