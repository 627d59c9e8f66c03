"""hf-bomerge: merge the intermediate checkpoints of one pretraining run with Bayesian optimization."""

__version__ = "0.1.0"

__all__ = ["search", "merge", "from_recipe", "from_study", "MergeResult", "BOMergeError"]


def __getattr__(name: str):
    # Lazy: `import hf_bomerge` stays cheap (no torch) for the CLI's --help and error paths.
    if name in ("search", "merge", "from_recipe", "from_study", "MergeResult"):
        from . import api

        return getattr(api, name)
    if name == "BOMergeError":
        from .errors import BOMergeError

        return BOMergeError
    raise AttributeError(name)
