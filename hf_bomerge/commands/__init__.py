"""The `hf-bomerge` subcommands, one module each, registered in `hf_bomerge.cli.COMMANDS`.

A command module defines `add_arguments(parser)` and `run(args) -> int` (the exit code) and imports the
pipeline (torch, optuna, transformers) inside `run` only, so `hf-bomerge COMMAND --help` stays fast.
"""
