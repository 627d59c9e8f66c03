"""The options, declared once on the specs (`hf_bomerge.cli.options`): bad values and options that cannot go together are
refused with exit 2 and one paragraph naming the flags, before torch is imported; `watch` takes every search
option a round uses; the commands, the keyword API and the Space's defaults are the specs' defaults."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

from hf_bomerge import cli
from hf_bomerge.specs import EvalSpec, FixedSpec, HeldOutSpec, SearchSpec, SourceSpec

HEAVY = ("torch", "optuna", "sqlalchemy", "transformers", "datasets", "numpy")
S, W, D = "SRC", ["watch", "SRC", "--output", "OUT"], ["download", "SRC"]
REFUSED = [  # (arguments, what the message says); SRC is an existing (empty) folder
    ([S, "--trials", "0"], "--trials must be a whole number of at least 1"),
    ([S, "--max-eval-tokens", "-5"], "--max-eval-tokens must be positive, got -5"),
    ([S, "--batch-size", "0"], "--batch-size must be positive"),
    ([S, "--confirm-fraction", "1.5"], "--confirm-fraction must be in [0, 1), got 1.5"),
    ([S, "--lambda-min", "1"], "--lambda-min must be in [0, 1)"),
    ([S, "--ema-alpha", "0"], "--ema-alpha must be in (0, 1]"),
    ([S, "--max-checkpoints", "-1"], "--max-checkpoints must be 0 or more"),
    ([S, "--search", "nope"], "argument --search: invalid choice: 'nope'"),
    ([S, "--method", "nope"], "argument --method: invalid choice: 'nope'"),
    ([S, "--weights", "0.5,x"], "--weights must be comma-separated numbers, got '0.5,x'"),
    ([S, "--weights", "0.3,0.7", "--method", "ema"], "--weights gives the weights and --method ema names a rule"),
    ([S, "--weights", "0.3,0.7", "--trials", "5"], "--weights makes a fixed merge, without a search: --trials is"),
    ([S, "--method", "ema", "--trials", "20"], "--method ema makes a fixed merge, without a search: --trials is"),
    ([S, "--method", "sma", "--layer-groups", "2", "--fallback"], "--layer-groups, --fallback are for a search"),
    ([S, "--method", "sma", "--study-name", "s", "--eval-dataset", "x"], "--eval-dataset, --study-name are for"),
    ([S, "--window", "100"], "a search finds the weights itself: --window is for a fixed merge only"),
    ([S, "--no-eval"], "--no-eval is for a fixed merge only"),
    ([S, "--allow-extrapolation"], "--allow-extrapolation is for a fixed merge only"),
    ([S, "--method", "ema", "--window", "100"], "--window and --tokens-per-step shape a schedule-shaped"),
    ([S, "--method", "sma", "--ema-alpha", "0.5"], "--ema-alpha shapes --method ema only"),
    ([S, "--method", "sma", "--no-eval", "--dataset", "x", "--batch-size", "2"],
     "--no-eval skips the held-out evaluation: --dataset, --batch-size would not be used"),
    ([S, "--search", "simplex", "--lambda-min", "0.2"], "--lambda-min bounds the λ of a pairwise search"),
    ([S, "--search", "pairwise", "--layer-groups", "2"], "cannot combine with --search pairwise"),
    ([S, "--fallback", "--confirm-fraction", "0"], "--fallback compares the merge with the best baseline"),
    ([S, "--recipe", "r.yaml", "--trials", "3"], "--recipe FILE rebuilds the merge its recipe pins (the same "
                                                 "revisions and weights, no search): SOURCE, --trials"),
    ([*W, "--trials", "0"], "--trials must be a whole number of at least 1"),
    ([*W, "--window", "3", "--trials", "0"], "--trials must be"),  # watch's own --window is not a fixed merge's
    ([*W, "--fallback", "--confirm-fraction", "0"], "--fallback compares"),
    ([*W, "--layer-groups", "2", "--search", "family"], "cannot combine with --search family"),
    ([*D, "--no-eval", "--dataset", "x"], "--no-eval fetches no held-out data: --dataset would not be fetched"),
    ([*D, "--max-checkpoints", "-2"], "--max-checkpoints must be 0 or more"),
    (["demo", "--trials", "0"], "--trials must be a whole number of at least 1"),
]
# Each case in-process, one after the other, in one interpreter that never imports torch (no GPU, no network).
_RUNNER = f"""
import contextlib, io, json, sys, time
from hf_bomerge.cli import main
cases, out = json.loads(sys.argv[1]), []
for argv in cases:
    err, t = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    out.append([code, err.getvalue(), time.perf_counter() - t])
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps({{"cases": out, "heavy": heavy}}))
"""


def test_bad_values_and_conflicts_are_refused_before_anything_heavy_is_imported(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    cases = [[str(src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
             for argv, _ in REFUSED]
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (argv, said), (code, err, seconds) in zip(REFUSED, report["cases"]):
        message = err.strip().splitlines()[-1]  # argparse's own errors follow its usage lines
        assert code == 2 and message.startswith("hf-bomerge") and said.lower() in message.lower(), (argv, err)
        assert "Traceback" not in err and seconds < 1.0, (argv, seconds)
        if not message.startswith("hf-bomerge: error: argument"):  # ours: one paragraph, nothing else
            assert err.strip() == message, (argv, err)
    assert report["heavy"] == [], f"refusing imported {report['heavy']}"


def _flags(name: str) -> dict[str, argparse.Action]:
    return {a.option_strings[-1]: a for a in cli.build_parser(name)._actions if a.option_strings}


# What a search has that a watch round does not use: the watch picks the revisions itself and only searches
# (a round is one window's study, so no --study-name), and writes each round to its own folder of --output.
NOT_FOR_WATCH = {"--version", "--revisions", "--max-checkpoints", "--weights", "--method", "--window",
                 "--tokens-per-step", "--allow-extrapolation", "--no-eval", "--recipe", "--dry-run", "--study-name",
                 "--overwrite", "--hub-revision", "--commit-message"}


def test_watch_takes_every_search_option_that_a_round_uses():
    search, watch = _flags("search"), _flags("watch")
    missing = sorted(set(search) - NOT_FOR_WATCH - set(watch))
    assert missing == [], f"watch lacks {missing}"
    for flag in ("--confirm-fraction", "--layer-groups", "--tokenizer", "--device-map", "--max-memory",
                 "--eval-dataset", "--fallback"):
        assert flag in watch
        assert watch[flag].help == search[flag].help  # one declaration
    help_text = cli.build_parser("watch").format_help()
    assert all(flag in help_text for flag in set(search) - NOT_FOR_WATCH)


def _option_fields():
    for spec in (SourceSpec, HeldOutSpec, EvalSpec, SearchSpec, FixedSpec):
        for f in dataclasses.fields(spec):
            if "help" in f.metadata:
                yield f


def test_commands_keywords_and_the_space_share_the_specs_defaults():
    found = {f.metadata.get("keyword", f.name): f for f in _option_fields()}
    assert {"revisions", "batch_size", "max_eval_tokens", "ema_alpha", "trials", "confirm_fraction", "search",
            "layer_groups", "dataset", "weights", "tokens_per_step"} <= set(found)
    from hf_bomerge import api

    keywords = {**inspect.signature(api.merge).parameters, **inspect.signature(api.search).parameters}
    parsers = {name: {a.dest: a.default for a in cli.build_parser(name)._actions}
               for name in ("search", "watch", "download", "demo")}
    own = {("watch", "trials"): 12, ("demo", "revisions"): "last:4"}  # a command's own, said in its --help
    for key, f in found.items():
        default = None if f.metadata.get("unset") else f.default
        dest = f.metadata.get("dest", key)
        assert key in keywords and keywords[key].default == default, key
        flag = f.metadata.get("flag", "--" + key.replace("_", "-"))
        for name, defaults in parsers.items():
            if dest in defaults and not (name == "watch" and flag in NOT_FOR_WATCH):  # watch's own --window
                value = defaults[dest]
                assert (tuple(value) if isinstance(value, list) else value) == own.get((name, key), default), (name, key)
        assert dest in parsers["search"], key
    assert parsers["watch"]["batch_size"] == EvalSpec.batch_size == 4  # one literal, in specs.py
    assert keywords["ema_alpha"].default == FixedSpec.ema_alpha == SearchSpec.ema_alpha


def test_every_default_is_in_the_help():
    for name in ("search", "watch", "download"):
        for action in cli.build_parser(name)._actions:
            if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in (action.help or ""), (name, action.option_strings)
    assert re.search(r"--search \{[a-z,]+\}\s+how the weights are searched .*\(default:\s+auto\)",
                     cli.build_parser("search").format_help(), re.S)


def test_the_keyword_api_refuses_what_the_command_line_refuses(tmp_path):
    import hf_bomerge
    from hf_bomerge.errors import BOMergeError, OptionError

    with pytest.raises(BOMergeError, match="--trials must be a whole number"):
        hf_bomerge.search(str(tmp_path), trials=0)
    with pytest.raises(OptionError, match="--weights gives the weights"):
        hf_bomerge.merge(str(tmp_path), weights=[0.5, 0.5], method="ema")
    with pytest.raises(OptionError, match="skips the held-out evaluation: dataset="):
        hf_bomerge.merge(str(tmp_path), method="sma", evaluate=False, dataset="org/data")
    with pytest.raises(OptionError, match="--confirm-fraction must be in"):
        hf_bomerge.watch_once(str(tmp_path), str(tmp_path / "merges"), confirm_fraction=2.0, wait=0)


def test_the_default_dataset_takes_the_config_and_split_asked_for():
    data = EvalSpec.from_options(None, "wikitext-103-raw-v1", "test").data
    assert data == HeldOutSpec("Salesforce/wikitext", "wikitext-103-raw-v1", "test")
