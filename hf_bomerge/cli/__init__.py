"""`hf-bomerge`: the command line, a thin shell over the Python API (the contract: README.md, "Command line").

`hf-bomerge SOURCE [options]` searches (the default command); `hf-bomerge COMMAND ...` runs a registered
subcommand. A command is one module with `add_arguments(parser)` and `run(args) -> int`, registered below
with one line; its module is imported only when the command is used, so `--help` imports neither torch nor
Optuna. To add one: `register("download", "hf_bomerge.cli.download", "fetch what a later offline run needs")`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from dataclasses import dataclass

# Before torch is imported: idle OpenMP threads sleep instead of spinning, which keeps a busy 2-core machine
# from slowing the merge down ~2x (measured in benchmarks/README.md); no effect on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..errors import BOMergeError
from . import options

DEFAULT = "search"


@dataclass(frozen=True)
class Command:
    """A subcommand: the module that defines `add_arguments(parser)` and `run(args) -> int`, and one line of help."""

    name: str
    module: str
    help: str


COMMANDS: dict[str, Command] = {}


def register(name: str, module: str, help: str) -> None:
    """Make `hf-bomerge NAME ...` run `module.run(args)`. NAME becomes a reserved word: a local folder of
    that name is then written `./NAME`."""
    COMMANDS[name] = Command(name, module, help)


register("search", "hf_bomerge.cli.search",
         "search the weights, merge, write (and push); the default: `hf-bomerge SOURCE [options]`")
register("recipe", "hf_bomerge.cli.recipe",
         "reproduce a merge exactly from its bomerge_recipe.yaml, no search (also: --recipe FILE)")
register("demo", "hf_bomerge.cli.demo", "the built-in offline demo (a tiny model trained here, merged)")
register("show", "hf_bomerge.cli.show", "a stored study's trials, or the studies of a storage")
register("export", "hf_bomerge.cli.export", "write (and push) the best merge of a stored study")
register("watch", "hf_bomerge.cli.watch", "merge each new checkpoint's window while a run trains")
register("download", "hf_bomerge.cli.download", "fetch what a later offline run needs (then run with HF_HUB_OFFLINE=1)")


def build_parser(name: str = DEFAULT) -> argparse.ArgumentParser:
    """The parser of command `name` (importing its module, not the pipeline)."""
    command = COMMANDS[name]
    module = importlib.import_module(command.module)
    default = name == DEFAULT
    p = argparse.ArgumentParser(prog="hf-bomerge" if default else f"hf-bomerge {name}",
                                description=getattr(module, "DESCRIPTION", command.help),
                                epilog=_commands_epilog(module) if default else getattr(module, "EPILOG", None),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    options.track(p)  # which flags were written: a conflict is refused even when a flag repeats its default
    module.add_arguments(p)
    p.set_defaults(command=name)
    return p


def _commands_epilog(module) -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["commands (hf-bomerge COMMAND --help):"]
    lines += [f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values()]
    return "\n".join(lines) + ("\n\n" + module.EPILOG if getattr(module, "EPILOG", None) else "")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The first word picks the command when it is a registered name; anything else is the search's SOURCE."""
    if argv and argv[0] in COMMANDS:
        return build_parser(argv[0]).parse_args(argv[1:])
    return build_parser(DEFAULT).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM ends the run like Ctrl-C
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    _configure_logging(debug)
    try:
        return importlib.import_module(COMMANDS[args.command].module).run(args)
    except BOMergeError as err:
        if debug:
            raise
        print(f"hf-bomerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-bomerge: interrupted. Finished trials are saved in the study and no output folder was "
              "left half-written; run the same command again to resume.", file=sys.stderr)
        return 130


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted (not the stream of the first call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(debug: bool) -> None:
    """One stderr handler on the `hf_bomerge` logger, none on the root logger. `logging.basicConfig` gave the root
    one as well, so every warning of a library with its own handler (huggingface_hub's retries) printed twice.
    Records still propagate (pytest's caplog sees them); libraries without a handler reach `logging.lastResort`."""
    log = logging.getLogger("hf_bomerge")
    log.setLevel(logging.DEBUG if debug else logging.WARNING)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
        log.addHandler(handler)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
