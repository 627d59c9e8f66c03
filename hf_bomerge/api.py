"""The Python API: `search(...)` and `merge(...)` return a `MergeResult`; the CLI and the Space call these.

>>> from hf_bomerge import search
>>> result = search("EleutherAI/pythia-160m", revisions="step140000..step143000", trials=12)  # doctest: +SKIP
>>> result.save_pretrained("pythia-160m-bomerge")                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import parallel
from . import weights as W
from .engine import rule_from_config
from .errors import BOMergeError, StudyError
from .confirm import DEFAULT_CONFIRM_FRACTION, confirm
from .evaluator import CONFIRM, Evaluator

from .heldout import DEFAULT_MAX_EVAL_TOKENS, HeldOutSpec
from .layers import LayerGroups, LayerWeights
from .sources import default_cache_dir
from .plan import Plan
from .prepare import Prepared, prepare, resolve, run_plan
from .result import MergeResult
from .spaces import Layered, space_for
from .tasks import Metric, objective_key

if TYPE_CHECKING:  # the study (Optuna, SQLAlchemy) is imported where used: a fixed merge never needs it
    from .study import Trial

logger = logging.getLogger("hf_bomerge")


@dataclass(frozen=True)
class EvalSpec:
    """How a merge is scored: the held-out data, the objective and the numerics of the forward passes.

    >>> EvalSpec(HeldOutSpec("notes.txt", None, "train")).objective
    'loss'
    """

    data: HeldOutSpec = HeldOutSpec()
    objective: str = "loss"
    max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS
    block_size: int | None = None
    batch_size: int = 4
    eval_dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    max_memory: str | int | None = None
    trust_remote_code: bool = False
    confirm_fraction: float = 0.0

    def evaluator(self, prep: Prepared, cache_dir: Path, store_dtype: str | None) -> Evaluator:
        metric = None if self.objective == "loss" else Metric.load(self.objective)
        return Evaluator(prep, dataset=self.data, max_eval_tokens=self.max_eval_tokens, block_size=self.block_size,
                         batch_size=self.batch_size, eval_dtype=self.eval_dtype, device=self.device,
                         trust_remote_code=self.trust_remote_code, cache_dir=cache_dir, store_dtype=store_dtype,
                         device_map=self.device_map, max_memory=self.max_memory, metric=metric,
                         confirm_fraction=self.confirm_fraction)

    def planning(self, evaluate: bool = True) -> dict:
        return dict(device=self.device, eval_dtype=self.eval_dtype, batch_size=self.batch_size,
                    block_size=self.block_size, max_memory=self.max_memory, device_map=self.device_map,
                    evaluate=evaluate)

    def describe(self, result: MergeResult, evaluator: Evaluator) -> None:
        """Fill in the result's description of the data and numerics."""
        data = self.data
        is_hub = not Path(data.dataset).expanduser().exists()
        result.dataset = data.label
        result.dataset_id = data.dataset if is_hub else None
        result.dataset_config, result.dataset_split = (data.config, data.split) if is_hub else (None, None)
        result.eval_tokens, result.eval_questions = evaluator.eval_tokens, evaluator.eval_questions
        result.eval_dtype = str(evaluator.eval_dtype).removeprefix("torch.")


def plan(source: str, revisions: str = "last:2", *, max_checkpoints: int = 8, token: str | bool | None = None,
         cache_dir: str | Path | None = None, **kwargs) -> Plan:
    """What a run would download, hold in memory and write, from listings and config.json alone.

    >>> print(plan("EleutherAI/pythia-1b", "step100000..step143000").describe())   # doctest: +SKIP
    """
    src, names, pins, note = resolve(source, revisions, max_checkpoints, token, cache_dir)
    result = run_plan(src, names, pins, cache_dir=cache_dir, **kwargs)
    result.source, result.shas, result.note = src.id, list(pins), note
    return result


def _heldout(dataset, dataset_config, split, text_column) -> HeldOutSpec:
    if dataset is None:
        return HeldOutSpec(text_column=text_column)
    spec = HeldOutSpec.parse(dataset, text_column)
    if Path(dataset).expanduser().exists():
        return spec
    return HeldOutSpec(spec.dataset, dataset_config or spec.config, split or spec.split, text_column)


def search(source: str, revisions: str = "last:2", *, dataset: str | None = None,
           dataset_config: str | None = None, split: str | None = None, text_column: str = "text",
           eval_datasets: Sequence[str] = (), max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS,
           block_size: int | None = None, batch_size: int = 4, eval_dtype: str | None = None,
           search: str = "auto", trials: int = 20, lambda_min: float = 0.0, seed: int | None = 0,
           ema_alpha: float = 0.2, max_checkpoints: int = 8, storage: str | None = None,
           study_name: str | None = None, device: str | None = None, token: str | bool | None = None,
           cache_dir: str | Path | None = None, trust_remote_code: bool = False, dtype: str | None = None,
           max_memory: str | int | None = None, device_map: str | None = None, progress: bool = True,
           objective: str = "loss", on_trial: Callable[[Trial, int, int], None] | None = None,
           confirm_fraction: float = DEFAULT_CONFIRM_FRACTION, fallback: bool = False,
           sampler=None, extra_seeds: Sequence[tuple[str, Sequence[float]]] = (),
           tokenizer: str | None = None, layer_groups: int = 0) -> MergeResult:
    """Search merge weights for `revisions` of `source` with a GP on held-out loss (minimized), or on an
    `evaluate` metric `objective` (a name or a local path; maximized) of multiple-choice questions.

    For a metric, `dataset` holds the columns question, choices and answer (see `tasks`), and the
    result's `loss` and `baselines` hold the metric. `on_trial(trial, complete, budget)` is called after
    every trial (for progress in a UI). The reported loss and baselines are the saved model's: when the
    search ran in a less precise dtype than the merge is saved in, they are scored again in the saved one.

    For the loss, `confirm_fraction` of the held-out blocks (every 4th by default) are kept from the search;
    `result.confirm` reports the merge and every baseline there, with a paired bootstrap 95% interval of
    (merge − best baseline). With `fallback=True`, a merge that is not better there than the best baseline
    is replaced by that baseline (`result.confirm["exported"]` names what was kept).
    `sampler`: an Optuna sampler or a factory `(seed, n_seeds) -> sampler` instead of the GP (see
    `study.run_search`).
    `extra_seeds` [(label, weights)] are evaluated after the baselines (`hf-bomerge watch` seeds each round
    with the previous round's best). `tokenizer`: a repo id or folder to take the tokenizer from.
    `layer_groups=G` searches depth-wise weights (`hf_bomerge.layers`, the `layered` space): one weight vector
    per group (embeddings, G groups of blocks, head) in `result.layer_weights`; `result.weights` is then their
    mean weighted by each group's parameter count.

    >>> result = search("EleutherAI/pythia-160m", revisions="last:4", trials=16)   # doctest: +SKIP
    >>> result.weights, result.loss, result.baselines                               # doctest: +SKIP
    >>> search("EleutherAI/pythia-160m", "last:4", objective="./metrics/accuracy", dataset="mc.jsonl")  # doctest: +SKIP
    """
    from .study import default_storage, default_study_name, run_search, set_study_attr

    if not 0.0 <= confirm_fraction < 1.0:
        raise BOMergeError(f"--confirm-fraction must be in [0, 1), got {confirm_fraction}; 0.25 keeps every 4th "
                           "held-out block for the confirm part, 0 turns it off.")
    spec = EvalSpec(_heldout(dataset, dataset_config, split, text_column), objective, max_eval_tokens, block_size,
                    batch_size, eval_dtype, device, device_map, max_memory, trust_remote_code, confirm_fraction)
    if objective != "loss":
        Metric.load(objective)  # before any download: a metric that cannot load fails fast
    _check_layer_groups(search, layer_groups)
    cache = Path(cache_dir or default_cache_dir())
    progress = progress and parallel.is_main()
    with parallel.main_process_first():  # downloads and the tokenized held-out cache, once
        heldout = [spec.data, *(HeldOutSpec.parse(e, text_column) for e in eval_datasets)]
        prep = prepare(source, revisions, max_checkpoints, token, cache_dir, progress, planning=spec.planning(),
                       heldout=heldout, tokenizer=tokenizer)
        space = space_for("simplex" if layer_groups else search, prep.names, lambda_min)  # schedule reads progress from names
        evaluator = spec.evaluator(prep, cache, dtype)
    rule = None
    if layer_groups:  # after the evaluator: the loaded model's parameters decide what is merged
        rule = LayerGroups.from_names(layer_groups, prep.ckpts.merged_names)
        space = Layered(len(prep.ckpts), lambda_min, groups=rule,
                        sizes=rule.sizes({n: prep.ckpts.infos[n].numel for n in prep.ckpts.merged_names}))
    name_of_objective = evaluator.objective.metric.name if objective != "loss" else "loss"
    # Everything that changes the objective's value names the study; resuming with any of it changed is refused.
    inputs = {"source": prep.source.id, "shas": prep.shas, "dataset": spec.data.label,
              "objective": objective_key(objective) if objective != "loss" else "loss", "space": space.kind,
              "lambda_min": lambda_min, "ema_alpha": ema_alpha, "dtype": dtype, **evaluator.identity,
              **({"layer_groups": rule.as_dict()} if rule else {})}
    name = study_name or default_study_name(inputs)
    url = storage or default_storage(cache)
    result = MergeResult(source=prep.source.id, revisions=prep.names, shas=prep.shas, weights=[],
                         objective=name_of_objective, study=name, source_kind=prep.source.kind, search=space.kind,
                         dtype=dtype, copied=sorted(prep.ckpts.copied), license=prep.source.license(),
                         folders=prep.folders, tokenizer_folder=prep.tokenizer_folder, storage=url, budget=trials,
                         layer_groups=rule.as_dict() if rule else None)
    spec.describe(result, evaluator)
    recipe = {**result.recipe(), "search": space.kind, "dataset": result.dataset, "dataset_id": result.dataset_id,
              "dataset_config": result.dataset_config, "dataset_split": result.dataset_split,
              "eval_tokens": result.eval_tokens, "eval_questions": result.eval_questions,
              "objective": name_of_objective, "revisions": prep.names, "shas": prep.shas,
              **({"layer_groups": rule.as_dict()} if rule else {})}

    def main(evaluate) -> MergeResult:  # on the main process only; `evaluate` runs on all of them
        outcome = run_search(evaluate, space, prep.names, trials=trials, storage=url, study_name=name,
                             inputs=inputs, seed=seed, ema_alpha=ema_alpha, progress=progress, on_trial=on_trial,
                             recipe=recipe, objective=name_of_objective, sampler=sampler,
                             extra_seeds=extra_seeds)
        result.weights, result.loss, result.baselines = outcome.best.weights, outcome.best.loss, outcome.baselines
        result.layer_weights = outcome.best.layer_weights
        result.trials, result.trace = len(outcome.trials), outcome.trials
        seeds = dict(space.seeds(prep.names, ema_alpha))
        if evaluator.needs_rescore:  # the GP ranked in a cheaper dtype; the numbers reported are the saved model's
            result.loss = evaluate(result.merge_weights(), None, True)
            result.baselines = {k: evaluate(seeds[k], None, True) if k in seeds else v
                                for k, v in result.baselines.items()}
            result.eval_dtype = str(evaluator.eval_dtype).removeprefix("torch.")
        if evaluator.confirm_blocks:
            _confirm(result, evaluate, {k: seeds[k] for k in result.baselines if k in seeds}, fallback)
        result.generalization = _generalization(evaluate, eval_datasets, text_column, result.merge_weights(), outcome,
                                                prep.names, name_of_objective)
        for key in ("generalization", "confirm"):
            if getattr(result, key):
                set_study_attr(url, name, key, getattr(result, key))
        if result.confirm and result.confirm["exported"] != "merge":
            set_study_attr(url, name, "exported_weights", result.weights)
        return result

    return parallel.drive(evaluator, main)


def _confirm(result: MergeResult, evaluate, baselines: dict[str, list[float]], fallback: bool) -> None:
    """Score the merge and the baselines on the confirm part; with `fallback`, keep the best baseline instead
    of a merge that is not better there."""
    check = confirm(evaluate(result.merge_weights(), CONFIRM, True),
                    {k: evaluate(w, CONFIRM, True) for k, w in baselines.items()})
    result.confirm = {**check.as_dict(), "exported": "merge"}
    if fallback and check.loss >= check.baselines[check.best_baseline]:
        logger.warning("the merge is not better than %s on the confirm part: --fallback exports %s instead",
                       check.best_baseline, check.best_baseline)
        result.weights, result.layer_weights, result.layer_groups = list(baselines[check.best_baseline]), None, None
        result.loss = result.baselines.get(check.best_baseline, result.loss)
        result.confirm["exported"] = check.best_baseline


def _check_layer_groups(search: str, layer_groups: int) -> None:
    if layer_groups < 0 or (layer_groups and search not in ("auto", "simplex", "layered")):
        raise StudyError(f"--layer-groups G (G ≥ 1) searches a simplex weight vector per depth group; it cannot "
                         f"combine with --search {search} (got G={layer_groups}). Use --search auto or simplex, "
                         "or leave out --layer-groups.")


def from_study(study_name: str | None = None, storage: str | None = None, *, token: str | bool | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> MergeResult:
    """The best merge of an existing study (e.g. one that several workers ran), ready to `save_pretrained`.

    Without `study_name`, the storage must hold exactly one study.

    >>> from_study("bomerge-pythia-1b-0123abcd", "postgresql+psycopg://db/bomerge").save_pretrained("out")  # doctest: +SKIP
    """
    from .study import default_storage, load_study, study_outcome

    url = storage or default_storage(cache_dir)
    study = load_study(url, study_name)
    recipe = study.user_attrs.get("recipe") or {}
    if not recipe.get("revisions"):
        raise StudyError(f"Study {study.study_name!r} records no recipe (an older hf-bomerge made it); re-run "
                         "the search that made it.")
    outcome = study_outcome(study, recipe["revisions"], recipe.get("objective", "loss"))
    weights = study.user_attrs.get("exported_weights") or outcome.best.weights  # a --fallback kept a baseline
    layered = None if study.user_attrs.get("exported_weights") else outcome.best.layer_weights
    result = _fixed(recipe["source"], ",".join(recipe["revisions"]), weights, token=token,
                    cache_dir=cache_dir, progress=progress, shas=recipe["shas"], dtype=recipe.get("dtype"),
                    copied=recipe.get("copied"), layer_weights=layered, layer_groups=recipe.get("layer_groups"))
    result.loss, result.baselines, result.trials = outcome.best.loss, outcome.baselines, len(outcome.trials)
    result.study, result.search, result.dataset = study.study_name, recipe.get("search"), recipe.get("dataset")
    result.dataset_id, result.dataset_config = recipe.get("dataset_id"), recipe.get("dataset_config")
    result.dataset_split, result.eval_tokens = recipe.get("dataset_split"), recipe.get("eval_tokens", 0)
    result.objective, result.eval_questions = recipe.get("objective", "loss"), recipe.get("eval_questions", 0)
    result.eval_dtype = (study.user_attrs.get("inputs") or {}).get("eval_dtype")
    result.generalization, result.trace = study.user_attrs.get("generalization", {}), outcome.trials
    result.confirm = study.user_attrs.get("confirm")
    if study.user_attrs.get("exported_weights"):
        result.loss = outcome.baselines.get(result.confirm["exported"], result.loss)
    result.storage, result.budget = url, len(outcome.trials)
    return result


def _generalization(evaluate, eval_datasets, text_column, best_weights, outcome, names, objective: str) -> dict:
    """Loss (mean NLL, whatever the objective) of the merge, the best single checkpoint (best on the
    objective) and the uniform average on each extra eval set."""
    from .study import best_of

    if not eval_datasets:
        return {}
    singles = {k: v for k, v in outcome.baselines.items() if k in names}
    best_single = best_of(singles, key=singles.get, objective=objective) if singles else names[-1]
    candidates = {"merged": best_weights, "best_single": W.one_hot(len(names), names.index(best_single)),
                  "uniform": W.uniform(len(names))}
    report = {}
    for text in eval_datasets:
        data = HeldOutSpec.parse(text, text_column)
        report[data.label] = {k: evaluate(w, data) for k, w in candidates.items()}
        report[data.label]["best_single_revision"] = best_single
    return report


def merge(source: str, revisions: str = "last:2", *, weights: Sequence[float] | None = None,
          method: str | None = None, ema_alpha: float = 0.2, allow_extrapolation: bool = False,
          max_checkpoints: int = 8, evaluate: bool = True, dataset: str | None = None,
          dataset_config: str | None = None, split: str | None = None, text_column: str = "text",
          max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS, block_size: int | None = None, batch_size: int = 4,
          eval_dtype: str | None = None, device: str | None = None, token: str | bool | None = None,
          cache_dir: str | Path | None = None, trust_remote_code: bool = False, dtype: str | None = None,
          max_memory: str | int | None = None, device_map: str | None = None, progress: bool = True,
          objective: str = "loss", shas: Sequence[str] | None = None, tokenizer: str | None = None,
          window: float | None = None, tokens_per_step: float | None = None) -> MergeResult:
    """A fixed merge (explicit `weights` or `method` sma/ema/wma/wsm-linear/wsm-cosine/wsm-sqrt), no search;
    evaluated on the held-out loss or the metric `objective` (as in `search`) unless `evaluate=False`. The wsm-*
    methods take `window` in the revisions' progress unit (tokens when the names carry them, else steps, or
    tokens with `tokens_per_step`; default their whole span). Without a tokenizer in the source (and no
    `tokenizer` repo id or folder), only `evaluate=False` works: the merge has none.

    >>> merge("EleutherAI/pythia-160m", "last:4", method="ema").save_pretrained("ema")   # doctest: +SKIP
    """
    spec = EvalSpec(_heldout(dataset, dataset_config, split, text_column), objective, max_eval_tokens, block_size,
                    batch_size, eval_dtype, device, device_map, max_memory, trust_remote_code)
    if evaluate and objective != "loss":
        Metric.load(objective)  # before any download
    progress = progress and parallel.is_main()
    with parallel.main_process_first():
        prep = prepare(source, revisions, max_checkpoints, token, cache_dir, progress, shas, spec.planning(evaluate),
                       heldout=[spec.data], tokenizer=tokenizer)
    n = len(prep.names)
    rule = dict(names=prep.names, window=window, tokens_per_step=tokens_per_step)
    weights = W.check(W.rule(method or "sma", n, ema_alpha, **rule) if weights is None else weights, n,
                      allow_extrapolation)
    result = _result(prep, weights, dtype)
    if not evaluate:
        rule_from_config(prep.ckpts, prep.folders[-1], trust_remote_code)
        result.copied = sorted(prep.ckpts.copied)
        return result
    with parallel.main_process_first():
        evaluator = spec.evaluator(prep, Path(cache_dir or default_cache_dir()), dtype)
    result.copied = sorted(prep.ckpts.copied)  # the loaded model's parameters decide what is merged
    result.objective = evaluator.objective.metric.name if objective != "loss" else "loss"
    result.loss = evaluator(result.weights, None, True)  # every process scores its share; the sums are reduced
    spec.describe(result, evaluator)
    return result


def _result(prep: Prepared, weights: Sequence[float], dtype: str | None) -> MergeResult:
    return MergeResult(source=prep.source.id, revisions=prep.names, shas=prep.shas, weights=list(weights),
                       source_kind=prep.source.kind, dtype=dtype, license=prep.source.license(), folders=prep.folders,
                       tokenizer_folder=prep.tokenizer_folder)


def _fixed(source: str, revisions: str, weights: Sequence[float], *, shas: Sequence[str], dtype: str | None,
           copied: Sequence[str] | None, token, cache_dir, progress: bool, layer_weights: dict | None = None,
           layer_groups: dict | None = None) -> MergeResult:
    """A recorded merge, pinned to its commits, with its recorded copy rule (and, for a layered merge, its
    per-group weights and grouping rule, checked against these checkpoints): nothing is evaluated."""
    prep = prepare(source, revisions, 0, token, cache_dir, progress and parallel.is_main(), shas,
                   EvalSpec().planning(evaluate=False))
    if copied is None:  # a recipe from before the rule was recorded: derive it as a fixed merge would
        rule_from_config(prep.ckpts, prep.folders[-1])
    else:
        prep.ckpts.copied = frozenset(copied)
    result = _result(prep, W.check(weights, len(prep.names), True), dtype)
    result.copied = sorted(prep.ckpts.copied)
    if layer_weights is not None:
        result.layer_weights, result.layer_groups = _layered(prep, layer_weights, layer_groups)
    return result


def _layered(prep: Prepared, layer_weights: dict, layer_groups: dict | None) -> tuple[dict, dict]:
    """A recorded layered merge, its rule checked against these checkpoints' tensors."""
    try:
        recorded = LayerGroups.from_dict(layer_groups or {})
    except (KeyError, TypeError, ValueError) as err:
        raise BOMergeError(f"The recipe has layer_weights but no valid layer_groups ({err!r}); it needs both, "
                           "as hf-bomerge writes them.") from err
    rule = LayerGroups.from_names(recorded.groups, prep.ckpts.merged_names)
    changed = [k for k, v in rule.as_dict().items() if k in ("blocks", "embeddings") and layer_groups.get(k, v) != v]
    if changed:
        raise BOMergeError(f"The recipe's grouping rule ({', '.join(changed)} pattern) differs from this "
                           "hf-bomerge's, so its tensors would fall into other groups; use the hf-bomerge version "
                           "that wrote it (hf_bomerge_version in the recipe).")
    if rule != recorded:
        raise BOMergeError(f"The recipe groups {recorded.layers} transformer blocks, but these checkpoints have "
                           f"{rule.layers}; it was made for another model.")
    merge = LayerWeights.from_dict(rule, layer_weights)
    for vector in merge.vectors:
        W.check(vector, len(prep.names), True)
    return merge.as_dict(), rule.as_dict()


def from_recipe(path: str | Path, *, token: str | bool | None = None, cache_dir: str | Path | None = None,
                progress: bool = True) -> MergeResult:
    """The merge a `bomerge_recipe.yaml` describes, pinned to its commits, ready to `save_pretrained`.

    >>> from_recipe("merged/bomerge_recipe.yaml").save_pretrained("again")   # doctest: +SKIP
    """
    import yaml

    try:
        recipe = yaml.safe_load(Path(path).read_text())
        names = [r["name"] for r in recipe["revisions"]]
        shas = [r["sha"] for r in recipe["revisions"]]
        source, weights = recipe["source"], recipe["weights"]
        layered = (recipe.get("layer_weights"), recipe.get("layer_groups"))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise BOMergeError(f"Cannot read the recipe {path}: {err}. A recipe is the bomerge_recipe.yaml "
                           "that hf-bomerge writes next to a merged model.") from err
    return _fixed(source, ",".join(names), weights, shas=shas, dtype=recipe.get("dtype"),
                  copied=recipe.get("copied"), token=token, cache_dir=cache_dir, progress=progress,
                  layer_weights=layered[0], layer_groups=layered[1])
