"""θ = Σ wᵢ θᵢ, two ways with one arithmetic path (`weighted_sum_`):

- `export_merge`: disk to disk, tensor by tensor, into sharded safetensors; a few tensors in memory.
- `ResidentMerger`: the N checkpoints held on the model's devices; each trial rewrites the model's
  parameters in place with fused `torch._foreach_*` ops, no allocation and no disk I/O.
- `StreamedMerger`: when the N checkpoints do not fit beside the model, each trial re-reads them tensor
  by tensor (from the page cache when host memory allows), as the export does. Slower, same numbers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .checkpoints import ST_DTYPES, CheckpointSet, TensorInfo, is_merged
from .errors import CheckpointError, OutputError

DEFAULT_MAX_SHARD_SIZE = "2GB"
CHUNK = 1 << 20  # elements of the export's float32 accumulator: 4 MB, cache-resident (a multiple of any SIMD width)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


class Pair(NamedTuple):
    """Two checkpoints held as θ₀ and Δ = θ₁ − θ₀ (float32), so a trial's merge is one axpy per tensor."""

    base: list[torch.Tensor]
    delta: list[torch.Tensor]


def as_sources(per_checkpoint: Sequence[Sequence[torch.Tensor]]) -> Pair | list[list[torch.Tensor]]:
    """The form `weighted_sum_` merges from: a `Pair` for two checkpoints, else the N lists as they are."""
    if len(per_checkpoint) == 2:
        base, top = per_checkpoint
        return Pair(list(base), [t.float() - b.float() for b, t in zip(base, top)])
    return [list(s) for s in per_checkpoint]


def select(sources: Pair | list[list[torch.Tensor]], k: int) -> Pair | list[list[torch.Tensor]]:
    """The sources of the k-th tensor only."""
    if isinstance(sources, Pair):
        return Pair([sources.base[k]], [sources.delta[k]])
    return [[s[k]] for s in sources]


def weighted_sum_(out: list[torch.Tensor], sources: Pair | Sequence[Sequence[torch.Tensor]],
                  weights: Sequence[float]) -> None:
    """out[k] = Σᵢ weights[i]·θᵢ[k], accumulated in out's dtype (float32), in place.

    The one arithmetic path of every merge: export and trials call it on the same `as_sources` form, so
    they agree bit for bit. Two checkpoints: (w₀+w₁)·θ₀ + w₁·Δ, one axpy when the weights sum to 1.
    """
    if isinstance(sources, Pair):
        scale, lam = float(weights[0]) + float(weights[1]), float(weights[1])
        for o, base, delta in zip(out, sources.base, sources.delta):
            if abs(scale - 1.0) < 1e-12:
                torch.add(base, delta, alpha=lam, out=o)
            else:  # extrapolation (--allow-extrapolation): the weights need not sum to 1
                torch.mul(base, scale, out=o)
                o.add_(delta, alpha=lam)
        return
    torch._foreach_copy_(out, list(sources[0]))
    torch._foreach_mul_(out, float(weights[0]))
    for w, src in zip(weights[1:], sources[1:]):
        if w != 0.0:
            torch._foreach_add_(out, list(src), alpha=float(w))


def _slice(sources: Pair | list[list[torch.Tensor]], start: int, stop: int) -> Pair | list[list[torch.Tensor]]:
    """Elements [start, stop) of the flattened single-tensor sources (as `select` or `as_sources` give)."""
    if isinstance(sources, Pair):
        return Pair([sources.base[0].reshape(-1)[start:stop]], [sources.delta[0].reshape(-1)[start:stop]])
    return [[s[0].reshape(-1)[start:stop]] for s in sources]


def parse_size(size: str | int) -> int:
    """'2GB' → 2_000_000_000; '500MiB' → 524_288_000; an int is bytes."""
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
    """Names, shapes and dtypes of the merged checkpoint: merged tensors in `dtype` (default: the
    reference's), buffers as the reference has them."""
    return [TensorInfo(i.name, i.shape, dtype if (dtype and is_merged(i)) else i.dtype)
            for i in ckpts.infos.values()]


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
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
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def merged_tensor(ckpts: CheckpointSet, name: str, weights: Sequence[float], dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of the merge: weighted in float32 if it is a parameter, else the reference's copy.

    Cache-blocked: the float32 accumulator is one CHUNK that stays in cache across the N sources, the
    finiteness check and the cast; element by element the same ops in the same order as a whole-tensor
    merge (`ResidentMerger`), so the same bits (tested).
    """
    info = ckpts.infos[name]
    name = ckpts.aliases.get(name, name)
    if not is_merged(info):
        return ckpts.reference.get(name)
    sources = as_sources([[t] for t in ckpts.tensors(name)])
    out = torch.empty(info.numel, dtype=dtype or info.dtype)
    acc = torch.empty(min(CHUNK, info.numel), dtype=torch.float32)
    for start in range(0, info.numel, CHUNK):
        part = acc[: min(CHUNK, info.numel - start)]
        weighted_sum_([part], _slice(sources, start, start + part.numel()), weights)
        if not torch.isfinite(part).all():  # name the culprit rather than write a broken model
            for tensor, ckpt in zip(ckpts.tensors(name), ckpts.checkpoints):
                _finite(tensor, name, ckpt.label)
            raise CheckpointError(f"Merging {name!r} overflowed to inf with weights {list(weights)}.")
        out[start:start + part.numel()].copy_(part)
    ckpts.release(name)
    return out.view(info.shape)


def _finite(tensor: torch.Tensor, name: str, label: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"Tensor {name!r} of revision {label!r} holds NaN or inf values: that checkpoint "
                              "is broken (a diverged step or a corrupt file). Leave it out of --revisions.")
    return tensor


def _write_bytes(f, tensor: torch.Tensor) -> None:
    flat = tensor.contiguous().reshape(-1)
    if flat.numel():
        f.write(memoryview(flat.view(torch.uint8).numpy()))


def export_merge(ckpts: CheckpointSet, weights: Sequence[float], out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 progress=None) -> list[Path]:
    """Write Σ wᵢθᵢ into `out_dir` as (sharded) safetensors, tensor by tensor.

    `out_dir` should be a fresh staging folder (the caller renames it when everything is written).
    Returns the files written.

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
    for shard, filename in zip(shards, names):
        with open(out_dir / filename, "wb") as f:
            f.write(_header(shard))
            for info in shard:
                source = ckpts.aliases.get(info.name, info.name)
                tensor = kept.get(source)
                if tensor is None:
                    tensor = merged_tensor(ckpts, info.name, weights, dtype)
                    if source in tied:
                        kept[source] = tensor
                if not is_merged(info) and tensor.dtype != info.dtype:
                    tensor = tensor.to(info.dtype)
                _write_bytes(f, tensor)
                if progress is not None:
                    progress.update(info.nbytes)
            f.flush()
            os.fsync(f.fileno())
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


LEGACY_NAMES = {"lm_head.weight": "embed_out.weight"}  # GPT-NeoX (Pythia) files


def checkpoint_names(model: torch.nn.Module, stored: Sequence[str]) -> dict[str, str]:
    """{model parameter name: checkpoint tensor name}.

    transformers renames some stored keys when loading (GPT-NeoX's `embed_out` is now `lm_head`), and a
    checkpoint may carry or lack the base-model prefix; both are undone here, using transformers' own
    renaming rules where this version has them.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    except Exception:  # older transformers: stored names are the model's names
        renamings, apply_renamings = [], None
    renamed = {(apply_renamings(k, renamings) if renamings else k): k for k in stored}
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, _ in model.named_parameters():
        legacy = LEGACY_NAMES.get(name, name)  # for transformers versions without the renaming rule
        for candidate in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}."), legacy):
            if candidate in renamed:
                out[name] = renamed[candidate]
                break
    return out


def stored_params(model: torch.nn.Module, ckpts: CheckpointSet) -> list[tuple[str, torch.nn.Parameter]]:
    """Each parameter of `model` with the name of its tensor in the checkpoints."""
    names = checkpoint_names(model, ckpts.merged_names)
    params = list(model.named_parameters())
    missing = [n for n, _ in params if n not in names]
    if missing:
        raise CheckpointError(f"The model has parameters the checkpoints lack: {missing[:3]}; the "
                              "checkpoints do not match the model class of the latest revision's config.")
    return [(names[n], p) for n, p in params]


class ResidentMerger:
    """Keeps the N checkpoints beside a loaded model and writes Σ wᵢθᵢ into its parameters per trial.

    Each parameter's N sources live on that parameter's device (so a model spread over devices by
    Accelerate never moves weights between devices during a trial).

    >>> merger = ResidentMerger(model, ckpts)     # doctest: +SKIP
    >>> merger.apply([0.25, 0.75])                # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, ckpts: CheckpointSet, store_dtype: torch.dtype | None = None):
        params = stored_params(model, ckpts)
        self.targets = [p.data for _, p in params]
        self.sources = as_sources([[_finite(c.get(n), n, c.label).to(p.device) for n, p in params]
                                   for c in ckpts.checkpoints])
        # Round each trial's merge to the dtype it will be saved in, so the loss a trial reports is the
        # loss of the model that gets written (by default the reference checkpoint's dtype).
        self.store_dtypes = [store_dtype or ckpts.infos[n].dtype for n, _ in params]

    @torch.no_grad()
    def apply(self, weights: Sequence[float]) -> None:
        if self.targets and self.targets[0].device.type == "cpu":
            return self._apply_cpu(weights)
        if all(t.dtype == torch.float32 for t in self.targets):  # merge in place, fused
            weighted_sum_(self.targets, self.sources, weights)
            for target, dtype in zip(self.targets, self.store_dtypes):
                if dtype != target.dtype:
                    target.copy_(target.to(dtype))
            return
        for k, target in enumerate(self.targets):  # a half-precision model: accumulate in float32 anyway
            acc = torch.empty(target.shape, dtype=torch.float32, device=target.device)
            weighted_sum_([acc], select(self.sources, k), weights)
            target.copy_(acc.to(self.store_dtypes[k]))

    def _apply_cpu(self, weights: Sequence[float]) -> None:
        """Cache-blocked, as the export: each chunk is summed, rounded to the saved dtype and written while
        it is in cache (whole-tensor ops stream every tensor through memory once per source). Same bits."""
        for k, target in enumerate(self.targets):
            sources, flat = select(self.sources, k), target.view(-1)
            acc = flat if target.dtype == torch.float32 else torch.empty(min(CHUNK, flat.numel()))
            for start in range(0, flat.numel(), CHUNK):
                stop = min(start + CHUNK, flat.numel())
                part = acc[start:stop] if acc is flat else acc[: stop - start]
                weighted_sum_([part], _slice(sources, start, stop), weights)
                if self.store_dtypes[k] != target.dtype or acc is not flat:
                    flat[start:stop].copy_(part.to(self.store_dtypes[k]))


class StreamedMerger:
    """Writes Σ wᵢθᵢ into a loaded model's parameters per trial, reading the N checkpoints tensor by tensor
    (a few tensors in memory), with the export's arithmetic: the same numbers as `ResidentMerger`.

    >>> StreamedMerger(model, ckpts).apply([0.25, 0.75])   # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, ckpts: CheckpointSet, store_dtype: torch.dtype | None = None):
        self.params = stored_params(model, ckpts)
        self.ckpts, self.store_dtype = ckpts, store_dtype

    @torch.no_grad()
    def apply(self, weights: Sequence[float]) -> None:
        for name, param in self.params:
            param.data.copy_(merged_tensor(self.ckpts, name, weights, self.store_dtype))
