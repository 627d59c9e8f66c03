"""The command line's shape, without running a merge: subcommands, the search as the default, the registry, and
`--help` without the pipeline's imports (torch, Optuna, SQLAlchemy, transformers)."""

from __future__ import annotations

import re
import subprocess
import sys
import types

import pytest

from hf_bomerge import cli
from hf_bomerge.cli.show import format_study

HEAVY = ("torch", "optuna", "sqlalchemy", "transformers", "datasets", "numpy")


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"], ["export", "--help"], ["recipe", "--help"],
                                  ["demo", "--help"], ["watch", "--help"], ["download", "--help"]])
def test_help_imports_nothing_heavy(argv):
    """`--help` imports none of the heavy libraries (its speed is measured in benchmarks/README.md, not here)."""
    code = ("import sys, time; t = time.perf_counter(); from hf_bomerge.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), time.perf_counter() - t, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    heavy, _seconds = proc.stderr.strip().splitlines()[-1].rsplit(" ", 1)
    assert proc.returncode == 0 and "usage: hf-bomerge" in proc.stdout, proc.stderr
    assert heavy == "[]", f"--help imported {heavy}"


def test_search_is_the_default_and_subcommands_take_the_first_word():
    args = cli.parse_args(["EleutherAI/pythia-160m", "--revisions", "last:3", "--method", "ema"])
    assert (args.command, args.source, args.revisions, args.method) == ("search", "EleutherAI/pythia-160m",
                                                                        "last:3", "ema")
    assert cli.parse_args(["search", "org/name"]).source == "org/name"
    assert cli.parse_args(["./demo"]).command == "search"  # a folder named like a command
    demo = cli.parse_args(["demo", "--json", "--trials", "8"])
    assert (demo.command, demo.revisions, demo.trials, demo.json) == ("demo", "last:4", 8, True)
    recipe = cli.parse_args(["recipe", "m/bomerge_recipe.yaml", "--output", "again"])
    assert (recipe.command, recipe.recipe, recipe.output) == ("recipe", "m/bomerge_recipe.yaml", "again")
    alias = cli.parse_args(["--recipe", "m/bomerge_recipe.yaml", "--output", "again"])
    assert (alias.command, alias.recipe, alias.output) == ("search", "m/bomerge_recipe.yaml", "again")
    show = cli.parse_args(["show", "--storage", "sqlite:///s.db", "--json"])
    assert (show.command, show.storage, show.json) == ("show", "sqlite:///s.db", True)
    export = cli.parse_args(["export", "--storage", "sqlite:///s.db", "--push-to-hub", "me/m", "--quiet"])
    assert (export.command, export.push_to_hub, export.quiet) == ("export", "me/m", True)


def test_options_that_do_not_belong_to_a_command_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(["show", "--method", "ema"])
    assert exit_.value.code == 2 and "--method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["demo", "--dry-run"])  # the demo has no plan to show; before, it was silently ignored


def test_no_source_is_one_clear_error(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-bomerge: error: Give a SOURCE") and "recipe FILE" in err and "Traceback" not in err


def test_a_command_is_one_registered_module(monkeypatch, capsys):
    from hf_bomerge.errors import BOMergeError

    module = types.ModuleType("hf_bomerge_test_hello")
    module.add_arguments = lambda p: p.add_argument("--name", default="world")

    def run(args):
        if args.name == "nobody":
            raise BOMergeError("Nobody to greet; pass --name NAME.")
        print(f"hello {args.name}")
        return 0

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command("hello", module.__name__, "say hello"))
    assert cli.main(["hello", "--name", "you"]) == 0 and capsys.readouterr().out == "hello you\n"
    assert cli.main(["hello", "--name", "nobody"]) == 2
    assert "hf-bomerge: error: Nobody to greet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert re.search(r"^  hello +say hello$", capsys.readouterr().out, re.M)  # listed in the top-level help


def test_show_formats_a_study_and_a_storage():
    report = {"storage": "sqlite:///s.db", "study": "s", "source": "org/m", "search": "pairwise", "objective": "loss",
              "counts": {"complete": 2, "running": 0, "waiting": 0, "failed": 1},
              "trials": [{"number": 0, "state": "complete", "loss": 2.5, "weights": [0.0, 1.0], "seed": "step2"},
                         {"number": 1, "state": "fail", "loss": None, "weights": None, "seed": None},
                         {"number": 2, "state": "complete", "loss": 2.25, "weights": [0.4, 0.6], "seed": None}],
              "best": {"number": 2, "loss": 2.25}, "exports": []}
    text = format_study(report)
    assert "2 complete, 0 running, 0 queued, 1 failed" in text and "best: trial 2 loss 2.25000" in text
    assert "0.400 0.600" in text and "step2" in text
    listing = format_study({"storage": "sqlite:///s.db", "studies": [{"study": "a", "complete": 0, "best": None,
                                                                     "source": "org/m"}]})
    assert listing.splitlines() == ["1 studies in sqlite:///s.db:", "  a  0 complete, best -  (org/m)"]
