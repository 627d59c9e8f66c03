"""Data-parallel evaluation under `accelerate launch`: every process holds the model and the N checkpoints and
evaluates its share of the held-out batches; the sums are reduced exactly; only the main process talks to the
study and writes output.

    accelerate launch --num_processes 8 -m hf_bomerge.cli EleutherAI/pythia-1b --revisions last:4

The main process drives: for each trial it broadcasts the weights (and which data set), every process merges
them into its own model and scores its batches, and an all-reduce of (Σ NLL, token count) in float64 gives
every process the same mean. Without `accelerate launch` (WORLD_SIZE unset) all of this is a no-op.
"""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

from .errors import BOMergeError

R = TypeVar("R")


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside `accelerate launch`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    from accelerate import PartialState

    state = PartialState()  # initializes torch.distributed (gloo on CPU, NCCL on GPUs)
    return state.process_index, state.num_processes


def device() -> str | None:
    """This process's device under `accelerate launch` (cuda:LOCAL_RANK, or cpu), else None."""
    if world()[1] == 1:
        return None
    from accelerate import PartialState

    return str(PartialState().device)


def is_main() -> bool:
    return world()[0] == 0


def reduce_sums(total: float, count: int) -> tuple[float, int]:
    """Σ over processes of (total, count), in float64 (exact for the counts, to rounding for the totals)."""
    if world()[1] == 1:
        return total, count
    import torch.distributed as dist

    from accelerate import PartialState

    both = torch.tensor([total, float(count)], dtype=torch.float64, device=PartialState().device)
    dist.all_reduce(both)
    return float(both[0]), int(both[1])


def main_process_first():
    """A context: the main process runs the block first (downloads, tokenization caches), then the others."""
    if world()[1] == 1:
        from contextlib import nullcontext

        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def _broadcast(message=None):
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def drive(evaluate: Callable, main: Callable[[Callable], R]) -> R:
    """Run `main(evaluate_everywhere)` on the main process while the other processes serve its evaluations;
    every process returns `main`'s result (the others get it by broadcast).

    `evaluate(*args)` must be callable on every process with the same arguments (weights, data set).
    """
    if world()[1] == 1:
        return main(evaluate)
    if not is_main():
        while (message := _broadcast())[0] == "evaluate":
            evaluate(*message[1])
        if message[1] is None:
            raise BOMergeError("The main process of `accelerate launch` stopped with an error (see its output); "
                               "this process stops too.")
        return message[1]

    def everywhere(*args):
        _broadcast(("evaluate", args))
        return evaluate(*args)

    result = None
    try:
        result = main(everywhere)
    finally:
        _broadcast(("done", result))
    return result
