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
from collections.abc import Callable
from typing import TypeVar

import torch

from ..errors import BOMergeError

R = TypeVar("R")


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside `accelerate launch`."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # initializes torch.distributed (gloo on CPU, NCCL on GPUs); without cpu=True, Accelerate leaves processes
    # started by torchrun on a machine without GPUs undistributed (each one a world of its own)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    return state.process_index, state.num_processes


def device() -> str | None:
    """This process's device under `accelerate launch` (cuda:LOCAL_RANK, or cpu), else None."""
    if world()[1] == 1:
        return None
    from accelerate import PartialState

    return str(PartialState().device)


def is_main() -> bool:
    return world()[0] == 0


class PeerError(BOMergeError):
    """Another process of `accelerate launch` failed during the evaluation this process took part in."""


_joined = [0]  # reductions this process has joined during the evaluation `drive` is running (0 or 1)


def reduce_sums(total: float, count: int, failed: bool = False) -> tuple[float, int]:
    """Σ over processes of (total, count), in float64 (exact for the counts, to rounding for the totals).

    Every process of an evaluation joins this one all-reduce, a failed one too (`failed`, from `drive`), so that
    the collectives stay matched and every process learns of the failure: the others raise `PeerError`."""
    if world()[1] == 1:
        return total, count
    import torch.distributed as dist
    from accelerate import PartialState

    sums = torch.tensor([total, float(count), float(failed)], dtype=torch.float64, device=PartialState().device)
    dist.all_reduce(sums)
    _joined[0] += 1
    if sums[2] and not failed:
        raise PeerError("Another process of `accelerate launch` failed during this evaluation (its error is in "
                        "the output above); every process stops.")
    return float(sums[0]), int(sums[1])


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


def _agreed(evaluate: Callable) -> Callable:
    """`evaluate` ending, on every process, in the same one reduction: the objective's own, or one joined here
    (an objective that reduces nothing, or a process that failed before its reduction), so that a failure on
    any process stops them all at the same collective instead of leaving the others waiting in a different one."""

    def run(*args):
        _joined[0] = 0
        try:
            value = evaluate(*args)
        except BaseException:
            if not _joined[0]:
                reduce_sums(0.0, 0, failed=True)
            raise
        if not _joined[0]:
            reduce_sums(0.0, 0)
        return value

    return run


def drive(evaluate: Callable, main: Callable[[Callable], R]) -> R:
    """Run `main(evaluate_everywhere)` on the main process while the other processes serve its evaluations;
    every process returns `main`'s result (the others get it by broadcast).

    `evaluate(*args)` must be callable on every process with the same arguments (weights, data set). An error
    in an evaluation on any process raises on all of them (there `PeerError`); `main` decides what follows.
    """
    if world()[1] == 1:
        return main(evaluate)
    evaluate = _agreed(evaluate)
    if not is_main():
        failure: BaseException | None = None
        while (message := _broadcast())[0] == "evaluate":
            try:
                evaluate(*message[1])
            except Exception as err:  # the main process knows it from the reduction; it says what comes next
                failure = failure or err
        if message[1] is None:
            raise failure or BOMergeError("The main process of `accelerate launch` stopped with an error (see "
                                          "its output); this process stops too.")
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
