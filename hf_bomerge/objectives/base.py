"""The contract every objective keeps, and the registry that finds one by the name a user or a study gives.

An objective is one class. What it says about itself (direction, unit, wording) is known from its name alone,
before torch or any data loads, so the study, the summary, the card, the plots and the Trainer logs ask the class
and never compare names. What it computes (`__call__`, the confirm part) is built on a loaded model's tokenizer
and data by `build`.

>>> objective_class("loss").higher_is_better
False
>>> objective_class("accuracy").describe("accuracy")
'accuracy of multiple-choice questions (maximized)'
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ..errors import OptionError

if TYPE_CHECKING:
    import torch

    from ..specs import EvalSpec, HeldOutSpec
    from .evaluator import Evaluator


class Objective(abc.ABC):
    """What a merge is scored by.

    Known from the name (class level):
    - `claims(spec)`: whether `--objective SPEC` names this kind; `check(spec, evaluation)` fails fast (before any
      download) when it cannot be used with the `EvalSpec` `evaluation`; `key(spec)` what identifies it in a
      study's inputs. An instance's `name` is what `--json`'s `objective`, the study and the card record, and what
      `objective_class` is asked with later (so it must say the direction: lm-eval's names end in /max or /min).
    - `higher_is_better`: the direction. The study's direction, the best trial, the confirm verdict, `--fallback`
      and every "better"/"worse" follow it.
    - wording: `metric(name)` what tables and the card's model-index call the number, `unit` after a value
      (" nats/token"), `confirm_units` what the confirm part resamples ("documents"),
      `header(name)` a column or axis ("loss (nats/token)"), `describe(name)` the card's phrase, `layout` which
      card table fits ("loss": with perplexity; "score": the value alone), `perplexity(value)` or None.
    - `options`: the `EvalSpec` fields only this kind reads (`check_evaluation` refuses them for another kind).
    - `reads_dataset`: whether it scores `--dataset` (False: it reads data of its own, such as lm-eval's tasks; the
      held-out set is then neither checked offline nor reported, and the instance's `dataset` labels what it read).

    Computed (instance level, from `build`): `__call__(model)` the search part's value; `confirm_scores(model)`
    per-unit outcomes of the confirm part, reduced by `statistic(outcomes, indices)` (a bootstrap draw repeats
    indices); `confirm_size` units (0: no confirm part), `confirm_unit` what one is ("documents", "runs" of one long
    text, "questions"); `tokens`/`questions` how much it reads; `identity` a digest of exactly what it reads (a
    study resumed on other data is refused).

    The confirm units are what the bootstrap resamples, so they must be independent of each other as far as the
    data allows: whole documents (never blocks of one document), questions. Units that share a document share a
    unit. An interval is reported only from `confirm.MIN_UNITS` (20) units or more.
    """

    higher_is_better: ClassVar[bool]
    unit: ClassVar[str] = ""
    confirm_units: ClassVar[str] = "units"
    layout: ClassVar[str] = "score"
    reads_dataset: ClassVar[bool] = True
    options: ClassVar[tuple[str, ...]] = ()

    name: str
    tokens: int = 0
    questions: int = 0
    identity: str = ""
    confirm_size: int = 0
    confirm_unit: str = "units"
    dataset: str = ""  # what it read, when not `--dataset` (`reads_dataset` False)

    @classmethod
    @abc.abstractmethod
    def claims(cls, spec: str) -> bool: ...

    @classmethod
    def key(cls, spec: str) -> str:
        return spec

    @classmethod
    def check(cls, spec: str, evaluation: EvalSpec | None = None) -> None:
        """Raise a `BOMergeError` saying what to do when `spec` cannot be used (before anything is downloaded)."""

    @classmethod
    def header(cls, name: str) -> str:
        return f"{name} ({'higher' if cls.higher_is_better else 'lower'} is better)"

    @classmethod
    def describe(cls, name: str) -> str:
        return name

    @classmethod
    def metric(cls, name: str) -> str:
        return name

    @classmethod
    def perplexity(cls, value: float) -> float | None:
        return None

    @classmethod
    def remedy(cls) -> str:
        """What gives the confirm part more units, when they are too few for an interval ("" for the held-out
        cap: the message then says how far to raise --max-eval-tokens)."""
        return ""

    @classmethod
    @abc.abstractmethod
    def build(cls, evaluator: Evaluator, data: HeldOutSpec, spec: str, confirm_fraction: float) -> Objective:
        """The objective of `spec` on `data`, with the evaluator's tokenizer, block and batch sizes and cache."""

    @abc.abstractmethod
    def __call__(self, model: torch.nn.Module) -> float: ...

    @abc.abstractmethod
    def confirm_scores(self, model: torch.nn.Module) -> list: ...

    @abc.abstractmethod
    def statistic(self, outcomes: Sequence, idx: Sequence[int]) -> float: ...


OBJECTIVES: list[type[Objective]] = []  # asked in order: the first whose `claims` says yes is the objective


def register(cls: type[Objective]) -> type[Objective]:
    """Add an objective class to the registry (a class decorator). A class that claims every name (the
    `evaluate` metric) is asked last, whatever the order of registration."""
    OBJECTIVES.append(cls)
    OBJECTIVES.sort(key=lambda c: c.claims("\0any name\0"))  # stable: the catch-all moves to the end
    return cls


def objective_class(spec: str | None) -> type[Objective]:
    """The registered class of the objective `spec` (an `--objective` value, or the name a result recorded);
    `hf_bomerge.objectives` registers the built-ins (the loss, and any `evaluate` metric for other names)."""
    spec = spec or "loss"
    return next(cls for cls in OBJECTIVES if cls.claims(spec))


def check_evaluation(evaluation: EvalSpec) -> None:
    """Fail fast (before any download) when the objective of `evaluation` cannot be used, or when an option is
    given that it would ignore: another objective's own option, or `--dataset` for one that reads its own data."""
    spec = evaluation.objective
    cls = objective_class(spec)
    ignored = [o for other in OBJECTIVES for o in other.options
               if o not in cls.options and getattr(evaluation, o, None) is not None]
    if not cls.reads_dataset and evaluation.data != type(evaluation.data)():
        ignored.insert(0, "dataset")
    if ignored:
        flags = ", ".join("--" + o.replace("_", "-") for o in dict.fromkeys(ignored))
        raise OptionError(f"--objective {spec} does not read {flags}: it would be ignored. Drop it, or choose the "
                          "objective it belongs to (`hf-bomerge --help` says which options each one takes).")
    cls.check(spec, evaluation)
