"""Depth-wise weights (`--layer-groups G`): one weight vector over the N checkpoints per depth group.

A layered merge is still "a weight vector over checkpoints", one per group: `LayerWeights` maps each group to
its vector, and `LayerGroups` is the rule that puts each tensor in a group. The groups, shallow to deep:
`embeddings`, G groups of consecutive transformer blocks (by the block index in the tensor name: `layers.N.`,
`h.N.`, `blocks.N.`), and `head` (the output layer and every other tensor without a block index, e.g. the
final norm). Global weights stay plain lists everywhere; `tensor_weights` and `plain` accept both.

Pure Python (no torch): the search spaces and the CLI import it.

>>> rule = LayerGroups(groups=2, layers=4)
>>> rule.names()
['embeddings', 'blocks 0-1', 'blocks 2-3', 'head']
>>> [rule.group_of(n) for n in ("gpt_neox.embed_in.weight", "gpt_neox.layers.3.mlp.dense_h_to_4h.weight",
...                             "gpt_neox.final_layer_norm.weight", "embed_out.weight")]
[0, 2, 3, 3]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import WeightsError

BLOCK_PATTERN = r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\."
EMBEDDING_PATTERN = (r"(?:^|\.)(?:embed_in|embed_tokens|embed_positions|tok_embeddings|wte|wpe|word_embeddings|"
                     r"position_embeddings|embeddings)(?:\.|$)")
_BLOCK, _EMBEDDING = re.compile(BLOCK_PATTERN), re.compile(EMBEDDING_PATTERN)
MAX_DEPTH_CHECKPOINTS = 8  # 2·N search dimensions


def block_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, from its name (None for embeddings, final norms, the head).

    >>> block_index("model.layers.11.self_attn.q_proj.weight"), block_index("transformer.h.0.attn.c_attn.weight")
    (11, 0)
    """
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def group_key(name: str) -> str | None:
    """The part of a tensor's name that puts it in its depth group (`LayerGroups.group_of`): its block
    (`.layers.3.`), else its embedding (`.embed_in.`), else None (the head).

    >>> group_key("gpt_neox.layers.3.mlp.dense_h_to_4h.weight"), group_key("model.embed_tokens.weight")
    ('.layers.3.', '.embed_tokens.')
    """
    match = _BLOCK.search(name) or _EMBEDDING.search(name)
    return match.group(0) if match else None


@dataclass(frozen=True)
class LayerGroups:
    """The rule tensor name -> group: `groups` (G) groups of consecutive blocks out of `layers` blocks, between
    the embeddings (group 0) and the head (group G+1). Block i is in group 1 + ⌊i·G/L⌋."""

    groups: int
    layers: int

    @classmethod
    def from_names(cls, groups: int, names: Sequence[str]) -> LayerGroups:
        """The rule for a model whose tensors are `names` (the number of blocks is read from them).

        >>> LayerGroups.from_names(1, ["wte.weight", "h.0.attn.weight", "h.1.attn.weight", "ln_f.weight"])
        LayerGroups(groups=1, layers=2)
        """
        indices = [i for i in map(block_index, names) if i is not None]
        if not indices:
            raise WeightsError("--layer-groups needs transformer blocks, but no tensor name holds a block index "
                               f"(layers.N., h.N. or blocks.N.; e.g. {list(names)[:3]}). Merge with global weights "
                               "(leave out --layer-groups).")
        layers = max(indices) + 1
        if not 1 <= groups <= layers:
            raise WeightsError(f"--layer-groups must be between 1 and the model's {layers} transformer blocks, got "
                               f"{groups}.")
        return cls(groups, layers)

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerGroups:
        return cls(int(data["groups"]), int(data["layers"]))

    def as_dict(self) -> dict:
        """The recipe's `layer_groups`: enough to rebuild the rule (the patterns are recorded for readers)."""
        return {"groups": self.groups, "layers": self.layers, "blocks": BLOCK_PATTERN, "embeddings": EMBEDDING_PATTERN}

    def __len__(self) -> int:
        return self.groups + 2

    def names(self) -> list[str]:
        """The groups, shallow to deep: `embeddings`, `blocks A-B` …, `head`."""
        spans = [[i for i in range(self.layers) if 1 + i * self.groups // self.layers == g]
                 for g in range(1, self.groups + 1)]
        return ["embeddings", *(f"blocks {s[0]}-{s[-1]}" if len(s) > 1 else f"block {s[0]}" for s in spans), "head"]

    def group_of(self, name: str) -> int:
        index = block_index(name)
        if index is not None:
            return 1 + min(index, self.layers - 1) * self.groups // self.layers
        return 0 if _EMBEDDING.search(name) else self.groups + 1

    def sizes(self, numels: Mapping[str, int]) -> list[int]:
        """Parameters per group, from {tensor name: element count} of the merged tensors."""
        out = [0] * len(self)
        for name, numel in numels.items():
            out[self.group_of(name)] += int(numel)
        return out

    def depths(self) -> list[float]:
        """Each group's depth t = g/(G+1): 0 for the embeddings, 1 for the head."""
        return [g / (self.groups + 1) for g in range(len(self))]


@dataclass(frozen=True)
class LayerWeights:
    """A layered merge: one weight vector over the checkpoints (oldest first) per group of `rule`.

    >>> lw = LayerWeights.interpolate(LayerGroups(1, 2), [1.0, 0.0], [0.0, 1.0])
    >>> lw.as_dict()
    {'embeddings': [1.0, 0.0], 'blocks 0-1': [0.5, 0.5], 'head': [0.0, 1.0]}
    >>> lw.for_tensor("gpt_neox.layers.1.attention.dense.weight"), lw.mean([1, 2, 1])
    ([0.5, 0.5], [0.5, 0.5])
    """

    rule: LayerGroups
    vectors: tuple[tuple[float, ...], ...]

    @classmethod
    def interpolate(cls, rule: LayerGroups, shallow: Sequence[float], deep: Sequence[float]) -> LayerWeights:
        """wᵍ = (1−t)·shallow + t·deep at each group's depth t (`LayerGroups.depths`); both sum to 1, so does wᵍ.

        Where shallow and deep agree, every group gets exactly that weight (a global seed stays bit-exact)."""
        return cls(rule, tuple(tuple(a if a == b else (1.0 - t) * a + t * b for a, b in zip(shallow, deep))
                               for t in rule.depths()))

    @classmethod
    def from_dict(cls, rule: LayerGroups, data: Mapping[str, Sequence[float]]) -> LayerWeights:
        """From the recipe's / `--json`'s `layer_weights` map (its groups must be the rule's)."""
        if list(data) != rule.names():
            raise WeightsError(f"layer_weights names the groups {list(data)}, but this model's rule with "
                               f"{rule.groups} groups of {rule.layers} blocks gives {rule.names()}; the recipe "
                               "was made for another model.")
        return cls(rule, tuple(tuple(float(w) for w in v) for v in data.values()))

    def as_dict(self) -> dict[str, list[float]]:
        return {name: list(v) for name, v in zip(self.rule.names(), self.vectors)}

    def for_tensor(self, name: str) -> list[float]:
        return list(self.vectors[self.rule.group_of(name)])

    def mean(self, sizes: Sequence[int]) -> list[float]:
        """The groups' vectors averaged with each group's parameter count (the result's `weights`)."""
        total = sum(sizes) or 1
        return [sum(s * v[i] for s, v in zip(sizes, self.vectors)) / total for i in range(len(self.vectors[0]))]

    def is_global(self) -> bool:
        """Every group has the same vector (a global merge written per group)."""
        return all(v == self.vectors[0] for v in self.vectors)


Weights = Sequence[float] | LayerWeights


def tensor_weights(weights: Weights, name: str) -> list[float]:
    """The weight vector applied to tensor `name`: `weights` itself, or its group's for a layered merge."""
    return weights.for_tensor(name) if isinstance(weights, LayerWeights) else list(weights)
