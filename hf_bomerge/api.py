"""The Python API: `search(...)` and `merge(...)` return a `MergeResult`; the CLI and the Space call these.

>>> from hf_bomerge import search
>>> result = search("EleutherAI/pythia-160m", revisions="step140000..step143000", trials=12)  # doctest: +SKIP
>>> result.save_pretrained("pythia-160m-bomerge")                                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, parallel
from . import weights as W
from .checkpoints import CheckpointSet
from .engine import DEFAULT_MAX_SHARD_SIZE, DTYPES, export_merge, replace_dir
from .errors import BOMergeError, OutputError, StudyError
from .evaluator import Evaluator
from .heldout import DEFAULT_MAX_EVAL_TOKENS, HeldOutSpec
from .hub import SIDE_FILES, default_cache_dir
from .plan import Plan
from .prepare import prepare, resolve, run_plan
from .study import (Trial, best_of, default_storage, default_study_name, load_study, make_space, run_search,
                    set_study_attr, study_outcome)
from .tasks import Metric, objective_key

logger = logging.getLogger("hf_bomerge")
SCHEMA = 1
RECIPE_FILE = "bomerge_recipe.yaml"
RESULT_FILE = "bomerge_result.json"


@dataclass
class MergeResult:
    """What a merge is: the revisions (oldest first, pinned to shas), their weights, and how it scored.

    The public fields are the `--json` object; `save_pretrained` writes the merged model.
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
    # Not part of --json: what is needed to write and describe the merge.
    source_kind: str = "hub"
    search: str | None = None
    dataset: str | None = None
    dataset_is_hub: bool = False
    eval_tokens: int = 0
    eval_questions: int = 0  # a metric objective: how many multiple-choice questions were scored
    dtype: str | None = None
    license: str | None = None
    trace: list = field(default_factory=list, repr=False)  # the study's trials, for the card's plot
    folders: list[Path] = field(default_factory=list, repr=False)
    tokenizer_folder: Path | None = field(default=None, repr=False)
    storage: str | None = field(default=None, repr=False)  # the study's storage URL, and its budget
    budget: int = 0

    def summary(self) -> dict:
        """The `--json` object."""
        keys = ("source", "revisions", "shas", "weights", "objective", "loss", "baselines", "generalization",
                "trials", "study", "output")
        return {"schema": SCHEMA, **{k: getattr(self, k) for k in keys}}

    def recipe(self) -> dict:
        return {"hf_bomerge_version": __version__, "source": self.source, "source_kind": self.source_kind,
                "revisions": [{"name": n, "sha": s} for n, s in zip(self.revisions, self.shas)],
                "weights": self.weights, "dtype": self.dtype}

    def save_pretrained(self, output: str | Path, *, overwrite: bool = False, dtype: str | None = None,
                        max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True) -> Path:
        """Write the merged model (sharded safetensors, config, tokenizer, card, recipe) to `output`.

        Everything is written to a temporary sibling folder that is renamed when complete, so `output`
        never holds half a model. An existing folder is replaced only with `overwrite=True` or when it
        holds an earlier result of the same study.
        """
        import yaml

        from .card import render_card
        from .plot import PLOT_FILE, plot_search

        target = Path(output).expanduser().resolve()
        _check_output(target, self, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        ckpts = CheckpointSet(self.folders, self.revisions)
        self.dtype = dtype or self.dtype or str(ckpts.infos[ckpts.merged_names[0]].dtype).removeprefix("torch.")
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            export_merge(ckpts, self.weights, staging, dtype=DTYPES[self.dtype], max_shard_size=max_shard_size)
            _copy_side_files(self.folders[-1], self.tokenizer_folder, staging, self.dtype)
            self.output = str(target)
            (staging / RECIPE_FILE).write_text(yaml.safe_dump(self.recipe(), sort_keys=False))
            (staging / RESULT_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")
            if self.trace:
                plot_search(self.trace, self.revisions, self.weights, staging / PLOT_FILE, self.objective)
            render_card(self, license=self.license, plot=PLOT_FILE if self.trace else None).save(staging / "README.md")
            replace_dir(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def push_to_hub(self, repo_id: str, *, token: str | None = None, private: bool | None = None,
                    revision: str | None = None, commit_message: str | None = None) -> str:
        """Publish the merged model (saved first if it was not) in one commit; returns the commit URL.

        The card is rendered for `repo_id`. Re-pushing an unchanged folder creates no commit.

        >>> result.push_to_hub("me/pythia-160m-bomerge", private=True)   # doctest: +SKIP
        """
        from .card import render_card
        from .hub import push_folder
        from .plot import PLOT_FILE

        if self.output is None or not Path(self.output).is_dir():
            self.save_pretrained(Path(tempfile.mkdtemp(prefix="bomerge-push-")) / repo_id.split("/")[-1])
        folder = Path(self.output)
        plot = PLOT_FILE if (folder / PLOT_FILE).is_file() else None
        render_card(self, repo_id=repo_id, license=self.license, plot=plot).save(folder / "README.md")
        message = commit_message or f"Upload a merge of {len(self.revisions)} checkpoints of {self.source} (hf-bomerge)"
        return push_folder(folder, repo_id, token=token, private=private, revision=revision, commit_message=message)


def _check_output(target: Path, result: MergeResult, overwrite: bool) -> None:
    if not target.exists() or overwrite:
        return
    previous = target / RESULT_FILE
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("study") and old.get("study") == result.study:
            return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise OutputError(f"{target} already exists and was not written by hf-bomerge for this study; "
                      "choose another --output or pass --overwrite to replace it.")


def _copy_side_files(reference: Path, tokenizer_folder: Path | None, staging: Path, dtype: str) -> None:
    for folder in dict.fromkeys(f for f in (tokenizer_folder, reference) if f is not None):
        for name in SIDE_FILES:
            if (folder / name).is_file() and not (staging / name).exists():
                shutil.copyfile(folder / name, staging / name)
    config = staging / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data or key == "dtype":
                data[key] = str(DTYPES[dtype]).removeprefix("torch.")
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


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
           tokenizer: str | None = None) -> MergeResult:
    """Search merge weights for `revisions` of `source` with a GP on held-out loss (minimized), or on an
    `evaluate` metric `objective` (a name or a local path; maximized) of multiple-choice questions.

    For a metric, `dataset` holds the columns question, choices and answer (see `tasks`), and the
    result's `loss` and `baselines` hold the metric. `on_trial(trial, complete, budget)` is called after
    every trial (for progress in a UI). `tokenizer`: a repo id or folder to take the tokenizer from.

    >>> result = search("EleutherAI/pythia-160m", revisions="last:4", trials=16)   # doctest: +SKIP
    >>> result.weights, result.loss, result.baselines                               # doctest: +SKIP
    >>> search("EleutherAI/pythia-160m", "last:4", objective="./metrics/accuracy", dataset="mc.jsonl")  # doctest: +SKIP
    """
    metric = _metric(objective)  # before any download: a metric that cannot load fails fast
    cache = Path(cache_dir or default_cache_dir())
    planning = dict(device=device, eval_dtype=eval_dtype, batch_size=batch_size, block_size=block_size,
                    max_memory=max_memory, device_map=device_map)
    progress = progress and parallel.is_main()
    spec = _heldout(dataset, dataset_config, split, text_column)
    heldout = [spec, *(HeldOutSpec.parse(e, text_column) for e in eval_datasets)]
    with parallel.main_process_first():  # downloads and the tokenized held-out cache, once
        prep = prepare(source, revisions, max_checkpoints, token, cache_dir, progress, planning=planning,
                       heldout=heldout, tokenizer=tokenizer)
        space = make_space(search, len(prep.ckpts), lambda_min)
        evaluator = Evaluator(prep, prep.ckpts, dataset=spec, block_size=block_size, max_eval_tokens=max_eval_tokens,
                               batch_size=batch_size, eval_dtype=eval_dtype, device=device,
                               trust_remote_code=trust_remote_code, cache_dir=cache, store_dtype=dtype,
                               device_map=device_map, max_memory=max_memory, metric=metric)
    name_of_objective = metric.name if metric else "loss"
    inputs = {"source": prep.source.id, "shas": prep.shas, "dataset": spec.label,
              "objective": objective_key(objective) if metric else "loss", "space": space.kind, "lambda_min": lambda_min, "block_size": evaluator.block_size,
              "max_eval_tokens": max_eval_tokens, "ema_alpha": ema_alpha, "dtype": dtype}
    name = study_name or default_study_name(inputs)
    url = storage or default_storage(cache)
    dataset_is_hub = not Path(spec.dataset).expanduser().exists()
    recipe = {"source": prep.source.id, "source_kind": prep.source.kind, "revisions": prep.names, "shas": prep.shas,
              "search": space.kind, "dataset": spec.label, "dataset_is_hub": dataset_is_hub,
              "eval_tokens": evaluator.eval_tokens, "eval_questions": evaluator.eval_questions, "dtype": dtype,
              "objective": name_of_objective}

    def main(evaluate) -> MergeResult:  # on the main process only; `evaluate` runs on all of them
        outcome = run_search(evaluate, space, prep.names, trials=trials, storage=url, study_name=name,
                             inputs=inputs, seed=seed, ema_alpha=ema_alpha, progress=progress, on_trial=on_trial,
                             recipe=recipe, objective=name_of_objective)
        best = outcome.best
        generalization = _generalization(evaluate, eval_datasets, text_column, best.weights, outcome, prep.names,
                                         name_of_objective)
        if generalization:
            set_study_attr(url, name, "generalization", generalization)
        return MergeResult(
            source=prep.source.id, revisions=prep.names, shas=prep.shas, weights=best.weights,
            objective=name_of_objective, loss=best.loss,
            baselines=outcome.baselines, generalization=generalization, trials=len(outcome.trials), study=name,
            source_kind=prep.source.kind, search=space.kind, dataset=spec.label, dataset_is_hub=dataset_is_hub,
            eval_tokens=evaluator.eval_tokens, eval_questions=evaluator.eval_questions, dtype=dtype, license=prep.source.license(), trace=outcome.trials,
            folders=prep.folders, tokenizer_folder=prep.tokenizer_folder, storage=url, budget=trials)

    return parallel.drive(evaluator, main)


def from_study(study_name: str | None = None, storage: str | None = None, *, token: str | bool | None = None,
               cache_dir: str | Path | None = None, progress: bool = True) -> MergeResult:
    """The best merge of an existing study (e.g. one that several workers ran), ready to `save_pretrained`.

    Without `study_name`, the storage must hold exactly one study.

    >>> from_study("bomerge-pythia-1b-0123abcd", "postgresql+psycopg://db/bomerge").save_pretrained("out")  # doctest: +SKIP
    """
    url = storage or default_storage(cache_dir)
    study = load_study(url, study_name)
    recipe = study.user_attrs.get("recipe") or {}
    if not recipe.get("revisions"):
        raise StudyError(f"Study {study.study_name!r} was not written by hf-bomerge {__version__} or later "
                         "(it records no recipe); re-run the search that made it.")
    outcome = study_outcome(study, recipe["revisions"], recipe.get("objective", "loss"))
    result = merge(recipe["source"], ",".join(recipe["revisions"]), weights=outcome.best.weights,
                   allow_extrapolation=True, evaluate=False, max_checkpoints=0, token=token, cache_dir=cache_dir,
                   progress=progress, shas=recipe["shas"], dtype=recipe.get("dtype"))
    result.loss, result.baselines, result.trials = outcome.best.loss, outcome.baselines, len(outcome.trials)
    result.study, result.search, result.dataset = study.study_name, recipe.get("search"), recipe.get("dataset")
    result.dataset_is_hub, result.eval_tokens = recipe.get("dataset_is_hub", False), recipe.get("eval_tokens", 0)
    result.objective, result.eval_questions = recipe.get("objective", "loss"), recipe.get("eval_questions", 0)
    result.generalization, result.trace = study.user_attrs.get("generalization", {}), outcome.trials
    result.storage, result.budget = url, len(outcome.trials)
    return result


def _metric(objective: str) -> Metric | None:
    return None if objective == "loss" else Metric.load(objective)


def _generalization(evaluate, eval_datasets, text_column, best_weights, outcome, names, objective: str) -> dict:
    """Loss (mean NLL, whatever the objective) of the merge, the best single checkpoint (best on the
    objective) and the uniform average on each extra eval set."""
    if not eval_datasets:
        return {}
    singles = {k: v for k, v in outcome.baselines.items() if k in names}
    best_single = best_of(singles, key=singles.get, objective=objective) if singles else names[-1]
    candidates = {"merged": best_weights, "best_single": W.one_hot(len(names), names.index(best_single)),
                  "uniform": W.uniform(len(names))}
    report = {}
    for text in eval_datasets:
        spec = HeldOutSpec.parse(text, text_column)
        report[spec.label] = {k: evaluate(w, spec) for k, w in candidates.items()}
        report[spec.label]["best_single_revision"] = best_single
    return report


def merge(source: str, revisions: str = "last:2", *, weights: Sequence[float] | None = None,
          method: str | None = None, ema_alpha: float = 0.2, allow_extrapolation: bool = False,
          max_checkpoints: int = 8, evaluate: bool = True, dataset: str | None = None,
          dataset_config: str | None = None, split: str | None = None, text_column: str = "text",
          max_eval_tokens: int = DEFAULT_MAX_EVAL_TOKENS, block_size: int | None = None, batch_size: int = 4,
          eval_dtype: str | None = None, device: str | None = None, token: str | bool | None = None,
          cache_dir: str | Path | None = None, trust_remote_code: bool = False, dtype: str | None = None,
          max_memory: str | int | None = None, device_map: str | None = None, progress: bool = True,
          objective: str = "loss", shas: Sequence[str] | None = None, tokenizer: str | None = None) -> MergeResult:
    """A fixed merge (explicit `weights` or `method` sma/ema/wma), no search; evaluated on the held-out
    loss or the metric `objective` (as in `search`) unless `evaluate=False`. Without a tokenizer in the
    source (and no `tokenizer` repo id or folder), only `evaluate=False` works: the merge has none.

    >>> merge("EleutherAI/pythia-160m", "last:4", method="ema").save_pretrained("ema")   # doctest: +SKIP
    """
    metric = _metric(objective) if evaluate else None
    cache = Path(cache_dir or default_cache_dir())
    planning = dict(device=device, eval_dtype=eval_dtype, batch_size=batch_size, block_size=block_size,
                    max_memory=max_memory, evaluate=evaluate, device_map=device_map)
    progress = progress and parallel.is_main()
    spec = _heldout(dataset, dataset_config, split, text_column)
    with parallel.main_process_first():
        prep = prepare(source, revisions, max_checkpoints, token, cache_dir, progress, shas, planning,
                       heldout=[spec], tokenizer=tokenizer)
    n = len(prep.names)
    if weights is None:
        weights = W.rule(method or "sma", n, ema_alpha)
    weights = W.check(weights, n, allow_extrapolation)
    result = MergeResult(source=prep.source.id, revisions=prep.names, shas=prep.shas, weights=list(weights),
                         source_kind=prep.source.kind, dtype=dtype, license=prep.source.license(), folders=prep.folders,
                         tokenizer_folder=prep.tokenizer_folder)
    if evaluate:
        with parallel.main_process_first():
            evaluator = Evaluator(prep, prep.ckpts, dataset=spec, block_size=block_size,
                                   max_eval_tokens=max_eval_tokens, batch_size=batch_size, eval_dtype=eval_dtype,
                                   device=device, trust_remote_code=trust_remote_code, cache_dir=cache,
                                   store_dtype=dtype, device_map=device_map, max_memory=max_memory, metric=metric)
        result.objective = metric.name if metric else "loss"
        result.loss = evaluator(result.weights)  # every process scores its share; the sums are reduced
        result.dataset, result.eval_tokens = spec.label, evaluator.eval_tokens
        result.eval_questions = evaluator.eval_questions
        result.dataset_is_hub = not Path(spec.dataset).expanduser().exists()
    return result


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
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        raise BOMergeError(f"Cannot read the recipe {path}: {err}. A recipe is the bomerge_recipe.yaml "
                           "that hf-bomerge writes next to a merged model.") from err
    return merge(source, ",".join(names), weights=weights, allow_extrapolation=True, evaluate=False,
                 max_checkpoints=0, token=token, cache_dir=cache_dir, progress=progress, shas=shas,
                 dtype=recipe.get("dtype"))
