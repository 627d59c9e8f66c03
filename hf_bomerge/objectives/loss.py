"""The default objective: the mean next-token NLL of the held-out documents (minimized)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .base import Objective, register
from .confirm import split_documents

if TYPE_CHECKING:
    import torch


@register
class HeldOutLoss(Objective):
    """Mean next-token NLL over the search part's blocks (each process of `accelerate launch` scores its share).
    A search keeps whole documents apart for the confirm part (`confirm.split_documents`: every 4th document for
    `confirm_fraction` 0.25), packed on their own; `confirm_scores` gives each confirm document's (NLL sum,
    tokens), so the bootstrap resamples documents and their ratio is the confirm part's mean token NLL."""

    name = "loss"
    higher_is_better = False
    unit = " nats/token"
    confirm_units = "documents"
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
        docs = evaluator.documents_for(data)
        pad = evaluator.tokenizer.eos_token_id or 0
        return cls.of_documents(docs, evaluator.block_size, evaluator.batch_size, confirm_fraction, pad)

    @classmethod
    def of_documents(cls, docs: Sequence[Sequence[int]], block_size: int, batch_size: int,
                     confirm_fraction: float = 0.0, pad: int = 0) -> HeldOutLoss:
        """The search part packed into full blocks; the confirm part's documents packed on their own (the last
        block padded: every confirm token scored). Without a confirm part, every document packed together."""
        import torch

        from .heldout import blocks_digest, pack, pack_units  # torch: imported where a model is scored

        search, held, kind = split_documents(docs, confirm_fraction, block_size)
        objective = cls(pack(search, block_size), batch_size)
        if held:
            objective.confirm, objective.owner = pack_units(held, block_size, pad)
            scored = torch.bincount(objective.owner[:, 1:][objective.owner[:, 1:] >= 0], minlength=len(held))
            objective.scored = scored.nonzero().flatten().tolist()  # a document with no predicted token: no unit
            objective.confirm_size, objective.confirm_unit = len(objective.scored), kind
        every = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        objective.identity = f"{blocks_digest(every)}/{len(docs)}/{confirm_fraction:g}"
        return objective

    def __init__(self, blocks: torch.Tensor, batch_size: int):
        from .heldout import blocks_digest  # torch: imported where a model is scored, not for --help

        self.blocks, self.batch_size = blocks, batch_size
        self.confirm = self.owner = None
        self.scored: list[int] = []
        self.confirm_unit, self.confirm_size = self.confirm_units, 0
        self.tokens, self.questions = int(blocks.numel()), 0
        self.identity = blocks_digest(blocks)

    def __call__(self, model: torch.nn.Module) -> float:
        from . import parallel  # torch: imported where a model is scored, not for --help
        from .heldout import nll_sums  # torch: imported where a model is scored, not for --help

        total, count = parallel.reduce_sums(*nll_sums(model, self.blocks, self.batch_size, *parallel.world()))
        return total / count

    def confirm_scores(self, model: torch.nn.Module) -> list[tuple[float, int]]:
        """Each confirm document's (NLL sum, predicted tokens), computed whole on every process."""
        from .heldout import unit_sums  # torch: imported where a model is scored, not for --help

        sums = unit_sums(model, self.confirm, self.owner, self.batch_size)
        return [sums[i] for i in self.scored]

    def statistic(self, outcomes: Sequence[tuple[float, int]], idx: Sequence[int]) -> float:
        """The mean token NLL of the documents at `idx` (a bootstrap draw repeats some): Σ sums / Σ tokens."""
        return sum(outcomes[i][0] for i in idx) / sum(outcomes[i][1] for i in idx)
