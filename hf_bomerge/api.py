"""The Python API: `search(...)` and `merge(...)` return a `MergeResult`; the CLI and the Space call these.

Each takes its configuration as typed specs (`search_with`, `merge_with`; see `hf_bomerge.specs`) or, for
convenience, as flat keywords. A recorded merge is rebuilt by `from_recipe` / `from_study` (`hf_bomerge.recorded`).

>>> from hf_bomerge import search
>>> result = search("EleutherAI/pythia-160m", revisions="step140000..step143000", trials=12)  # doctest: +SKIP
>>> result.save_pretrained("pythia-160m-bomerge")                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .cli.options import DEFAULTS, OPTIONS, merge_specs, search_specs
from .merging import weights as W
from .merging.engine import rule_from_config
from .merging.layers import LayerGroups
from .objectives import Objective, check_evaluation, objective_class, parallel
from .objectives.confirm import confirm
from .objectives.evaluator import CONFIRM, Evaluator
from .objectives.heldout import HeldOutSpec
from .plan import Plan
from .prepare import Prepared, prepare, resolve, run_plan
from .recorded import from_recipe, from_study, result_of  # noqa: F401  (part of the API)
from .result import Generalization, MergeResult
from .searching.weight_spaces import Layered, space_for
from .sources import default_cache_dir
from .specs import EvalSpec, FixedSpec, Recipe, SearchSpec, SourceSpec, study_identity

if TYPE_CHECKING:  # the study (Optuna, SQLAlchemy) is imported where used: a fixed merge never needs it
    from .searching.study import Trial

logger = logging.getLogger("hf_bomerge")


D = DEFAULTS  # every option's default, read from the specs' fields (`hf_bomerge.cli.options`)


def plan(source: str, revisions: str = DEFAULTS["revisions"], *, max_checkpoints: int = DEFAULTS["max_checkpoints"],
         token: str | bool | None = None, cache_dir: str | Path | None = None,
         on_duplicate: str = D["on_duplicate"], config: str | None = D["config"], key_map: str | None = D["key_map"],
         **kwargs) -> Plan:
    """What a run would download, hold in memory and write, from listings and config.json alone (revisions
    serving identical weights counted once, as a run merges them: `plan.duplicates`).

    >>> print(plan("EleutherAI/pythia-1b", "step100000..step143000").describe())   # doctest: +SKIP
    """
    src, names, pins, note, found = resolve(source, revisions, max_checkpoints, token, cache_dir,
                                            on_duplicate=on_duplicate, options={"config": config, "key_map": key_map})
    result = run_plan(src, names, pins, cache_dir=cache_dir, **kwargs)
    result.source, result.shas, result.note, result.duplicates = src.id, list(pins), note, found.as_dict()
    return result



def search(source: str, revisions: str = D["revisions"], *, dataset: str | None = D["dataset"],
           dataset_config: str | None = D["dataset_config"], split: str | None = D["split"],
           text_column: str = D["text_column"], eval_datasets: Sequence[str] = D["eval_datasets"],
           max_eval_tokens: int | None = D["max_eval_tokens"], block_size: int | None = D["block_size"],
           batch_size: int = D["batch_size"], eval_dtype: str | None = D["eval_dtype"], search: str = D["search"],
           trials: int = D["trials"], lambda_min: float = D["lambda_min"], seed: int | None = D["seed"],
           ema_alpha: float = D["ema_alpha"], max_checkpoints: int = D["max_checkpoints"],
           storage: str | None = None, study_name: str | None = None, device: str | None = D["device"],
           token: str | bool | None = None, cache_dir: str | Path | None = None,
           trust_remote_code: bool = D["trust_remote_code"], dtype: str | None = D["dtype"],
           max_memory: str | int | None = D["max_memory"], device_map: str | None = D["device_map"],
           progress: bool = True, objective: str = D["objective"], lm_eval_tasks: str | None = D["lm_eval_tasks"],
           lm_eval_metric: str | None = D["lm_eval_metric"], on_trial: Callable[[Trial, int, int], None] | None = None,
           confirm_fraction: float = D["confirm_fraction"], fallback: bool = D["fallback"], sampler=None,
           extra_seeds: Sequence[tuple[str, Sequence[float]]] = (), tokenizer: str | None = D["tokenizer"],
           layer_groups: int = D["layer_groups"], on_duplicate: str = D["on_duplicate"],
           config: str | None = D["config"], key_map: str | None = D["key_map"]) -> MergeResult:
    """Search merge weights for `revisions` of `source` with a GP on held-out loss (minimized), on lm-eval tasks
    (`objective="lm-eval:TASK[,TASK...]"`, local task YAMLs in `lm_eval_tasks`, the task's metric or
    `lm_eval_metric`, in lm-eval's direction), or on an `evaluate` metric `objective` (a name or a local path;
    maximized) of multiple-choice questions.

    The keywords are those of `SourceSpec`, `EvalSpec` (`dataset` as `DATASET[:CONFIG][@SPLIT]` or a file) and
    `SearchSpec` (`search` is its `space`), checked as the command line's are (`options.search_specs`); the rest
    are as in `search_with`.

    >>> result = search("EleutherAI/pythia-160m", revisions="last:4", trials=16)   # doctest: +SKIP
    >>> result.weights, result.loss, result.baselines                               # doctest: +SKIP
    >>> search("EleutherAI/pythia-160m", "last:4", objective="./metrics/accuracy", dataset="mc.jsonl")  # doctest: +SKIP
    """
    values = {k: v for k, v in locals().items() if k in OPTIONS}  # the spec options among the keywords
    specs = search_specs(source, **values)
    return search_with(specs.source, specs.evaluation, specs.search, storage=storage, study_name=study_name,
                       token=token, cache_dir=cache_dir, progress=progress, on_trial=on_trial, sampler=sampler,
                       extra_seeds=extra_seeds)


def search_with(source: SourceSpec, evaluation: EvalSpec = EvalSpec(),
                search: SearchSpec = SearchSpec(), *, storage: str | None = None, study_name: str | None = None,
                token: str | bool | None = None, cache_dir: str | Path | None = None, progress: bool = True,
                on_trial: Callable[[Trial, int, int], None] | None = None, sampler=None,
                extra_seeds: Sequence[tuple[str, Sequence[float]]] = ()) -> MergeResult:
    """Search merge weights for `source`, scored as `evaluation` says, searched as `search` says.

    The study (in `storage`, default an SQLite file in the cache; named `study_name`, default derived from the
    inputs) records the pinned revisions, the search spec and what the evaluation read; resuming it with any input
    changed is refused. `on_trial(trial, complete, budget)` is called after every trial (progress in a UI). The
    reported loss and baselines are the saved model's: when the search ran in a less precise dtype than the merge
    is saved in, they are scored again in the saved one.

    For the loss, `evaluation.confirm_fraction` of the held-out blocks (every 4th by default) are kept from the
    search; `result.confirm` reports the merge and every baseline there, with a paired bootstrap 95% interval of
    (merge − best baseline). With `search.fallback`, a merge that is not better there than the best baseline is
    replaced by that baseline (`result.confirm["exported"]` names what was kept). For a metric objective,
    `evaluation.data` holds the columns question, choices and answer (see `tasks`), and `loss`/`baselines` hold
    the metric. `search.layer_groups=G` searches depth-wise weights (`hf_bomerge.merging.layers`): one vector per group
    in `result.layer_weights`; `result.weights` is then their mean weighted by each group's parameter count.

    `sampler`: an Optuna sampler or a factory `(seed, n_seeds) -> sampler` instead of the GP (see
    `study.run_search`); `extra_seeds` [(label, weights)] are evaluated after the baselines (`hf-bomerge watch`
    seeds each round with the previous round's best).

    >>> search_with(SourceSpec("EleutherAI/pythia-160m", "last:4"), search=SearchSpec(trials=16))  # doctest: +SKIP
    """
    from .searching.study import default_storage, default_study_name, run_search, set_study_attr  # optuna: only for a search

    check_evaluation(evaluation)  # before any download: fail fast
    cache = Path(cache_dir or default_cache_dir())
    progress = progress and parallel.is_main()
    with parallel.main_process_first():  # downloads and the tokenized held-out cache, once
        extra = [HeldOutSpec.parse(e, evaluation.data.text_column) for e in search.eval_datasets]
        prep = _prepare(source, token, cache_dir, progress, evaluation.planning(), [*_read(evaluation), *extra])
        space = space_for("simplex" if search.layer_groups else search.space, prep.names, search.lambda_min)
        evaluator = Evaluator.from_spec(evaluation, prep, cache, source)
    rule = None
    if search.layer_groups:  # after the evaluator: the loaded model's parameters decide what is merged
        rule = LayerGroups.from_names(search.layer_groups, prep.ckpts.merged_names)
        space = Layered(len(prep.ckpts), search.lambda_min, groups=rule,
                        sizes=rule.sizes({n: prep.ckpts.infos[n].numel for n in prep.ckpts.merged_names}))
    pins = _pins(prep, source, layer_groups=rule.as_dict() if rule else None)
    described, record = evaluator.described(), dataclasses.replace(search, space=space.kind)
    inputs = study_identity(pins, search, space.kind, evaluator.inputs())
    name = study_name or default_study_name(inputs)
    url = storage or default_storage(cache)
    attrs = {"recipe": pins.as_dict(), "search": record.as_dict(), "evaluation": described}

    def main(evaluate) -> MergeResult:  # on the main process only; `evaluate` runs on all of them
        outcome = run_search(evaluate, space, prep.names, trials=search.trials, storage=url, study_name=name,
                             inputs=inputs, seed=search.seed, ema_alpha=search.ema_alpha, progress=progress,
                             on_trial=on_trial, attrs=attrs, objective=described["objective"], sampler=sampler,
                             extra_seeds=extra_seeds)
        best = dataclasses.replace(pins, weights=outcome.best.weights, layer_weights=outcome.best.layer_weights)
        result = result_of(prep, best, study=name, search=space.kind, trials=len(outcome.trials),
                           trace=outcome.trials, loss=outcome.best.loss, baselines=outcome.baselines, storage=url,
                           budget=search.trials, **described)
        seeds = dict(space.seeds(prep.names, search.ema_alpha))
        if evaluator.needs_rescore:  # the GP ranked in a cheaper dtype; the numbers reported are the saved model's
            # every row, the extra seeds too (watch's warm start): a table in one dtype, a row unknown left out
            scored = {**{t.seed: t.weights for t in outcome.trials if t.seed}, **dict(extra_seeds), **seeds}
            result = dataclasses.replace(
                result, loss=evaluate(result.merge_weights(), None, True),
                baselines={k: evaluate(scored[k], None, True) for k in result.baselines if k in scored},
                eval_dtype=str(evaluator.eval_dtype).removeprefix("torch."))
        if evaluator.confirm_size:
            result = _confirm(result, evaluate, {k: seeds[k] for k in result.baselines if k in seeds},
                              search.fallback, evaluator.objective, evaluator.max_eval_tokens)
        result = dataclasses.replace(result, generalization=_generalization(
            evaluate, extra, result.merge_weights(), outcome, prep.names, result.objective))
        if result.generalization:
            set_study_attr(url, name, "generalization", result.summary()["generalization"])
        if result.confirm:
            set_study_attr(url, name, "confirm", result.confirm.as_dict())
            if result.confirm.exported != "merge":
                set_study_attr(url, name, "exported_weights", result.weights)
        prep.ckpts.check_unchanged()  # the numbers reported are the pinned checkpoints'
        return result

    return parallel.drive(evaluator, main)


def _prepare(source: SourceSpec, token, cache_dir, progress: bool, planning: dict, heldout=()) -> Prepared:
    return prepare(source.source, source.revisions, source.max_checkpoints, token, cache_dir, progress, source.shas,
                   {**planning, "store_dtype": source.dtype}, heldout=heldout, tokenizer=source.tokenizer,
                   on_duplicate=source.on_duplicate, options={"config": source.config, "key_map": source.key_map})


def _read(evaluation: EvalSpec) -> list[HeldOutSpec]:
    """The held-out set the objective scores ([] for one that reads its own data, such as lm-eval's tasks)."""
    return [evaluation.data] if objective_class(evaluation.objective).reads_dataset else []


def _pins(prep: Prepared, source: SourceSpec, **fields) -> Recipe:
    """The revisions as resolved and downloaded, pinned to their commits, with the copy rule the model decided."""
    options = {k: str(Path(v).expanduser().resolve()) if Path(v).expanduser().exists() else v
               for k, v in (("config", source.config), ("key_map", source.key_map)) if v}  # a built-in map by name
    return Recipe(prep.source.id, list(prep.names), list(prep.shas), source_kind=prep.source.kind,
                  dtype=source.dtype, copied=sorted(prep.ckpts.copied), duplicates=prep.duplicates,
                  source_options=options or None, **fields)


def _confirm(result: MergeResult, evaluate, baselines: dict[str, list[float]], fallback: bool,
             objective: Objective, max_eval_tokens: int = 0) -> MergeResult:
    """`result` with the merge and the baselines scored on the confirm part; with `fallback`, the best baseline
    instead of a merge that is not better there."""
    check = confirm(evaluate(result.merge_weights(), CONFIRM, True),
                    {k: evaluate(w, CONFIRM, True) for k, w in baselines.items()},
                    objective.statistic, objective.higher_is_better, unit=objective.confirm_unit,
                    max_eval_tokens=max_eval_tokens, remedy=objective.remedy())
    if not fallback or check.merge_wins:
        return dataclasses.replace(result, confirm=check)
    logger.warning("the merge is not better than %s on the confirm part: --fallback exports %s instead",
                   check.best_baseline, check.best_baseline)
    return dataclasses.replace(result, confirm=dataclasses.replace(check, exported=check.best_baseline),
                               weights=list(baselines[check.best_baseline]), layer_weights=None, layer_groups=None,
                               loss=result.baselines.get(check.best_baseline, result.loss))


def _generalization(evaluate, extra: Sequence[HeldOutSpec], best_weights, outcome, names, objective: str) -> dict:
    """Loss (mean NLL, whatever the objective) of the merge, the best single checkpoint (best on the
    objective) and the uniform average on each extra eval set."""
    from .searching.study import best_of  # optuna: a fixed merge never imports it

    if not extra:
        return {}
    singles = {k: v for k, v in outcome.baselines.items() if k in names}
    best_single = best_of(singles, key=singles.get, objective=objective) if singles else names[-1]
    candidates = {"merged": best_weights, "best_single": W.one_hot(len(names), names.index(best_single)),
                  "uniform": W.uniform(len(names))}
    return {data.label: Generalization(**{k: evaluate(w, data) for k, w in candidates.items()},
                                       best_single_revision=best_single) for data in extra}


def merge(source: str, revisions: str = D["revisions"], *, weights: Sequence[float] | None = D["weights"],
          method: str | None = D["method"], ema_alpha: float = D["ema_alpha"],
          allow_extrapolation: bool = D["allow_extrapolation"], max_checkpoints: int = D["max_checkpoints"],
          evaluate: bool = True, dataset: str | None = D["dataset"], dataset_config: str | None = D["dataset_config"],
          split: str | None = D["split"], text_column: str = D["text_column"],
          max_eval_tokens: int | None = D["max_eval_tokens"], block_size: int | None = D["block_size"],
          batch_size: int = D["batch_size"], eval_dtype: str | None = D["eval_dtype"],
          device: str | None = D["device"], token: str | bool | None = None, cache_dir: str | Path | None = None,
          trust_remote_code: bool = D["trust_remote_code"], dtype: str | None = D["dtype"],
          max_memory: str | int | None = D["max_memory"], device_map: str | None = D["device_map"],
          progress: bool = True, objective: str = D["objective"], lm_eval_tasks: str | None = D["lm_eval_tasks"],
          lm_eval_metric: str | None = D["lm_eval_metric"], shas: Sequence[str] | None = None,
          tokenizer: str | None = D["tokenizer"], window: float | None = D["window"],
          tokens_per_step: float | None = D["tokens_per_step"], on_duplicate: str = D["on_duplicate"],
          config: str | None = D["config"], key_map: str | None = D["key_map"]) -> MergeResult:
    """A fixed merge (explicit `weights` or `method` sma/ema/wma/wsm-linear/wsm-cosine/wsm-sqrt), no search;
    evaluated on the held-out loss or the metric `objective` (as in `search`) unless `evaluate=False`. The
    keywords are those of `SourceSpec`, `FixedSpec` and `EvalSpec`, checked as the command line's are
    (`options.merge_specs`); see `merge_with`.

    >>> merge("EleutherAI/pythia-160m", "last:4", method="ema").save_pretrained("ema")   # doctest: +SKIP
    """
    values = {k: v for k, v in locals().items() if k in OPTIONS}  # the spec options among the keywords
    specs = merge_specs(source, evaluate=evaluate, shas=shas, **values)
    return merge_with(specs.source, specs.fixed, specs.evaluation, token=token, cache_dir=cache_dir,
                      progress=progress)


def merge_with(source: SourceSpec, fixed: FixedSpec = FixedSpec(), evaluation: EvalSpec | None = EvalSpec(), *,
               token: str | bool | None = None, cache_dir: str | Path | None = None,
               progress: bool = True) -> MergeResult:
    """The merge `fixed` describes, scored as `evaluation` says (None: not scored). The wsm-* methods take their
    window in the revisions' progress unit (tokens when the names carry them, else steps, or tokens with
    `tokens_per_step`; default their whole span). Without a tokenizer in the source (and no `source.tokenizer`),
    only `evaluation=None` works: the merge has none.

    >>> merge_with(SourceSpec("EleutherAI/pythia-160m", "last:4"), FixedSpec(method="ema"), None)  # doctest: +SKIP
    """
    if evaluation is not None:
        check_evaluation(evaluation)  # before any download
    progress = progress and parallel.is_main()
    planning = (evaluation or EvalSpec()).planning(evaluate=evaluation is not None)
    with parallel.main_process_first():
        prep = _prepare(source, token, cache_dir, progress, planning, _read(evaluation) if evaluation else [])
    weights = fixed.weights_for(prep.names)
    if evaluation is None:
        rule_from_config(prep.ckpts, prep.folders[-1], source.trust_remote_code)
        return result_of(prep, dataclasses.replace(_pins(prep, source), weights=weights))
    evaluation = dataclasses.replace(evaluation, confirm_fraction=0.0)  # no search: every block is scored
    with parallel.main_process_first():
        evaluator = Evaluator.from_spec(evaluation, prep, Path(cache_dir or default_cache_dir()), source)
    # after the evaluator: the loaded model's parameters decide what is merged
    loss = evaluator(weights, None, True)  # every process scores its share; the sums are reduced
    prep.ckpts.check_unchanged()
    return result_of(prep, dataclasses.replace(_pins(prep, source), weights=weights), loss=loss,
                     **evaluator.described())
