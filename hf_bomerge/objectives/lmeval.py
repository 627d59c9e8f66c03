"""lm-evaluation-harness tasks as the objective: `--objective lm-eval:TASK[,TASK...]`.

Each trial is scored by lm-eval itself on the live merged model: its `HFLM` wraps the model object (no disk I/O per
trial), and the tasks (their prompts, documents, filters, metrics and aggregations) are loaded once and reused.
The metric is the task's own (`--lm-eval-metric`, default the first task's first), and so is its direction
(lm-eval's `higher_is_better`), which the recorded name carries (`lm-eval:TASKS/METRIC/max` or `/min`), so the
study, the card and a resumed result know it without loading lm-eval. Several tasks (or a group's): the unweighted
mean of their metric. Every 4th document of each task (for `--confirm-fraction 0.25`) is kept for the confirm part;
its per-document values (lm-eval's logged samples) are aggregated again with the task's own aggregation on every
bootstrap draw. `--lm-eval-tasks DIR` adds local task YAMLs (lm-eval's include path); offline, a task reads
cached datasets or local files (`dataset_path: json` with `data_files`).

>>> from hf_bomerge.objectives import objective_class
>>> objective_class("lm-eval:arc_easy/acc/max").describe("lm-eval:arc_easy/acc/max")
'acc of the lm-eval task arc_easy (maximized)'
>>> objective_class("lm-eval:wikitext/word_perplexity/min").higher_is_better
False
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DataError, MissingExtraError, OptionError
from .base import Objective, register
from .confirm import confirm_indices

if TYPE_CHECKING:
    import torch

PREFIX = "lm-eval:"
INSTALL = 'pip install -e ".[lm-eval]"'
FEWSHOT_SEED = 1234  # lm-eval's own default (`simple_evaluate`'s fewshot_random_seed), set again before every run


def parse(name: str) -> tuple[list[str], str | None, str | None]:
    """(tasks, metric, "max"/"min") of an `--objective` value or a recorded name; None where it does not say.

    >>> parse("lm-eval:arc_easy,piqa"), parse("lm-eval:wikitext/word_perplexity/min")
    ((['arc_easy', 'piqa'], None, None), (['wikitext'], 'word_perplexity', 'min'))
    """
    tasks, *rest = name.removeprefix(PREFIX).split("/")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    return names, (rest[0] if rest else None), (rest[1] if len(rest) > 1 else None)


@register
class LMEvalObjective(Objective):
    """lm-eval's metric of the tasks, computed whole on each process (lm-eval's model-object mode is one process).
    This class is the maximized kind; `LMEvalMinimized` (the same class, lower is better) is what `build` returns
    for a metric lm-eval minimizes, such as a perplexity."""

    higher_is_better = True
    confirm_units = "documents"
    reads_dataset = False
    options = ("lm_eval_tasks", "lm_eval_metric")

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(PREFIX) and parse(spec)[2] != "min"

    @classmethod
    def check(cls, spec: str, evaluation=None) -> None:
        if not parse(spec)[0]:
            raise OptionError(f"--objective {spec!r} names no task; write lm-eval:TASK or lm-eval:TASK1,TASK2 (the "
                              "names `lm_eval --tasks` takes).")
        try:
            import lm_eval  # noqa: F401
        except ImportError as err:
            raise MissingExtraError(
                f"--objective {spec} scores the merges with lm-evaluation-harness, which is not installed ({err}). "
                f"Install hf-bomerge with its lm-eval extra: {INSTALL} in a checkout, or pip install "
                "'hf-bomerge[lm-eval]'; or choose another --objective (loss, or an `evaluate` metric).") from err
        folder = getattr(evaluation, "lm_eval_tasks", None)
        if folder and not Path(folder).expanduser().is_dir():
            raise OptionError(f"--lm-eval-tasks {folder} is not a folder; it takes a folder of lm-eval task YAML "
                              "files (lm-eval's --include_path).")

    @classmethod
    def header(cls, name: str) -> str:
        return f"{parse(name)[1] or 'score'} ({'higher' if cls.higher_is_better else 'lower'} is better)"

    @classmethod
    def remedy(cls) -> str:
        return ("choose tasks with more documents (every 4th is a confirm document; --max-eval-tokens does not cap "
                "a task), or raise --confirm-fraction")

    @classmethod
    def describe(cls, name: str) -> str:
        tasks, metric, _ = parse(name)
        plural = "s" if len(tasks) > 1 else ""
        mean = "the mean " if len(tasks) > 1 else ""
        return (f"{mean}{metric or 'score'} of the lm-eval task{plural} {', '.join(tasks)} "
                f"({'maximized' if cls.higher_is_better else 'minimized'})")

    @classmethod
    def metric(cls, name: str) -> str:
        return parse(name)[1] or name

    @classmethod
    def build(cls, evaluator, data, spec: str, confirm_fraction: float) -> LMEvalObjective:
        evaluation = getattr(evaluator, "spec", None)
        cls.check(spec, evaluation)
        folder = getattr(evaluation, "lm_eval_tasks", None)
        with quiet_lm_eval():
            loaded = load_tasks(parse(spec)[0], Path(folder).expanduser() if folder else None)
        metric, higher = choose_metric(loaded["tasks"], getattr(evaluation, "lm_eval_metric", None) or parse(spec)[1])
        kind = LMEvalObjective if higher else LMEvalMinimized
        return kind(parse(spec)[0], loaded, metric, evaluator.tokenizer, evaluator.batch_size, confirm_fraction)

    def __init__(self, names: Sequence[str], loaded: dict, metric: str, tokenizer, batch_size: int,
                 confirm_fraction: float = 0.0):
        """`names` as asked (a group stays one name), `loaded` lm-eval's loaded tasks: its leaf tasks are scored."""
        self.loaded, self.tasks = loaded, loaded["tasks"]
        self.metric, _, self.filter = metric.partition(",")
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.name = f"{PREFIX}{','.join(names)}/{self.metric}/{'max' if self.higher_is_better else 'min'}"
        self.dataset = f"lm-eval {', '.join(names)}"
        sizes = {t: len(task.eval_docs) for t, task in self.tasks.items()}
        kept = {t: confirm_indices(n, confirm_fraction) for t, n in sizes.items()}  # every 4th, as elsewhere
        self.confirm = kept if all(kept.values()) else {}
        self.search = ({t: sorted(set(range(sizes[t])) - set(self.confirm[t])) for t in sizes}
                       if self.confirm else None)  # None: every document, as `lm_eval` scores them
        self.confirm_size, self.confirm_unit = sum(map(len, self.confirm.values())), "documents"
        self.questions = sum(sizes.values()) - self.confirm_size
        self.aggregate = {t: task.aggregation()[self.metric] for t, task in self.tasks.items()}
        self.identity = f"{tasks_digest(self.tasks, metric)}/{confirm_fraction:g}"
        self._lm = None

    def __call__(self, model: torch.nn.Module) -> float:
        results = self._run(model, self.search, samples=False)["results"]
        return sum(results[t][self._key(results[t], t)] for t in self.tasks) / len(self.tasks)

    def confirm_scores(self, model: torch.nn.Module) -> list[tuple[str, object]]:
        """(task, the document's metric value) of each confirm document, in task and document order."""
        run = self._run(model, self.confirm, samples=True)
        outcomes = []
        for task in self.tasks:
            chosen = self._key(run["results"][task], task).partition(",")[2]
            rows = sorted((r for r in run["samples"][task] if r["filter"] == chosen), key=lambda r: r["doc_id"])
            outcomes += [(task, r[self.metric]) for r in rows]
        return outcomes

    def statistic(self, outcomes: Sequence[tuple[str, object]], idx: Sequence[int]) -> float:
        """Each task's own aggregation (a mean, a perplexity, ...) of its documents at `idx` (a bootstrap draw
        repeats some), averaged over the tasks the draw holds."""
        values: dict[str, list] = {}
        for i in idx:
            task, value = outcomes[i]
            values.setdefault(task, []).append(value)
        return sum(float(self.aggregate[t](v)) for t, v in values.items()) / len(values)

    def _key(self, result: dict, task: str) -> str:
        """lm-eval's result key `METRIC,FILTER` of the chosen metric (its first filter unless one was named)."""
        keys = [k for k in result if k.partition(",")[0] == self.metric and (not self.filter or k.endswith(
            "," + self.filter))]
        if not keys:
            raise DataError(f"lm-eval reported no {self.metric}{',' + self.filter if self.filter else ''} for the "
                            f"task {task} (it reported {sorted(k for k in result if ',' in k)}); name one of those "
                            "with --lm-eval-metric METRIC or METRIC,FILTER.")
        return keys[0]

    def _run(self, model, docs: dict[str, list[int]] | None, samples: bool) -> dict:
        """lm-eval's `evaluate` of `model` on the documents `docs` of each task (None: all of them)."""
        from lm_eval.evaluator import evaluate

        for task in self.tasks.values():  # the few-shot sampler draws from a generator: the same examples each run
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        with quiet_lm_eval():
            return evaluate(self._lm_of(model), self.loaded, samples=docs, log_samples=samples, bootstrap_iters=0)

    def _lm_of(self, model):
        """lm-eval's `HFLM` around `model` (a new one when the evaluator loaded another model, in the saved dtype)."""
        if self._lm is None or self._lm.model is not model:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):  # no bar per trial
                setattr(lm, method, partial(getattr(lm, method), disable_tqdm=True))
            self._lm = lm
        return self._lm


@register
class LMEvalMinimized(LMEvalObjective):
    """An lm-eval metric that is lower for a better model (a perplexity, bits per byte): its name ends in `/min`."""

    higher_is_better = False

    @classmethod
    def claims(cls, spec: str) -> bool:
        return spec.startswith(PREFIX) and parse(spec)[2] == "min"


@contextmanager
def quiet_lm_eval():
    """lm-eval's warnings and notices off (its defaults for a YAML's unset aggregation, once per trial its
    model-object notice): they say nothing a user of hf-bomerge can act on. Its errors still show."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(folder: Path | None, names: Sequence[str]):
    """lm-eval's `TaskManager` that knows `names`: the local folder alone when it holds them all (indexing lm-eval's
    own library of tasks takes seconds), else the library and the folder (the folder's tasks first)."""
    from lm_eval.tasks import TaskManager

    if folder is not None:
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return local
    return TaskManager(include_path=str(folder) if folder else None)


def load_tasks(names: Sequence[str], folder: Path | None) -> dict:
    """The tasks `names` loaded once (their documents read): lm-eval's `{"tasks", "groups", "group_map"}` with
    zero-shot where a task names no few-shot count, as `lm_eval` runs them."""
    manager = task_manager(folder, names)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise DataError(f"lm-eval knows no task {name!r}{' in ' + str(folder) if folder else ''}"
                            f"{'; did you mean ' + ', '.join(close) + '?' if close else '.'} A local task is a YAML "
                            "file in the folder --lm-eval-tasks names (its `task:` is the name).")
    try:
        loaded = manager.load(list(names))
    except Exception as err:  # lm-eval reads the task's dataset here: offline without it, a bad YAML, ...
        raise DataError(f"lm-eval could not load the task(s) {', '.join(names)}: {err}. Offline, a task needs its "
                        "dataset in the datasets cache, or a local file (dataset_path: json with data_files).") from err
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
    return loaded


def choose_metric(tasks: dict, asked: str | None) -> tuple[str, bool]:
    """The metric searched on (`asked`, or the first task's first) and whether higher is better for it, the same
    for every task."""
    first = next(iter(tasks.values())).higher_is_better()
    metric = asked or next(iter(first))
    name = metric.partition(",")[0]
    directions = {}
    for task_name, task in tasks.items():
        known = task.higher_is_better()
        if name not in known:
            raise DataError(f"The lm-eval task {task_name} has no metric {name!r} (it has {', '.join(known)}); "
                            "choose one of those with --lm-eval-metric.")
        directions[task_name] = bool(known[name])
    if len(set(directions.values())) > 1:
        raise DataError(f"The tasks disagree on whether a higher {name} is better ({directions}); search on them "
                        "one at a time.")
    return metric, next(iter(directions.values()))


def tasks_digest(tasks: dict, metric: str) -> str:
    """A digest of the tasks' configurations and documents, and the metric: what a study resumes on."""
    h = hashlib.sha256(metric.encode())
    for name, task in tasks.items():
        h.update(json.dumps([name, task.dump_config()], sort_keys=True, default=_plain).encode())
        for doc in task.eval_docs:
            h.update(json.dumps(doc, sort_keys=True, default=_plain).encode())
    return h.hexdigest()[:16]


def _plain(value) -> str:
    """A config's function (`!function utils.process_docs`) by its name: its repr holds an address that changes
    with every process, and the digest must not."""
    name = getattr(value, "__qualname__", None)
    return f"{getattr(value, '__module__', '')}.{name}" if name else str(value)

