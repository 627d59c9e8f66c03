"""Writing a trial's merge into a loaded model: the N checkpoints resident beside it, or streamed per trial.

Every trial re-binds: the merge is written into the model's live parameters, looked up by name, never into
tensors captured earlier. Some architectures replace a parameter's storage during a forward and cache that
transform (Baichuan2's `NormHead` row-normalizes its weight on the first eval forward, then clears
`first_flag`); `CACHED_TRANSFORMS` says how to reset each such module after a merge. A parameter whose storage
changed in a module the table does not know stops the search with an error naming it: a stale loss is
never reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import BOMergeError
from ..reading.checkpoints import CheckpointSet
from .engine import as_sources, check_finite, merge_into, merged_tensor, model_rule, select, subset, weighted_sum_
from .layers import LayerWeights, Weights, tensor_weights

# Module class name -> attributes to set after every merge, so that the next forward recomputes the cached
# transform of the freshly merged weights (as a fresh process loading the saved model does).
CACHED_TRANSFORMS: dict[str, dict[str, object]] = {
    "NormHead": {"first_flag": True},  # Baichuan2: weight.data = normalize(weight) on the first eval forward
}


class RewrittenParameterError(BOMergeError):
    """A module replaced its parameter during a forward and hf-bomerge does not know how to reset it."""


class _LiveParameters:
    """The model's parameters by name, re-bound on every merge, and the modules to reset after it."""

    def __init__(self, model: torch.nn.Module, ckpts: CheckpointSet):
        self.model = model
        self.pairs = model_rule(model, ckpts)  # (model name, checkpoint name); makes the model the merge rule
        self.resets = [(module, CACHED_TRANSFORMS[type(module).__name__]) for module in model.modules()
                       if type(module).__name__ in CACHED_TRANSFORMS]
        self._written: list[int] | None = None

    def bind(self) -> list[torch.Tensor]:
        """The live parameter tensors; refuses a storage replaced since the last merge by an unknown module."""
        targets = [self.model.get_parameter(name).data for name, _ in self.pairs]
        if self._written is not None:
            for (name, _), target, ptr in zip(self.pairs, targets, self._written):
                if target.data_ptr() != ptr and not self._resettable(name):
                    owner = self.model.get_submodule(name.rpartition(".")[0]) if "." in name else self.model
                    raise RewrittenParameterError(
                        f"The module {type(owner).__name__} ({name.rpartition('.')[0] or 'the model'}) replaced its "
                        f"parameter {name!r} during a forward pass, so it may cache a transform of the weights and "
                        "ignore the next merge. hf-bomerge stops rather than report a stale loss. Add the module "
                        "to hf_bomerge.merging.mergers.CACHED_TRANSFORMS with the attributes that make it recompute, and "
                        "report it as an issue.")
        return targets

    def _resettable(self, name: str) -> bool:
        owner = name.rpartition(".")[0]
        module = self.model.get_submodule(owner) if owner else self.model
        return type(module).__name__ in CACHED_TRANSFORMS

    def written(self, targets: Sequence[torch.Tensor]) -> None:
        for module, attrs in self.resets:
            for attr, value in attrs.items():
                setattr(module, attr, value)
        self._written = [t.data_ptr() for t in targets]


class ResidentMerger:
    """Keeps the N checkpoints beside a loaded model and writes Σ wᵢθᵢ into its parameters per trial.

    Each parameter's N sources live on that parameter's device (so a model spread over devices by
    Accelerate never moves weights between devices during a trial). Each trial's merge is rounded to the
    dtype it will be saved in, so the loss a trial reports is the loss of the model that gets written.

    >>> merger = ResidentMerger(model, ckpts)     # doctest: +SKIP
    >>> merger.apply([0.25, 0.75])                # doctest: +SKIP
    >>> merger.apply(layer_weights)               # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, ckpts: CheckpointSet, store_dtype: torch.dtype | None = None):
        self.live = _LiveParameters(model, ckpts)
        devices = [model.get_parameter(name).device for name, _ in self.live.pairs]
        self.sources = as_sources([[check_finite(c.get(n), n, c.label).to(d) for (_, n), d in zip(self.live.pairs, devices)]
                                   for c in ckpts.checkpoints])
        self.store_dtypes = [store_dtype or ckpts.infos[n].dtype for _, n in self.live.pairs]

    @torch.no_grad()
    def apply(self, weights: Weights) -> None:
        targets = self.live.bind()
        per_tensor = [tensor_weights(weights, name) for _, name in self.live.pairs]
        if targets and targets[0].device.type == "cpu":  # cache-blocked, as the export: the same bits
            for k, target in enumerate(targets):
                merge_into(target.view(-1), select(self.sources, k), per_tensor[k], self.store_dtypes[k], check=False)
        elif all(t.dtype == torch.float32 for t in targets) and torch.float64 not in self.store_dtypes:
            for ks, vector in self._groups(weights, per_tensor):  # merge in place, fused (per depth group)
                weighted_sum_([targets[k] for k in ks], subset(self.sources, ks), vector)
            for target, dtype in zip(targets, self.store_dtypes):
                if dtype != target.dtype:
                    target.copy_(target.to(dtype))
        else:  # a half-precision model: accumulate in float32 (float64 for float64 tensors) anyway
            for k, target in enumerate(targets):
                acc = torch.empty(target.shape, dtype=torch.float64 if self.store_dtypes[k] == torch.float64
                                  else torch.float32, device=target.device)
                weighted_sum_([acc], select(self.sources, k), per_tensor[k])
                target.copy_(acc.to(self.store_dtypes[k]))
        self.live.written(targets)

    def _groups(self, weights: Weights, per_tensor: list[list[float]]) -> list[tuple[list[int], list[float]]]:
        """(tensor indices, weight vector) per distinct vector: one group for global weights."""
        if not isinstance(weights, LayerWeights):
            return [(list(range(len(per_tensor))), list(weights))]
        groups: dict[tuple[float, ...], list[int]] = {}
        for k, vector in enumerate(per_tensor):
            groups.setdefault(tuple(vector), []).append(k)
        return [(ks, list(vector)) for vector, ks in groups.items()]


class StreamedMerger:
    """Writes Σ wᵢθᵢ into a loaded model's parameters per trial, reading the N checkpoints tensor by tensor
    (a few tensors in memory), with the export's arithmetic: the same numbers as `ResidentMerger`.

    >>> StreamedMerger(model, ckpts).apply([0.25, 0.75])   # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, ckpts: CheckpointSet, store_dtype: torch.dtype | None = None):
        self.live = _LiveParameters(model, ckpts)
        self.ckpts, self.store_dtype = ckpts, store_dtype

    @torch.no_grad()
    def apply(self, weights: Weights) -> None:
        targets = self.live.bind()
        for target, (_, name) in zip(targets, self.live.pairs):
            target.copy_(merged_tensor(self.ckpts, name, weights, self.store_dtype).view(target.shape))
        self.live.written(targets)
