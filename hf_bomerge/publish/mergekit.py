"""The merge as a mergekit config (`mergekit_config.yml`): `mergekit-yaml mergekit_config.yml OUT` rebuilds it.

mergekit's `linear` method (0.1.5) sums Σ wᵢθᵢ in float32 (float64 for float64 tensors) and rounds to the
tensor's dtype, as hf-bomerge does, so the config says only what differs from mergekit's defaults:
- `normalize: false`: the weights are applied as they are (mergekit would divide by their float32 sum).
- Per-tensor weights as `weight:` lists of `{filter, value}` (mergekit takes the first filter that is a
  substring of the tensor's name; no filter matches every tensor): the tensors hf-bomerge copies from the latest
  revision get 1 there and 0 elsewhere, each `--layer-groups` group its own vector. The rules are checked here
  against every tensor name of the checkpoints, so each tensor gets exactly the weights hf-bomerge applied.
- `dtype`/`out_dtype` only where `--dtype` changes a tensor's dtype: `out_dtype` rounds once at the end, and
  `dtype` (the accumulator's, float32 or float64: exact for the inputs) is added where mergekit would otherwise
  round to the inputs' dtype first. Without them every tensor keeps its dtype, as in the merged files.

What mergekit cannot write the same way is listed in the file's header (see `NOT_EXACT`).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from ..merging.engine import DTYPES, accumulator, dtype_name
from ..merging.layers import BLOCK_PATTERN, LayerWeights, group_key, tensor_weights
from ..reading.checkpoints import CheckpointSet
from ..sources import source_class

CONFIG_FILE = "mergekit_config.yml"
_BLOCK = re.compile(BLOCK_PATTERN)
NOT_EXACT = "mergekit writes these tensors differently from this folder's weights:"


def mergekit_config(result, ckpts: CheckpointSet) -> str:
    """The YAML text of `result`'s merge (read from `ckpts`, the N checkpoints it was merged from) for mergekit.

    >>> (Path("merged") / CONFIG_FILE).write_text(mergekit_config(result, ckpts))   # doctest: +SKIP
    """
    kind = source_class(result.source_kind)
    refs = [kind.mergekit_model(result.source, sha, c.folder) for sha, c in zip(result.shas, ckpts.checkpoints)]
    rules, differ = weight_rules(ckpts, result.merge_weights())
    store = DTYPES[result.dtype] if result.dtype else None
    dtypes = _dtypes(ckpts, store)
    differ += _cast(ckpts, store) if dtypes else []
    config = {"merge_method": "linear", "parameters": {"normalize": False}, **dtypes,
              "models": [{"model": _model(ref), "parameters": {"weight": _weight(rules, i)}}
                         for i, (ref, _) in enumerate(refs)]}
    header = [f"The merge of {len(refs)} revisions of {result.source} by hf-bomerge, for mergekit:",
              f"  mergekit-yaml {CONFIG_FILE} OUTPUT",
              "writes the tensors of this folder's weights (checked against mergekit 0.1.5). The revisions:",
              *(f"  {ref}: {name} @ {sha}" for (ref, _), name, sha in zip(refs, result.revisions, result.shas)),
              *textwrap.wrap(" ".join(dict.fromkeys(note for _, note in refs if note)), 110)]
    if len(refs) == 2:  # measured: docs/reference.md, Output
        header += ["Two revisions: hf-bomerge sums θ₀ + w₁·(θ₁ − θ₀), mergekit w₀·θ₀ + w₁·θ₁, so a few elements may differ",
                   "by 1 unit in the last place of their dtype."]
    if differ:
        header += [NOT_EXACT, *(f"  {name}: {why}" for name, why in differ)]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False)


def _model(ref: str) -> str | dict:
    """mergekit splits a string at `@` (a revision) and `+` (a LoRA): a local path holding either is a mapping."""
    return {"model": {"path": ref}} if Path(ref).is_absolute() and ("@" in ref or "+" in ref) else ref


def _weight(rules: list[tuple[str | None, tuple[float, ...]]], i: int):
    if len(rules) == 1 and rules[0][0] is None:
        return rules[0][1][i]
    return [{"filter": f, "value": v[i]} if f is not None else {"value": v[i]} for f, v in rules]


def weight_rules(ckpts: CheckpointSet, weights) -> tuple[list, list[tuple[str, str]]]:
    """[(filter or None, weight vector)] giving each floating-point tensor its weights in mergekit's first-match
    order, and the copied tensors mergekit cannot rebuild from any weights (name, why)."""
    n, differ, target = len(ckpts), [], {}
    for name, info in ckpts.infos.items():
        if not info.dtype.is_floating_point:
            continue  # mergekit copies a non-float buffer that every input holds alike; weights do not apply
        if ckpts.is_merged(name):
            target[name] = tuple(tensor_weights(weights, ckpts.aliases.get(name, name)))
        else:
            target[name], why = _copy_weights(ckpts, name, n)
            if why:
                differ.append((name, why))
    default = tuple(weights.vectors[-1]) if isinstance(weights, LayerWeights) else tuple(weights)
    # Candidate rules, shortest first: a copied buffer by its name inside a block (`attention.masked_bias`), a
    # depth group by its block or embedding (`.layers.3.`), the rest by no filter. Any name they miss gets a rule
    # of its own below.
    copied = {_in_block(name): target[name] for name in target if not ckpts.is_merged(name)}
    keys = {}
    if isinstance(weights, LayerWeights):
        keys = {k: target[name] for name in target if ckpts.is_merged(name) and (k := group_key(name))}
    rules = [*copied.items(), *keys.items(), (None, default)]
    exact: dict[str, tuple] = {}
    while wrong := [name for name, want in target.items() if first_match(exact_first(exact, rules), name) != want]:
        exact.update((name, target[name]) for name in wrong)
    return exact_first(exact, rules), differ


def _in_block(name: str) -> str:
    """The part of a tensor's name after its block index (`attention.masked_bias`), or the whole name."""
    match = _BLOCK.search(name)
    return name[match.end():] if match else name


def exact_first(exact: dict[str, tuple], rules: list) -> list:
    """Whole-name rules before the others, longest first: a name is matched by no shorter name's rule first."""
    return [*sorted(exact.items(), key=lambda kv: (-len(kv[0]), kv[0])), *rules]


def first_match(rules: list, name: str) -> tuple | None:
    """mergekit's rule (`config.evaluate_setting`): the first filter that is a substring of the name, or None."""
    return next((v for f, v in rules if f is None or f == "*" or f in name), None)


def _copy_weights(ckpts: CheckpointSet, name: str, n: int) -> tuple[tuple[float, ...], str | None]:
    """The weights under which mergekit's linear sum gives the latest revision's tensor bit for bit: 1 on it and 0
    elsewhere (exact for finite values), else 1/N each (exact for a buffer every revision holds as ±inf, such as
    Pythia's masked_bias, where 0·inf would be NaN); and why neither does, if so."""
    tensors = ckpts.tensors(name)
    try:
        latest = tensors[-1]
        for weights in ((0.0,) * (n - 1) + (1.0,), (1.0 / n,) * n):
            if _same_bits(_linear(tensors, weights), latest):
                return weights, None
        why = "copied from the latest revision here; no weights make mergekit's sum equal it bit for bit"
        return (0.0,) * (n - 1) + (1.0,), why
    finally:
        ckpts.release(name)


def _linear(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """mergekit 0.1.5's `linear` with `normalize: false` (merge_methods/linear.py): zeros in the accumulator dtype,
    one addcmul per input in order, rounded to the inputs' dtype."""
    acc = accumulator(tensors[0].dtype)
    out = torch.zeros(tensors[0].shape, dtype=acc)
    for tensor, weight in zip(tensors, weights):
        out.addcmul_(tensor.to(acc), torch.tensor(weight, dtype=acc))
    return out.to(tensors[0].dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.reshape(-1).view(torch.uint8).equal(
        b.reshape(-1).view(torch.uint8))


def _dtypes(ckpts: CheckpointSet, store: torch.dtype | None) -> dict[str, str]:
    """`out_dtype` (and `dtype`) where `--dtype` changes a weighted tensor's dtype; {} where it changes none."""
    inputs = {c.infos[name].dtype for c in ckpts.checkpoints for name in ckpts.merged_names}
    if store is None or inputs <= {store}:
        return {}
    out = {"out_dtype": dtype_name(store)}
    if not inputs <= {store, torch.float32} or store == torch.float64:  # mergekit would round to them first
        out = {"dtype": dtype_name(accumulator(store)), **out}
    return out


def _cast(ckpts: CheckpointSet, store: torch.dtype) -> list[tuple[str, str]]:
    """The tensors hf-bomerge copies in their own dtype and mergekit's `out_dtype` casts (bool buffers too)."""
    return [(name, f"kept as {dtype_name(info.dtype)} here; mergekit writes it as {dtype_name(store)}")
            for name, info in ckpts.infos.items() if not ckpts.is_merged(name) and info.dtype != store]
