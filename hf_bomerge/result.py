"""`MergeResult`: what a merge is (revisions pinned to shas, their weights, how it scored), and nothing else.

Writing and publishing it live in `hf_bomerge.export`; the methods below are conveniences that call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .layers import LayerGroups, LayerWeights
from .specs import Recipe

# 2: schema 1 + `eval_dtype`, `confirm` and `layer_weights` (README, the --json row).
SCHEMA = 2
JSON_KEYS = ("source", "revisions", "shas", "weights", "objective", "loss", "baselines", "generalization",
             "trials", "study", "output", "eval_dtype", "confirm", "layer_weights")


@dataclass
class MergeResult:
    """A merge: the revisions (oldest first, pinned to shas), their weights, and how it scored.

    The fields in `JSON_KEYS` are the `--json` object (`summary()`); `recipe()` is what rebuilds it.
    `loss` and `baselines` hold the objective's values: the mean token NLL, or the metric when `objective`
    names one (higher is better). `eval_dtype` is the dtype those numbers were computed in.

    >>> r = MergeResult("EleutherAI/pythia-160m", ["step142000", "step143000"], ["a" * 40, "b" * 40], [0.3, 0.7])
    >>> r.summary()["weights"]
    [0.3, 0.7]
    """

    source: str
    revisions: list[str]
    shas: list[str]
    weights: list[float]
    objective: str = "loss"
    loss: float | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    generalization: dict[str, dict[str, float]] = field(default_factory=dict)
    trials: int = 0
    study: str | None = None
    output: str | None = None
    eval_dtype: str | None = None
    # The held-out confirm part, never seen by the search: {"loss", "baselines", "best_baseline", "interval",
    # "blocks", "exported"} (None for fixed merges and metric objectives).
    confirm: dict | None = None
    # A layered merge (`--layer-groups`): {group: weights} shallow to deep; `weights` then holds their mean
    # weighted by each group's parameter count, and `layer_groups` the rule tensor name -> group.
    layer_weights: dict[str, list[float]] | None = None
    layer_groups: dict | None = None
    # Not part of --json: what is needed to write and describe the merge.
    source_kind: str = "hub"
    search: str | None = None
    dataset: str | None = None  # the held-out set's label, DATASET[:CONFIG]@SPLIT or a file name
    dataset_id: str | None = None  # a Hub dataset id (None for a local file)
    dataset_config: str | None = None
    dataset_split: str | None = None
    eval_tokens: int = 0
    eval_questions: int = 0  # a metric objective: how many multiple-choice questions were scored
    dtype: str | None = None  # --dtype: every merged tensor in this dtype (None: each in the checkpoints' own)
    copied: list[str] = field(default_factory=list)  # float tensors copied from the latest revision, not weighted
    license: str | None = None
    note: str | None = None  # one sentence the card adds after its opening paragraph (the demo cites a benchmark)
    trace: list = field(default_factory=list, repr=False)  # the study's trials, for the card's plot
    folders: list[Path] = field(default_factory=list, repr=False)
    tokenizer_folder: Path | None = field(default=None, repr=False)
    # {weight file: (device, inode, size, mtime)} as the run read them: the export refuses files changed since
    stamps: dict | None = field(default=None, repr=False)
    storage: str | None = field(default=None, repr=False)  # the study's storage URL, and its budget
    budget: int = 0

    @property
    def dataset_is_hub(self) -> bool:
        return self.dataset_id is not None

    def merge_weights(self) -> list[float] | LayerWeights:
        """What the merge applies: `weights`, or the `LayerWeights` of a layered merge."""
        if self.layer_weights is None:
            return list(self.weights)
        return LayerWeights.from_dict(LayerGroups.from_dict(self.layer_groups), self.layer_weights)

    def summary(self) -> dict:
        """The `--json` object."""
        return {"schema": SCHEMA, **{k: getattr(self, k) for k in JSON_KEYS}}

    def recipe(self) -> Recipe:
        """The pinned merge (`bomerge_recipe.yaml`, `Recipe.as_dict`): revisions, weights, dtype and copy rule;
        a layered merge adds `layer_weights` and the grouping rule `layer_groups` (`weights` is their mean)."""
        layered = self.layer_weights is not None
        return Recipe(self.source, list(self.revisions), list(self.shas), list(self.weights), self.source_kind,
                      self.dtype, sorted(self.copied), self.layer_weights, self.layer_groups if layered else None)

    def save_pretrained(self, output: str | Path, **kwargs) -> Path:
        """Write the merged model to `output` (see `hf_bomerge.export.save_pretrained`)."""
        from .export import save_pretrained

        return save_pretrained(self, output, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Publish the merged model (see `hf_bomerge.export.push_to_hub`)."""
        from .export import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
