"""The options of a run, declared once, on the specs' fields (`specs.option`: default and help), and built from there
into the argparse options of `search` (the default command), `demo`, `watch` and `download`, the defaults of the
Python keywords (`api.search`, `api.merge`) and the Space's, and back into the specs: `from_args` for a parsed
command line, `search_specs` / `merge_specs` for keywords. Bad values are refused by the specs themselves, and
options that cannot go together here, with one paragraph naming the flags: both before torch is imported.

>>> import argparse
>>> p = argparse.ArgumentParser(prog="example")
>>> track(p)
>>> add(p, "trials", "batch_size")
>>> args = p.parse_args(["--trials", "5"])
>>> args.trials, args.batch_size, given(args)
(5, 4, {'trials': '--trials'})
>>> search_specs("org/model", trials=0)
Traceback (most recent call last):
...
hf_bomerge.errors.OptionError: --trials must be a whole number of at least 1 (the baselines count), got 0.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from ..errors import OptionError
from ..merging import weights as W
from ..specs import EvalSpec, FixedSpec, HeldOutSpec, SearchSpec, SourceSpec

SPECS = (SourceSpec, HeldOutSpec, EvalSpec, SearchSpec, FixedSpec)
GIVEN = "given_flags"  # the namespace attribute `track` fills: dest -> the flag as declared


@dataclass(frozen=True)
class Option:
    """One option: its Python `keyword`, the spec fields it sets (`--ema-alpha` sets two), the fields' default
    and the declaration's metadata (`specs.option`)."""

    keyword: str
    targets: tuple[tuple[type, str], ...]
    default: Any
    meta: Mapping

    @property
    def flag(self) -> str:
        return self.meta.get("flag", "--" + self.keyword.replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.meta.get("dest", self.keyword)

    @property
    def value_default(self) -> Any:
        """The keyword's (and the flag's) default: None where "not given" lets the spec decide."""
        return None if self.meta.get("unset") else self.default

    def help(self, default: Any = None, text: str | None = None) -> str:
        text = text or self.meta["help"]
        if self.meta.get("action") == "store_true":
            return text
        shown = self.meta.get("shown", self.default if default is None else default)
        return text if shown is None else f"{text} (default: {shown})"

    def add_to(self, container, default: Any = None, help: str | None = None) -> None:
        kw = {k: self.meta[k] for k in ("type", "choices", "metavar", "action") if k in self.meta}
        value = self.value_default if default is None else default
        kw["default"] = list(value) if kw.get("action") == "append" else value
        container.add_argument(self.flag, dest=self.dest, help=self.help(default, help).replace("%", "%%"), **kw)


def _collect() -> dict[str, Option]:
    found: dict[str, Option] = {}
    for spec in SPECS:
        for f in fields(spec):
            if "help" in f.metadata:
                key = f.metadata.get("keyword", f.name)
                prior = found.get(key)
                targets = (prior.targets if prior else ()) + ((spec, f.name),)
                found[key] = Option(key, targets, f.default, prior.meta if prior else f.metadata)
    return found


OPTIONS: dict[str, Option] = _collect()
DEFAULTS: dict[str, Any] = {k: o.value_default for k, o in OPTIONS.items()}  # the keywords' defaults
SPEC_DEFAULTS: dict[str, Any] = {k: o.default for k, o in OPTIONS.items()}  # what a spec takes when none is given
# What `watch` takes of a run's options (it picks the revisions itself, and only searches).
WATCH = tuple(k for k in OPTIONS if k not in ("revisions", "max_checkpoints", "weights", "method", "window",
                                              "tokens_per_step", "allow_extrapolation"))
# Options that mean something only with or without a search, or with an evaluation (extras: the commands' own).
SEARCH_ONLY = ("search", "trials", "lambda_min", "layer_groups", "seed", "confirm_fraction", "fallback",
               "eval_datasets", "storage", "study_name")
FIXED_ONLY = ("window", "tokens_per_step", "allow_extrapolation", "no_eval")
EVAL_ONLY = ("dataset", "dataset_config", "split", "text_column", "max_eval_tokens", "block_size", "batch_size",
             "eval_dtype", "objective", "lm_eval_tasks", "lm_eval_metric")


def add(container, *keywords: str, **overrides: Mapping) -> None:
    """Add the options `keywords` to a parser or argument group; `overrides[keyword]` may set this command's own
    `default` and `help` (watch's `--trials` is per round)."""
    for key in keywords:
        OPTIONS[key].add_to(container, **overrides.get(key, {}))


def track(parser: argparse.ArgumentParser) -> None:
    """Make `parser` (and its groups; call before adding arguments) record which flags the user wrote, so that a
    conflict is refused even when a flag repeats its default."""
    for name in (None, "store", "store_true", "append"):
        base = parser._registry_get("action", name)
        parser.register("action", name, type(base.__name__, (base,), {"__call__": _record(base)}))


def _record(base):
    def __call__(self, parser, namespace, values, option_string=None):
        base.__call__(self, parser, namespace, values, option_string)
        if option_string:
            namespace.__dict__.setdefault(GIVEN, {})[self.dest] = self.option_strings[-1]
    return __call__


_BY_DEST = {o.dest: o.keyword for o in OPTIONS.values()}


def given(args: argparse.Namespace) -> dict[str, str]:
    """keyword -> flag of the options written on the command line (a hand-built namespace: those that differ
    from their defaults)."""
    if hasattr(args, GIVEN) or not vars(args):
        return {_BY_DEST.get(d, d): flag for d, flag in getattr(args, GIVEN, {}).items()}
    return {k: OPTIONS[k].flag for k in _BY_DEST.values()
            if hasattr(args, OPTIONS[k].dest) and _differs(k, getattr(args, OPTIONS[k].dest))}


def _differs(key: str, value) -> bool:
    default = DEFAULTS[key]
    return (tuple(value or ()) != tuple(default or ())) if key == "eval_datasets" else value != default


class Run(NamedTuple):
    """The specs of one run: a search (`search`) or a fixed merge (`fixed`; `evaluation` None under --no-eval)."""

    source: SourceSpec
    evaluation: EvalSpec | None
    search: SearchSpec | None = None
    fixed: FixedSpec | None = None


def search_specs(source: str, revisions: str = DEFAULTS["revisions"], **values) -> Run:
    """The specs of a search from keywords (`api.search`'s), every value and combination checked."""
    return build(source, revisions, values, fixed=False)


def merge_specs(source: str, revisions: str = DEFAULTS["revisions"], *, evaluate: bool = True,
                shas=None, **values) -> Run:
    """The specs of a fixed merge from keywords (`api.merge`'s), every value and combination checked."""
    return build(source, revisions, values, fixed=True, evaluate=evaluate, shas=shas)


def from_args(args: argparse.Namespace, keywords=tuple(OPTIONS)) -> Run:
    """The specs of a parsed `search`, `demo` or `watch` command line (a fixed merge with --weights/--method);
    `keywords`: the options the command takes (watch's own --window is not a fixed merge's)."""
    values = {k: getattr(args, OPTIONS[k].dest) for k in keywords if hasattr(args, OPTIONS[k].dest)}
    flags = {k: f for k, f in given(args).items() if k in keywords or k not in OPTIONS}
    fixed = values.get("weights") is not None or values.get("method") is not None
    return build(args.source, values.pop("revisions", DEFAULTS["revisions"]), values, flags, fixed=fixed,
                 evaluate=not getattr(args, "no_eval", False))


def build(source: str, revisions: str, values: dict, flags: Mapping[str, str] | None = None, *, fixed: bool,
          evaluate: bool = True, shas=None) -> Run:
    """The specs from flat `values` (keywords), `flags` naming those given (default: those not at their default)."""
    unknown = sorted(set(values) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown option keywords: {', '.join(unknown)}")
    if flags is None:
        flags = {k: f"{k}=" for k, v in values.items() if _differs(k, v)}
    if fixed:
        method = values.get("method")
        trigger = flags.get("weights") or (f"{flags.get('method', '--method')} {method}" if method else "")
        refuse_with(flags, trigger, SEARCH_ONLY, "makes a fixed merge, without a search", "{is} for a search only",
                    f"or drop {trigger.split()[0]} to search the weights")
    else:
        refuse_with(flags, "a search", FIXED_ONLY, "finds the weights itself", "{is} for a fixed merge only "
                    "(--weights W1,W2,... or --method NAME)", "or give --weights/--method")
    if not evaluate:
        refuse_with(flags, flags.get("no_eval", "--no-eval"), EVAL_ONLY, "skips the held-out evaluation",
                    "would not be used", "or drop --no-eval to score the merge")
    source_spec = SourceSpec(source, revisions, shas=tuple(shas) if shas else None, **_fields(SourceSpec, values))
    evaluation = EvalSpec.from_options(values.get("dataset"), values.get("dataset_config"), values.get("split"),
                                       values.get("text_column", DEFAULTS["text_column"]), **_fields(EvalSpec, values))
    if fixed:
        weights = values.get("weights")
        if isinstance(weights, str):
            weights = W.parse_weights(weights)
        fixed_spec = FixedSpec(**{**_fields(FixedSpec, values), "weights": None if weights is None else tuple(weights)})
        return Run(source_spec, evaluation if evaluate else None, fixed=fixed_spec)
    search = SearchSpec(**_fields(SearchSpec, values))
    if search.lambda_min and search.space not in ("auto", "pairwise"):
        raise OptionError(f"--lambda-min bounds the λ of a pairwise search; --search {search.space} has none. Drop "
                          "--lambda-min, or use --search pairwise (auto picks it for two revisions).")
    if search.fallback and not evaluation.confirm_fraction:
        raise OptionError("--fallback compares the merge with the best baseline on the confirm part, but "
                          "--confirm-fraction 0 keeps no confirm part: give a fraction above 0 (default 0.25), or "
                          "drop --fallback.")
    return Run(source_spec, evaluation, search=search)


def _fields(spec: type, values: Mapping) -> dict:
    return {name: values[o.keyword] for o in OPTIONS.values() for cls, name in o.targets
            if cls is spec and o.keyword in values and cls is not HeldOutSpec}


def refuse_with(flags: Mapping[str, str], trigger: str, keys, what: str, why: str, fix: str) -> None:
    """Refuse `trigger` (a flag, or a description) together with any of `keys` the user gave, in one paragraph."""
    clash = [flags[k] for k in keys if k in flags]
    if trigger and clash:
        them = ", ".join(clash)
        why = why.format(**{"is": "are" if len(clash) > 1 else "is"})
        raise OptionError(f"{trigger[0].upper() + trigger[1:]} {what}: {them} {why}. Drop "
                          f"{'them' if len(clash) > 1 else 'it'}, {fix}.")


def check_download(args: argparse.Namespace) -> None:
    """`hf-bomerge download`: the revisions' values, and --no-eval without the data it would not fetch."""
    flags = given(args)
    if args.no_eval:
        refuse_with(flags, flags.get("no_eval", "--no-eval"), ("dataset", "dataset_config", "split", "eval_datasets"),
                    "fetches no held-out data", "would not be fetched", "or drop --no-eval")
    SourceSpec(args.source, args.revisions, args.max_checkpoints, tokenizer=args.tokenizer)
