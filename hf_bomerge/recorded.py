"""Merges rebuilt from their record: a `bomerge_recipe.yaml` (`from_recipe`) or a study (`from_study`).

Both pin the revisions to their recorded commits and apply the recorded copy rule (and, for a layered merge, the
recorded per-group weights, checked against these checkpoints); nothing is evaluated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import BOMergeError, StudyError
from .merging import weights as W
from .merging.engine import rule_from_config
from .merging.layers import LayerGroups, LayerWeights
from .objectives import objective_class, parallel
from .objectives.confirm import Confirmation
from .prepare import Prepared, prepare
from .result import Generalization, MergeResult, Workspace
from .specs import EvalSpec, Recipe, SearchSpec


def from_recipe(path: str | Path, *, token: str | bool | None = None, cache_dir: str | Path | None = None,
                progress: bool = True) -> MergeResult:
    """The merge a `bomerge_recipe.yaml` describes, pinned to its commits, ready to `save_pretrained`.

    >>> from_recipe("merged/bomerge_recipe.yaml").save_pretrained("again")   # doctest: +SKIP
    """
    return rebuild(Recipe.load(path), token=token, cache_dir=cache_dir, progress=progress)


def from_study(study_name: str | None = None, storage: str | None = None, *, token: str | bool | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> MergeResult:
    """The best merge of an existing study (e.g. one that several workers ran), ready to `save_pretrained`.

    Without `study_name`, the storage must hold exactly one study.

    >>> from_study("bomerge-pythia-1b-0123abcd", "postgresql+psycopg://db/bomerge").save_pretrained("out")  # doctest: +SKIP
    """
    from .searching.study import default_storage, load_study, study_outcome  # optuna: from_recipe never imports it

    url = storage or default_storage(cache_dir)
    study = load_study(url, study_name)
    attrs = study.user_attrs
    if not {"recipe", "search", "evaluation"} <= set(attrs):
        raise StudyError(f"Study {study.study_name!r} does not record its recipe, search and evaluation (an older "
                         "hf-bomerge made it); re-run the search that made it.")
    pins = Recipe.from_dict(attrs["recipe"], f"the recipe of study {study.study_name!r}", weighted=False)
    described = attrs["evaluation"]
    outcome = study_outcome(study, pins.revisions, described["objective"])
    kept = attrs.get("exported_weights")  # a --fallback kept a baseline
    recipe = dataclasses.replace(pins, weights=kept or outcome.best.weights,
                                 layer_weights=None if kept else outcome.best.layer_weights,
                                 layer_groups=None if kept else pins.layer_groups)
    result = rebuild(recipe, token=token, cache_dir=cache_dir, progress=progress)
    confirmed = attrs.get("confirm")
    if confirmed is not None:
        confirmed = Confirmation.from_dict(confirmed, objective_class(described["objective"]).higher_is_better)
    return dataclasses.replace(
        result, **described, study=study.study_name, search=SearchSpec.from_dict(attrs["search"]).space,
        generalization={k: Generalization(**g) for k, g in attrs.get("generalization", {}).items()},
        confirm=confirmed,
        loss=outcome.baselines.get(confirmed.exported, outcome.best.loss) if kept and confirmed else outcome.best.loss,
        baselines=outcome.baselines, trace=outcome.trials, trials=len(outcome.trials),
        workspace=dataclasses.replace(result.workspace, storage=url, budget=len(outcome.trials)))


def rebuild(recipe: Recipe, *, token, cache_dir, progress: bool) -> MergeResult:
    """A recorded merge, pinned to its commits, with its recorded copy rule (and, for a layered merge, its
    per-group weights and grouping rule, checked against these checkpoints): nothing is evaluated."""
    prep = prepare(recipe.source, ",".join(recipe.revisions), 0, token, cache_dir,
                   progress and parallel.is_main(), recipe.shas, EvalSpec().planning(evaluate=False),
                   options=dict(recipe.source_options or {}))
    if recipe.copied is None:  # a recipe from before the rule was recorded: derive it as a fixed merge would
        rule_from_config(prep.ckpts, prep.folders[-1])
    else:
        prep.ckpts.copied = frozenset(recipe.copied)
    checked = dataclasses.replace(recipe, weights=W.check(recipe.weights, len(prep.names), True),
                                  copied=sorted(prep.ckpts.copied))
    if recipe.layer_weights is not None:
        checked.layer_weights, checked.layer_groups = _layered(prep, recipe.layer_weights, recipe.layer_groups)
    else:
        checked.layer_groups = None
    return result_of(prep, checked)


def result_of(prep: Prepared, recipe: Recipe, *, storage: str | None = None, budget: int = 0,
              **fields) -> MergeResult:
    """The `MergeResult` of `recipe` on the downloaded checkpoints `prep` (other fields from `fields`; `storage`
    and `budget` locate its study)."""
    workspace = Workspace(tuple(prep.folders), prep.tokenizer_folder, prep.ckpts.stamps, storage, budget)
    return MergeResult(source=recipe.source, revisions=list(recipe.revisions), shas=list(recipe.shas),
                       weights=list(recipe.weights), source_kind=recipe.source_kind,
                       source_options=recipe.source_options, dtype=recipe.dtype,
                       copied=list(recipe.copied or []), layer_weights=recipe.layer_weights,
                       layer_groups=recipe.layer_groups, duplicates=recipe.duplicates,
                       license=prep.source.license(), workspace=workspace, phase=prep.phase,
                       **fields)


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
