"""θ = Σ wᵢ θᵢ: the one arithmetic path of every merge (`weighted_sum_`), and which tensors it applies to.

The trials (`hf_bomerge.merging.mergers`) and the export (`hf_bomerge.merging.writer`) both merge through `weighted_sum_` on
the same `as_sources` form, chunk by chunk in the same order, so they agree bit for bit. Which tensors are
weighted is decided once, by `CheckpointSet.copied`, from the loaded model's parameters (`model_rule`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from ..errors import CheckpointError
from ..reading.checkpoints import CheckpointSet, suffix_rule_suffices
from .layers import Weights, tensor_weights

CHUNK = 1 << 20  # elements of the float32 accumulator: 4 MB, cache-resident (a multiple of any SIMD width)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16."""
    return str(dtype).removeprefix("torch.")


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """Sums are accumulated in float32, or in float64 for float64 tensors (never less than they hold)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Pair(NamedTuple):
    """Two checkpoints held as θ₀ and Δ = θ₁ − θ₀ (in the accumulator dtype), so a trial's merge is one axpy."""

    base: list[torch.Tensor]
    delta: list[torch.Tensor]


def as_sources(per_checkpoint: Sequence[Sequence[torch.Tensor]]) -> Pair | list[list[torch.Tensor]]:
    """The form `weighted_sum_` merges from: a `Pair` for two checkpoints, else the N lists as they are."""
    if len(per_checkpoint) == 2:
        base, top = per_checkpoint
        return Pair(list(base), [t.to(accumulator(t.dtype)) - b.to(accumulator(t.dtype)) for b, t in zip(base, top)])
    return [list(s) for s in per_checkpoint]


def select(sources: Pair | list[list[torch.Tensor]], k: int) -> Pair | list[list[torch.Tensor]]:
    """The sources of the k-th tensor only."""
    return subset(sources, [k])


def subset(sources: Pair | list[list[torch.Tensor]], ks: Sequence[int]) -> Pair | list[list[torch.Tensor]]:
    """The sources of the tensors `ks` only (a layered merge sums each depth group with its own weights)."""
    if isinstance(sources, Pair):
        return Pair([sources.base[k] for k in ks], [sources.delta[k] for k in ks])
    return [[s[k] for k in ks] for s in sources]


def weighted_sum_(out: list[torch.Tensor], sources: Pair | Sequence[Sequence[torch.Tensor]],
                  weights: Sequence[float]) -> None:
    """out[k] = Σᵢ weights[i]·θᵢ[k], accumulated in out's dtype (float32 or float64), in place.

    Two checkpoints: (w₀+w₁)·θ₀ + w₁·Δ, one axpy when the weights sum to 1.
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


def slice_sources(sources: Pair | list[list[torch.Tensor]], start: int, stop: int) -> Pair | list[list[torch.Tensor]]:
    """Elements [start, stop) of the flattened single-tensor sources (as `select` or `as_sources` give)."""
    if isinstance(sources, Pair):
        return Pair([sources.base[0].reshape(-1)[start:stop]], [sources.delta[0].reshape(-1)[start:stop]])
    return [[s[0].reshape(-1)[start:stop]] for s in sources]


def merge_into(flat: torch.Tensor, sources, weights: Sequence[float], store: torch.dtype, check: bool = True) -> bool:
    """Write Σ wᵢθᵢ of one flattened tensor into `flat`, rounded to `store` (the saved dtype): `merge_parts`
    with `flat`'s slices as the targets."""
    return merge_parts(lambda start, stop: flat[start:stop], flat.numel(), sources, weights, store, check)


def merge_parts(out: Callable[[int, int], torch.Tensor], numel: int, sources, weights: Sequence[float],
                store: torch.dtype, check: bool = True) -> bool:
    """Write Σ wᵢθᵢ of one flattened tensor of `numel` elements, rounded to `store` (the saved dtype), CHUNK
    elements at a time: `out(start, stop)` is the memory of elements [start, stop) (a slice of a parameter or a
    tensor, or the export's file buffer, so the merge is summed straight into what is written).

    Each chunk is summed in the accumulator dtype, rounded and written while it is in cache. Returns whether
    every element is finite (True unchecked when `check` is off: a trial's NaN shows in its loss). The one
    loop both the trials and the export run, hence the same bits.
    """
    acc_dtype, acc, finite = accumulator(store), None, True
    for start in range(0, numel, CHUNK):
        stop = min(start + CHUNK, numel)
        target = out(start, stop)
        direct = target.dtype == acc_dtype  # sum straight into the target, then round in place if needed
        if not direct and acc is None:
            acc = torch.empty(min(CHUNK, numel), dtype=acc_dtype, device=target.device)
        part = target if direct else acc[: stop - start]
        weighted_sum_([part], slice_sources(sources, start, stop), weights)
        finite = finite and (not check or _all_finite(part))
        if store != target.dtype:  # a trial: the model holds the merge rounded to the dtype it is saved in
            target.copy_(part.to(store))
        elif not direct:  # the copy rounds to the target's dtype as .to() would, without a temporary
            target.copy_(part)
    return finite


def _all_finite(part: torch.Tensor) -> bool:
    """Whether every element is finite. The sum is finite when they all are (a NaN or inf in any element
    reaches it), and it is one cheap reduction; only when it is not (or it overflowed) are the elements checked
    one by one (`isfinite().all()` alone costs more than the whole weighted sum: benchmarks/README.md)."""
    return math.isfinite(float(part.sum())) or bool(torch.isfinite(part).all())


def merged_tensor(ckpts: CheckpointSet, name: str, weights: Weights, dtype: torch.dtype | None) -> torch.Tensor:
    """One tensor of the merge, in `dtype` (default: the reference's): weighted if the rule says so, else the
    reference's copy. `weights`: one vector for every tensor, or a `LayerWeights` (its group's vector)."""
    info = ckpts.infos[name]
    name = ckpts.aliases.get(name, name)
    if not ckpts.is_merged(name):
        return ckpts.reference.get(name)
    out = torch.empty(info.numel, dtype=dtype or info.dtype)
    merge_chunks(ckpts, name, weights, out.dtype, lambda start, stop: out[start:stop])
    return out.view(info.shape)


def merge_chunks(ckpts: CheckpointSet, name: str, weights: Weights, dtype: torch.dtype,
                 out: Callable[[int, int], torch.Tensor]) -> None:
    """Σ wᵢθᵢ of the weighted tensor `name` in `dtype`, written through `out(start, stop)` (`merge_parts`).
    Refuses a non-finite result, naming the checkpoint that holds NaN/inf; hands the sources' pages back."""
    weights = tensor_weights(weights, name)
    sources = as_sources([[t.reshape(-1)] for t in ckpts.tensors(name)])
    if not merge_parts(out, ckpts.infos[name].numel, sources, weights, dtype):
        for tensor, ckpt in zip(ckpts.tensors(name), ckpts.checkpoints):
            check_finite(tensor, name, ckpt.label)  # name the culprit rather than write a broken model
        raise CheckpointError(f"Merging {name!r} overflowed to inf with weights {list(weights)}.")
    ckpts.release(name)


def check_finite(tensor: torch.Tensor, name: str, label: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise CheckpointError(f"Tensor {name!r} of revision {label!r} holds NaN or inf values: that checkpoint "
                              "is broken (a diverged step or a corrupt file). Leave it out of --revisions.")
    return tensor


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


def stored_params(model: torch.nn.Module, ckpts: CheckpointSet) -> list[tuple[str, str]]:
    """(model parameter name, checkpoint tensor name) of every parameter of `model` (tied ones once)."""
    floating = [n for n, i in ckpts.infos.items() if i.dtype.is_floating_point]
    names = checkpoint_names(model, floating)
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        raise CheckpointError(f"The model has parameters the checkpoints lack: {missing[:3]}; the "
                              "checkpoints do not match the model class of the latest revision's config.")
    return [(n, names[n]) for n, _ in model.named_parameters()]


def model_rule(model: torch.nn.Module, ckpts: CheckpointSet) -> list[tuple[str, str]]:
    """Make `model`'s parameters the rule of what `ckpts` merges (`CheckpointSet.follow_model`); returns
    `stored_params`. The model may live on the `meta` device: only its parameter names are read."""
    params = stored_params(model, ckpts)
    ckpts.follow_model([stored for _, stored in params])
    return params


def rule_from_config(ckpts: CheckpointSet, folder, trust_remote_code: bool = False) -> bool:
    """Derive the rule from the model class of `folder`'s config, built on the `meta` device (no memory).

    Returns False, leaving the name-based rule, when the class cannot be built here (remote code that is not
    trusted, an architecture this transformers lacks). For an architecture where the two rules agree
    (`suffix_rule_suffices`) nothing is built: the name-based rule is the model's.
    """
    if suffix_rule_suffices(folder):
        return True
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model_rule(model, ckpts)
        return True
    except Exception:
        return False
