"""Writing a merge to disk: sharded safetensors summed chunk by chunk into the file's write buffer (no
tensor-sized memory), and the staging folder that is renamed into place only when complete (never half a model)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ..defaults import DEFAULT_MAX_SHARD_SIZE
from ..errors import OutputError
from ..reading.checkpoints import CheckpointSet, TensorInfo
from ..reading.formats import ST_NAMES as _ST_NAMES
from .durable import DurableFile
from .engine import merge_chunks, merged_tensor
from .layers import Weights


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


def export_merge(ckpts: CheckpointSet, weights: Weights, out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 progress=None) -> list[Path]:
    """Write Σ wᵢθᵢ into `out_dir` as (sharded) safetensors, tensor by tensor, and return the files written.
    `weights`: one vector, or a `LayerWeights` (each tensor merged with its depth group's vector).

    Each weighted tensor is summed chunk by chunk straight into the shard's write buffer (`DurableFile.reserve`),
    which a background thread writes while the next chunks are summed: no tensor-sized memory per tensor. A tied
    tensor (stored under several names) is merged once and kept for its other names.

    `out_dir` should be a fresh staging folder (the caller renames it when everything is written).

    >>> export_merge(CheckpointSet(["run/step1", "run/step2"]), [0.5, 0.5], "merged.tmp")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    infos = output_infos(ckpts, dtype)
    shards = plan_shards(infos, parse_size(max_shard_size))
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    kept: dict[str, torch.Tensor] = {}  # merged tied weights, written again under their other names
    upcoming = iter([info for shard in shards for info in shard][1:])
    for shard, filename in zip(shards, names):
        with DurableFile(out_dir / filename) as f:  # on disk when closed: before the caller's rename
            f.write(_header(shard))
            for info in shard:
                ckpts.check_unchanged()  # a few stats: a file truncated mid-export is an error, not a SIGBUS
                _prefetch(ckpts, next(upcoming, None))
                _write_tensor(f, ckpts, info, weights, dtype, kept)
                if progress is not None:
                    progress.update(info.nbytes)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in infos)},
                 "weight_map": {i.name: fn for shard, fn in zip(shards, names) for i in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / n for n in names]


def _write_tensor(f: DurableFile, ckpts: CheckpointSet, info: TensorInfo, weights: Weights,
                  dtype: torch.dtype | None, kept: dict[str, torch.Tensor]) -> None:
    source = ckpts.aliases.get(info.name, info.name)
    tied = source in ckpts.aliases.values()
    if tied or not ckpts.is_merged(source):  # merged once for every name / copied as stored
        tensor = kept.get(source)
        if tensor is None:
            tensor = merged_tensor(ckpts, info.name, weights, dtype)
            if tied:
                kept[source] = tensor
        f.write(tensor.to(info.dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
    elif info.numel:
        merge_chunks(ckpts, source, weights, info.dtype, lambda start, stop: torch.frombuffer(
            f.reserve((stop - start) * info.dtype.itemsize), dtype=info.dtype))


def _prefetch(ckpts: CheckpointSet, info: TensorInfo | None) -> None:
    """Have the kernel start reading the next tensor from disk while this one is summed (a no-op when cached)."""
    if info is not None:
        for ckpt in ckpts.checkpoints:
            ckpt.prefetch(ckpts.aliases.get(info.name, info.name))


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
