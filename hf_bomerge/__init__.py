"""hf-bomerge: merge the intermediate checkpoints of one pretraining run with Bayesian optimization."""

from .defaults import VERSION as __version__  # noqa: F401 - the package version
from .errors import BOMergeError

__all__ = ["search", "merge", "search_with", "merge_with", "from_recipe", "from_study", "MergeResult",
           "BOMergeError", "watch_once"]


def __getattr__(name: str):
    # Lazy: `import hf_bomerge` stays cheap (no torch) for the CLI's --help and error paths.
    if name in ("search", "merge", "search_with", "merge_with", "from_recipe", "from_study", "MergeResult"):
        from . import api  # heavy (torch): only when the API is used

        return getattr(api, name)
    if name == "watch_once":  # the module is `hf_bomerge.searching.watch` (its `watch` function too)
        from importlib import import_module

        return import_module(".searching.watch", __name__).watch_once
    raise AttributeError(name)
