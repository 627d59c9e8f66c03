"""Run under `accelerate launch --multi_gpu --num_processes 2` (two gloo processes on a CPU): hf_bomerge's parallel
driver with an objective that raises on the rank FAIL_RANK, either before the reduction (REDUCE=1) or in an objective
without one."""
import os
import sys

from hf_bomerge.objectives import parallel


def main() -> None:
    fail_rank, reduce = int(os.environ["FAIL_RANK"]), os.environ["REDUCE"] == "1"
    rank, _ = parallel.world()

    def evaluate(x):
        if rank == fail_rank and x == 2:
            raise RuntimeError(f"objective failed on rank {rank}")
        return parallel.reduce_sums(float(x), 1) if reduce else x

    print(parallel.drive(evaluate, lambda everywhere: [everywhere(x) for x in range(4)]), file=sys.stderr)


if __name__ == "__main__":
    main()
