"""Real distributed checkpoints for the tests: 2 gloo ranks on CPU, every tensor a DTensor sharded `Shard(0)`
over them, saved with `torch.distributed.checkpoint.save` (one `__RANK_0.distcp` per rank, `.metadata` last).

Imports only torch (the ranks are spawned processes). `write(jobs, tmp)` saves each job: (a file holding the
nested state dict to save, torch.save'd; the DCP folder to write).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _shard(value, mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    if isinstance(value, dict):
        return {k: _shard(v, mesh) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return distribute_tensor(value, mesh, [Shard(0)])
    return value


def _rank(rank: int, jobs: list[tuple[str, str]], rendezvous: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for state_file, folder in jobs:
            state = torch.load(state_file, weights_only=True)
            dcp.save(_shard(state, mesh), checkpoint_id=folder)
    finally:
        dist.destroy_process_group()


def write(jobs: list[tuple[str, str]], rendezvous: str) -> None:
    mp.spawn(_rank, args=(jobs, rendezvous), nprocs=2, join=True)
