"""Writing a merge to disk: sharded safetensors written tensor by tensor (a few tensors in memory), and the
staging folder that is renamed into place only when complete (never half a model)."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from .checkpoints import ST_DTYPES, CheckpointSet, TensorInfo
from .durable import DurableFile
from .engine import merged_tensor
from .errors import OutputError
from .layers import Weights

from .defaults import DEFAULT_MAX_SHARD_SIZE  # noqa: F401  (re-exported)
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
AHEAD = 2  # tensors merged ahead of the one being written: bounds the extra memory to two tensors
T = TypeVar("T")
R = TypeVar("R")


def parse_size(size: str | int) -> int:
    """'2GB' → 2_000_000_000; '500MiB' → 524_288_000; an int is bytes.

    >>> parse_size("500MiB")
    524288000
    """
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    if text.isdigit():
        return int(text)
    raise OutputError(f"Cannot read the size {size!r}; write it like 2GB, 500MB or 1GiB.")


def output_infos(ckpts: CheckpointSet, dtype: torch.dtype | None) -> list[TensorInfo]:
    """Names, shapes and dtypes of the merged checkpoint: merged tensors in `dtype` (default: each in the
    reference's dtype, so a mixed-dtype checkpoint stays mixed), copied tensors as the reference has them."""
    return [TensorInfo(i.name, i.shape, dtype if (dtype and ckpts.is_merged(i.name)) else i.dtype)
            for i in ckpts.infos.values()]


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Tensors in order, a new shard whenever the next one would pass `max_shard_size` (as transformers)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def _header(infos: Sequence[TensorInfo]) -> bytes:
    """A safetensors header computed up front from names, shapes and dtypes, so the data can be streamed."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_bytes(f: DurableFile, tensor: torch.Tensor) -> None:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel():
        f.write(flat.view(torch.uint8).numpy())


def ahead(items: Iterable[T], produce: Callable[[T], R], depth: int = AHEAD) -> Iterator[R]:
    """`produce(item)` for every item, in order, computed by one background thread up to `depth` items ahead of
    the consumer: the merge of the next tensors (reading, summing; torch and page faults release the GIL) runs
    while the caller writes this one. An error in `produce` is raised at its item; when the consumer stops
    early, the items not started are cancelled and the one in progress is waited for.

    >>> list(ahead(range(4), lambda x: x * x))
    [0, 1, 4, 9]
    """
    items = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="bomerge-merge") as pool:
        pending = [pool.submit(produce, item) for item in islice(items, depth)]
        try:
            while pending:
                result = pending.pop(0).result()
                for item in items:
                    pending.append(pool.submit(produce, item))
                    break
                yield result
        finally:
            for future in pending:
                future.cancel()


def export_merge(ckpts: CheckpointSet, weights: Weights, out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 progress=None) -> list[Path]:
    """Write Σ wᵢθᵢ into `out_dir` as (sharded) safetensors, tensor by tensor, and return the files written.
    `weights`: one vector, or a `LayerWeights` (each tensor merged with its depth group's vector).

    `out_dir` should be a fresh staging folder (the caller renames it when everything is written).

    >>> export_merge(CheckpointSet(["run/step1", "run/step2"]), [0.5, 0.5], "merged.tmp")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = output_infos(ckpts, dtype)
    shards = plan_shards(infos, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tied = set(ckpts.aliases.values())
    kept: dict[str, torch.Tensor] = {}  # merged tied weights, written again under their other names
    order = [info for shard in shards for info in shard]
    upcoming = islice(order, AHEAD + 1, None)

    def produce(info: TensorInfo) -> torch.Tensor:  # on the merge thread, AHEAD tensors before it is written
        for nxt in upcoming:  # start reading a later tensor from disk (a no-op when it is in the page cache)
            for ckpt in ckpts.checkpoints:
                ckpt.prefetch(ckpts.aliases.get(nxt.name, nxt.name))
            break
        source = ckpts.aliases.get(info.name, info.name)
        tensor = kept.get(source)
        if tensor is None:
            tensor = merged_tensor(ckpts, info.name, weights, dtype)
            if source in tied:
                kept[source] = tensor
        return tensor.to(info.dtype)

    merged = ahead(order, produce)
    try:
        for shard, filename in zip(shards, names):
            with DurableFile(out_dir / filename) as f:  # on disk when closed: before the caller's rename
                f.write(_header(shard))
                for info, tensor in zip(shard, merged):
                    _write_bytes(f, tensor)
                    if progress is not None:
                        progress.update(info.nbytes)
    finally:
        merged.close()  # an error here: stop the merge thread before returning
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                 "weight_map": {i.name: fn for shard, fn in zip(shards, names) for i in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def replace_dir(staging: Path, target: Path) -> None:
    """Move a completed staging folder into place (the old target is removed only after it is complete)."""
    if target.exists():
        backup = target.with_name(target.name + ".old-bomerge")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(target)
