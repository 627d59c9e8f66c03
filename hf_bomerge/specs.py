"""The typed configuration of a run, each part serialized in one place.

- `SourceSpec`: which checkpoints (a Hub repo, a folder or a git repository, and the revisions asked for) and how
  their tensors are read and merged.
- `EvalSpec`: how a merge is scored (held-out data, objective, numerics of the forward passes, confirm part).
- `SearchSpec`: how the weights are searched (space, budget, seeds).
- `FixedSpec`: a merge without a search (explicit weights or a named rule).
- `Recipe` (`hf_bomerge.pinned`): the pinned merge itself (revisions at their commits, weights, dtype, copy
  rule): `bomerge_recipe.yaml`.

A study stores its `Recipe` (without weights), its `SearchSpec` and what its evaluation read (`described`); its
identity (`study_identity`) is derived from them, so resuming with any input changed is refused.

>>> SearchSpec(trials=12).as_dict()["trials"]
12
>>> Recipe.from_dict(Recipe("org/model", ["a"], ["0" * 40], [1.0]).as_dict()).revisions
['a']
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .defaults import DEFAULT_CONFIRM_FRACTION, DEFAULT_MAX_EVAL_TOKENS, DEFAULT_MAX_EVAL_TOKENS_CUDA
from .duplicates import ON_DUPLICATE
from .errors import OptionError, StudyError
from .fields import DCP_CONFIG, DCP_KEY_MAP, DEVICE_MAPS, EVAL_DTYPES, one_of, option, positive, text
from .merging import weights as W
from .pinned import MERGE_DTYPES, Recipe
from .searching.weight_spaces import SEARCHES

DEFAULT_DATASET = "Salesforce/wikitext"
DEFAULT_DATASET_CONFIG = "wikitext-2-raw-v1"


def _ema_alpha() -> Any:  # one declaration for the two specs that read it
    return option(0.2, "EMA's α: the search's EMA baseline, and --method ema", type=float)


@dataclass(frozen=True)
class HeldOutSpec:
    """Which text to evaluate on. A local file is its own single split.

    >>> HeldOutSpec.parse("Salesforce/wikitext:wikitext-103-raw-v1@test").split
    'test'
    """

    dataset: str = option(DEFAULT_DATASET, "Hub dataset id or local file/folder", unset=True)
    config: str | None = option(DEFAULT_DATASET_CONFIG, "dataset config", keyword="dataset_config", unset=True,
                                shown=f"{DEFAULT_DATASET_CONFIG} for the default dataset")
    split: str = option("validation", "the split; a local file is its own single split", unset=True)
    text_column: str = option("text", "the column holding the text")

    @classmethod
    def parse(cls, spec: str, text_column: str = "text") -> HeldOutSpec:
        """`DATASET[:CONFIG][@SPLIT]`, or a path to a local file/folder (used as is)."""
        if Path(spec).expanduser().exists():
            return cls(spec, None, "train", text_column)
        name, _, split = spec.partition("@")
        name, _, config = name.partition(":")
        return cls(name, config or None, split or "validation", text_column)

    @property
    def label(self) -> str:
        if Path(self.dataset).expanduser().exists():
            return Path(self.dataset).name
        return self.dataset + (f":{self.config}" if self.config else "") + f"@{self.split}"


@dataclass(frozen=True)
class SourceSpec:
    """The checkpoints to merge: `source` (a Hub repo id, a folder of checkpoints or a git repository) and
    `revisions` (`last:K`, `A..B`, `A,B,C`), at most `max_checkpoints` (0: no limit); `shas` pins them to
    commits; `tokenizer` (a repo id or folder) when the source has none; `dtype` forces every merged tensor to
    one dtype (None: each keeps its checkpoints' dtype); `trust_remote_code` runs the repo's own model code.

    >>> SourceSpec("EleutherAI/pythia-160m", "last:4").max_checkpoints
    8
    """

    source: str
    revisions: str = option("last:2", "A..B (training order, ends inclusive), R1,R2,..., or last:N")
    max_checkpoints: int = option(8, "keep K evenly spaced; 0 = all", type=int)
    shas: tuple[str, ...] | None = None
    tokenizer: str | None = option(None, "tokenizer for the evaluation and the merge, when the checkpoints have "
                                   "none", metavar="REPO_OR_PATH", shown="the latest revision's, else main's / "
                                   "the folder root's")
    dtype: str | None = option(None, "every merged tensor in this dtype", choices=EVAL_DTYPES,
                               shown="each tensor keeps its checkpoints' dtype")
    trust_remote_code: bool = option(False, "run the repo's own model code", action="store_true")
    on_duplicate: str = option("merge-once", "revisions serving identical weights (same content ids, found before "
                               "any download): merge-once keeps the latest name of each group, error refuses",
                               choices=ON_DUPLICATE)
    config: str | None = option(None, **DCP_CONFIG)  # a folder of distributed checkpoints: the model they train
    key_map: str | None = option(None, **DCP_KEY_MAP)  # ... and how their tensor names map to that model's

    def __post_init__(self):
        one_of("--on-duplicate", self.on_duplicate, ON_DUPLICATE, optional=False)
        if not isinstance(self.revisions, str) or not self.revisions.strip():
            raise OptionError(f"--revisions must name revisions (A..B, R1,R2,... or last:N), got "
                              f"{reprlib.repr(self.revisions)}.")
        positive("--max-checkpoints", self.max_checkpoints, allow_zero=True)
        one_of("--dtype", self.dtype, MERGE_DTYPES)


@dataclass(frozen=True)
class EvalSpec:
    """How a merge is scored: the held-out data, the objective (`loss`, `lm-eval:TASKS` with `lm_eval_tasks` and
    `lm_eval_metric`, or an `evaluate` metric's name or path) and the numerics of the forward passes;
    `confirm_fraction` of the held-out units are kept from a search (a fixed merge is scored on all of them).

    >>> EvalSpec(HeldOutSpec("notes.txt", None, "train")).objective
    'loss'
    """

    data: HeldOutSpec = HeldOutSpec()
    objective: str = option("loss", "loss (mean token NLL, minimized); lm-eval:TASK[,TASK...] (lm-evaluation-harness "
                            "tasks, each scored by lm-eval with its own metric and direction; the lm-eval extra); "
                            "or an `evaluate` metric name or local path (maximized) graded on multiple-choice rows: "
                            "--dataset with columns question, choices (list) and answer (index or text); each "
                            "choice scored by its log-likelihood", metavar="loss|lm-eval:TASKS|METRIC")
    lm_eval_tasks: str | None = option(None, "lm-eval: a folder of task YAMLs (--include_path)", metavar="DIR")
    lm_eval_metric: str | None = option(None, "lm-eval: the metric searched on, METRIC or METRIC,FILTER (its "
                                        "direction is lm-eval's)", metavar="METRIC", shown="the first task's first")
    max_eval_tokens: int | None = option(None, "cap on the tokens evaluated: the held-out text for "
                                  "loss; for a metric, the first questions whose question+choice sequences (all "
                                  "choices) fit in it", type=int,
                                  shown=f"{DEFAULT_MAX_EVAL_TOKENS} on CPU, {DEFAULT_MAX_EVAL_TOKENS_CUDA} on CUDA")
    block_size: int | None = option(None, "tokens per block", type=int, shown="min(model context, 2048)")
    batch_size: int = option(4, "blocks per forward pass (a metric: as many question+choice sequences as fit in "
                             "batch-size x block-size tokens)", type=int)
    eval_dtype: str | None = option(None, "the dtype of the forward passes", choices=EVAL_DTYPES,
                                    shown="float32 on CPU, the checkpoint dtype on CUDA")
    device: str | None = option(None, "cpu, cuda, cuda:1", shown="cuda if available")
    device_map: str | None = option(None, "spread the model (and each device's share of the checkpoints) over all "
                                    "visible GPUs with Accelerate", choices=DEVICE_MAPS, shown="the whole model on --device")
    max_memory: str | int | None = option(None, "memory the run may use per device, e.g. 20GB", shown="what is free")
    confirm_fraction: float = option(DEFAULT_CONFIRM_FRACTION, "held-out blocks kept from the search to confirm "
                                     "the merge on (every 4th: 0.25; 0 = off)", type=float)

    def __post_init__(self):
        if not 0.0 <= self.confirm_fraction < 1.0:
            raise OptionError(f"--confirm-fraction must be in [0, 1), got {self.confirm_fraction}; 0.25 keeps "
                               "every 4th held-out block for the confirm part, 0 turns it off.")
        positive("--max-eval-tokens", self.max_eval_tokens, optional=True)
        positive("--block-size", self.block_size, optional=True)
        positive("--batch-size", self.batch_size)
        one_of("--eval-dtype", self.eval_dtype, EVAL_DTYPES)
        one_of("--device-map", self.device_map, DEVICE_MAPS)
        if not isinstance(self.objective, str) or not self.objective:
            raise OptionError(f"--objective must be loss, lm-eval:TASKS or a metric's name or path: {self.objective!r}.")
        text("--lm-eval-tasks", self.lm_eval_tasks)
        text("--lm-eval-metric", self.lm_eval_metric)
    @classmethod
    def from_options(cls, dataset: str | None = None, dataset_config: str | None = None, split: str | None = None,
                     text_column: str = "text", **options) -> EvalSpec:
        """From the CLI's / keyword API's flat options (`dataset` as `DATASET[:CONFIG][@SPLIT]` or a file)."""
        if dataset is None:  # the default dataset, at the config and split asked for
            return cls(HeldOutSpec(DEFAULT_DATASET, dataset_config or DEFAULT_DATASET_CONFIG, split or "validation",
                                   text_column), **options)
        data = HeldOutSpec.parse(dataset, text_column)
        if not Path(dataset).expanduser().exists():
            data = HeldOutSpec(data.dataset, dataset_config or data.config, split or data.split, text_column)
        return cls(data, **options)

    def planning(self, evaluate: bool = True) -> dict:
        return dict(device=self.device, eval_dtype=self.eval_dtype, batch_size=self.batch_size,
                    block_size=self.block_size, max_memory=self.max_memory, device_map=self.device_map,
                    evaluate=evaluate)


@dataclass(frozen=True)
class SearchSpec:
    """How the weights are searched: the `space` (`auto`, `pairwise`, `simplex`, `family`, `schedule`), the
    budget of `trials` (baselines included), the GP's `seed`, the smallest weight `lambda_min` (pairwise), the EMA
    baseline's `ema_alpha`, depth-wise weights over `layer_groups` groups of blocks (0: one global vector),
    `fallback` to the best baseline when the merge is not better on the confirm part, and `eval_datasets` the
    merge is also scored on.

    >>> SearchSpec(space="schedule", layer_groups=2)
    Traceback (most recent call last):
    ...
    hf_bomerge.errors.StudyError: --layer-groups G (G ≥ 1) searches a simplex weight vector per depth group; it cannot combine with --search schedule (got G=2). Use --search auto or simplex, or leave out --layer-groups.
    """  # noqa: E501 - a doctest shows the whole message

    space: str = option("auto", "how the weights are searched (auto: pairwise for 2 revisions, simplex up to 8, "
                        "schedule beyond)", keyword="search", flag="--search", choices=SEARCHES)
    trials: int = option(20, "total COMPLETE trials of the study, seeds included", type=int)
    seed: int | None = option(0, "the sampler's seed", type=int)
    lambda_min: float = option(0.0, "pairwise lower bound of λ", type=float)
    ema_alpha: float = _ema_alpha()
    layer_groups: int = option(0, "depth-wise weights: a weight vector each for the embeddings, G groups of "
                               "transformer blocks and the head, interpolated between a shallow and a deep vector "
                               "(2·N dimensions; N ≤ 8)", type=int, metavar="G", shown="0 = one global vector")
    fallback: bool = option(False, "export the best baseline instead when the merge is not better on the confirm "
                            "part", action="store_true")
    eval_datasets: tuple[str, ...] = option((), "extra set for the generalization report, repeatable: a Hub "
                                            "dataset or a local file", flag="--eval-dataset", dest="eval_dataset",
                                            action="append",
                                            metavar="DATASET[:CONFIG][@SPLIT]", shown="none")

    def __post_init__(self):
        one_of("--search", self.space, SEARCHES, optional=False)
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise OptionError(f"--trials must be a whole number of at least 1 (the baselines count), got "
                              f"{self.trials!r}.")
        if not isinstance(self.lambda_min, (int, float)) or not 0.0 <= self.lambda_min < 1.0:
            raise OptionError(f"--lambda-min must be in [0, 1), got {self.lambda_min!r}.")
        if not isinstance(self.ema_alpha, (int, float)) or not 0.0 < self.ema_alpha <= 1.0:
            raise OptionError(f"--ema-alpha must be in (0, 1], got {self.ema_alpha!r}.")
        if self.layer_groups < 0 or (self.layer_groups and self.space not in ("auto", "simplex", "layered")):
            raise StudyError(f"--layer-groups G (G ≥ 1) searches a simplex weight vector per depth group; it "
                             f"cannot combine with --search {self.space} (got G={self.layer_groups}). Use --search "
                             "auto or simplex, or leave out --layer-groups.")
        if isinstance(self.eval_datasets, str):  # one name, not its letters
            raise OptionError(f"eval_datasets must be a list of datasets, got the string {self.eval_datasets!r}.")
        object.__setattr__(self, "eval_datasets", tuple(self.eval_datasets))

    def as_dict(self) -> dict:
        return {**asdict(self), "eval_datasets": list(self.eval_datasets)}

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchSpec:
        """A study's recorded search (keys of a newer version ignored; a value of the wrong type refused)."""
        spec = {k: v for k, v in data.items() if k in _SEARCH_TYPES}
        for key, value in spec.items():
            if type(value) not in _SEARCH_TYPES[key]:
                raise StudyError(f"The study records its search setting {key} as {reprlib.repr(value)} (a "
                                 f"{type(value).__name__}, not {' or '.join(t.__name__ for t in _SEARCH_TYPES[key])}): "
                                 "it was edited or written by another tool; re-run the search under a new study name.")
        return cls(**spec)


_SEARCH_TYPES = {"space": (str,), "trials": (int,), "seed": (int, type(None)), "lambda_min": (float, int),
                 "ema_alpha": (float, int), "layer_groups": (int,), "fallback": (bool,), "eval_datasets": (list, tuple)}


@dataclass(frozen=True)
class FixedSpec:
    """A merge without a search: explicit `weights` (oldest revision first), or a named `method` (sma, ema, wma,
    wsm-linear, wsm-cosine, wsm-sqrt; `window` and `tokens_per_step` shape the wsm-* ones).

    >>> FixedSpec(method="wma").weights_for(["step1", "step2"])
    [0.3333333333333333, 0.6666666666666666]
    """

    weights: tuple[float, ...] | None = option(None, "W1,W2,... one per revision, oldest first")
    method: str | None = option(None, "a named rule instead of weights", choices=W.METHODS)
    ema_alpha: float = _ema_alpha()
    window: float | None = option(None, "wsm-* methods: the decay's window in the revisions' progress unit "
                                  "(tokens when their names carry them, e.g. OLMo step1000-tokens4B or "
                                  "train_00220B; else steps, or tokens with --tokens-per-step)", type=float,
                                  metavar="W", shown="their whole span")
    tokens_per_step: float | None = option(None, "tokens per optimizer step: step-named revisions are placed (and "
                                           "--window read) in tokens", type=float, metavar="T",
                                           shown="none: step-named revisions stay in steps")
    allow_extrapolation: bool = option(False, "allow negative/unnormalized weights", action="store_true")

    def __post_init__(self):
        if self.weights is not None and self.method is not None:
            raise OptionError(f"--weights gives the weights and --method {self.method} names a rule that computes "
                              "them: pass one of the two.")
        if self.weights is not None:
            values = tuple(self.weights)
            if not values or not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
                                     for w in values):
                raise OptionError(f"--weights must be finite numbers, one per revision (oldest first), got "
                                  f"{reprlib.repr(self.weights)}.")
            object.__setattr__(self, "weights", values)
        one_of("--method", self.method, W.METHODS)
        if (self.window is not None or self.tokens_per_step is not None) and not (self.method or "").startswith("wsm-"):
            raise OptionError("--window and --tokens-per-step shape a schedule-shaped fixed merge: use them with "
                              "--method wsm-linear, wsm-cosine or wsm-sqrt (--search schedule finds the window "
                              "itself).")
        positive("--window", self.window, optional=True)
        positive("--tokens-per-step", self.tokens_per_step, optional=True)
        if not isinstance(self.ema_alpha, (int, float)) or not 0.0 < self.ema_alpha <= 1.0:
            raise OptionError(f"--ema-alpha must be in (0, 1], got {self.ema_alpha!r}.")
        if self.ema_alpha != _EMA_ALPHA and self.method != "ema":
            raise OptionError(f"--ema-alpha shapes --method ema only; this merge uses "
                              f"{'--weights' if self.weights is not None else '--method ' + (self.method or 'sma')}. "
                              "Drop --ema-alpha, or use --method ema.")

    def weights_for(self, names: Sequence[str]) -> list[float]:
        n = len(names)
        if self.weights is not None:
            return W.check(self.weights, n, self.allow_extrapolation)
        vector = W.rule(self.method or "sma", n, self.ema_alpha, names=list(names), window=self.window,
                        tokens_per_step=self.tokens_per_step)
        return W.check(vector, n, self.allow_extrapolation)


_EMA_ALPHA = SearchSpec.ema_alpha


def study_identity(recipe: Recipe, search: SearchSpec, space_kind: str, evaluation: dict) -> dict:
    """The study's inputs: everything that changes the value of a trial. A study resumed with any of them changed
    is refused (naming the key); the default study name is derived from them."""
    return {"source": recipe.source, "shas": list(recipe.shas), "dtype": recipe.dtype, "space": space_kind,
            "lambda_min": search.lambda_min, "ema_alpha": search.ema_alpha, **evaluation,
            **({"layer_groups": recipe.layer_groups} if recipe.layer_groups else {})}
