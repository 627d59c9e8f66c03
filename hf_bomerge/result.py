"""`MergeResult`: what a merge is (revisions pinned to shas, their weights, how it scored), and nothing else.

Writing and publishing it live in `hf_bomerge.publish.export`; the methods below are conveniences that call it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .duplicates import Duplicates
from .merging.layers import LayerGroups, LayerWeights
from .objectives import objective_class
from .objectives.confirm import Confirmation
from .reading.verdict import WindowPhase
from .specs import Recipe

# 2: schema 1 + `eval_dtype`, `confirm` and `layer_weights` (README, the --json row); 3: schema 2 + `duplicates`;
# 4: `loss_part` names what `loss` covers; `confirm` split by document: `units`/`unit` (was `blocks`), `verdict`,
# `max_eval_tokens`, and `interval` null from fewer than 20 units (docs/reference.md); `phase` (the window's stage).
SCHEMA = 4
JSON_KEYS = ("source", "revisions", "shas", "weights", "objective", "loss", "loss_part", "baselines", "generalization",
             "trials", "study", "output", "eval_dtype", "confirm", "layer_weights", "phase", "duplicates")


@dataclass(frozen=True)
class Generalization:
    """The loss (mean NLL, whatever the objective) on one extra eval set of the merge, of the best single
    checkpoint (best on the objective) and of the uniform average. `g["merged"]` reads it as `--json` has it."""

    merged: float
    best_single: float
    uniform: float
    best_single_revision: str

    def as_dict(self) -> dict:
        return {"merged": self.merged, "best_single": self.best_single, "uniform": self.uniform,
                "best_single_revision": self.best_single_revision}

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def get(self, key: str, default=None):
        return self.as_dict().get(key, default)


@dataclass(frozen=True)
class Workspace:
    """Where a merge's inputs are on this machine, and where its study is stored: what writing it needs, not what
    it is. `stamps` records each weight file as the run read it (the export refuses one changed since)."""

    folders: tuple[Path, ...] = ()
    tokenizer_folder: Path | None = None
    stamps: dict | None = None
    storage: str | None = None  # the study's storage URL (may hold a password: never printed as is)
    budget: int = 0  # the study's trial budget, the unit its export is claimed in


@dataclass(frozen=True)
class MergeResult:
    """A merge: the revisions (oldest first, pinned to shas), their weights, and how it scored. Built once, at the
    end of a search or merge, from typed parts; writing or pushing it never changes it (`save_pretrained` returns
    the folder; `dataclasses.replace(result, output=...)` records one).

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
    generalization: dict[str, Generalization] = field(default_factory=dict)
    trials: int = 0
    study: str | None = None
    output: str | None = None
    eval_dtype: str | None = None
    # The held-out confirm part, never seen by the search (None for a fixed merge, or without a confirm part).
    confirm: Confirmation | None = None
    # A layered merge (`--layer-groups`): {group: weights} shallow to deep; `weights` then holds their mean
    # weighted by each group's parameter count, and `layer_groups` the rule tensor name -> group.
    layer_weights: dict[str, list[float]] | None = None
    layer_groups: dict | None = None
    # Revisions asked for but merged once with another: they served identical weights (`hf_bomerge.duplicates`).
    duplicates: Duplicates = field(default_factory=Duplicates)
    # Where in training the window lies (stable, decay, early) and revisions that jump (`hf_bomerge.reading.phase`).
    phase: WindowPhase | None = None
    # Not part of --json: what describes the merge in its card and recipe.
    source_kind: str = "hub"
    source_options: dict[str, str] | None = None  # how the source was opened (a DCP folder's config, key_map)
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
    note: str | None = None  # one paragraph the card adds after its opening one (the demo cites another run's)
    source_name: str | None = None  # the card's words for the source, where its id says nothing (the demo's hash)
    trace: list = field(default_factory=list, repr=False)  # the study's trials, for the card's plot
    workspace: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    def __post_init__(self):  # the typed parts also accept the plain dicts `--json` and a study record hold
        if isinstance(self.confirm, dict):
            higher = objective_class(self.objective).higher_is_better
            object.__setattr__(self, "confirm", Confirmation.from_dict(self.confirm, higher))
        object.__setattr__(self, "duplicates", Duplicates.from_dict(self.duplicates))
        object.__setattr__(self, "phase", WindowPhase.from_dict(self.phase))
        object.__setattr__(self, "generalization", {k: g if isinstance(g, Generalization) else Generalization(**g)
                                                    for k, g in self.generalization.items()})

    @property
    def loss_part(self) -> str | None:
        """What `loss` covers: "search" (a search's search part: the confirm part has its own number), "all"
        (every held-out document: a fixed merge, or a search without a confirm part), None without a loss."""
        return None if self.loss is None else "search" if self.confirm else "all"

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
        out = {"schema": SCHEMA, **{k: getattr(self, k) for k in JSON_KEYS}}
        out["confirm"] = {**self.confirm.as_dict(), "verdict": self.confirm.verdict} if self.confirm else None
        out["generalization"] = {k: g.as_dict() for k, g in self.generalization.items()}
        out["duplicates"] = self.duplicates.as_dict()
        out["phase"] = self.phase.as_dict() if self.phase is not None else None
        return out

    def recipe(self) -> Recipe:
        """The pinned merge (`bomerge_recipe.yaml`, `Recipe.as_dict`): revisions, weights, dtype and copy rule;
        a layered merge adds `layer_weights` and the grouping rule `layer_groups` (`weights` is their mean)."""
        layered = self.layer_weights is not None
        return Recipe(self.source, list(self.revisions), list(self.shas), list(self.weights), self.source_kind,
                      self.dtype, sorted(self.copied), self.layer_weights, self.layer_groups if layered else None,
                      self.duplicates, self.source_options)

    def save_pretrained(self, output: str | Path, **kwargs) -> Path:
        """Write the merged model to `output` and return the folder (see `hf_bomerge.publish.export.save_pretrained`)."""
        from .publish.export import save_pretrained  # heavy (torch): MergeResult stays light

        return save_pretrained(self, output, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Publish the merged model (see `hf_bomerge.publish.export.push_to_hub`)."""
        from .publish.export import push_to_hub  # heavy (torch): MergeResult stays light

        return push_to_hub(self, repo_id, **kwargs)
