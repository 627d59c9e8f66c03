"""The pinned merge: revisions at their commits, weights, dtype and copy rule, as `bomerge_recipe.yaml` holds
them and `hf-bomerge recipe` rebuilds them. Every field of a recipe read from a file is checked by type and value.

>>> Recipe.from_dict(Recipe("org/model", ["a"], ["0" * 40], [1.0]).as_dict()).revisions
['a']
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .defaults import VERSION
from .duplicates import Duplicates
from .errors import RecipeError

MERGE_DTYPES = ("float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16", "fp64")  # engine.DTYPES


@dataclass
class Recipe:
    """A merge pinned to its commits: what `bomerge_recipe.yaml` holds and `hf-bomerge recipe` rebuilds.

    `copied` lists the float tensors copied from the latest revision rather than weighted (None in a recipe
    written before the rule was recorded: it is derived again). A layered merge adds `layer_weights` (one vector
    per depth group) and its grouping rule `layer_groups`; `weights` is then their mean.
    """

    source: str
    revisions: list[str]
    shas: list[str]
    weights: list[float] = field(default_factory=list)
    source_kind: str = "hub"
    dtype: str | None = None
    copied: list[str] | None = None
    layer_weights: dict[str, list[float]] | None = None
    layer_groups: dict | None = None
    duplicates: Duplicates = field(default_factory=Duplicates)  # revisions left out: they served the same weights
    source_options: dict[str, str] | None = None  # how the source was opened (a DCP folder's config, key_map)

    def as_dict(self) -> dict:
        recipe = {"hf_bomerge_version": VERSION, "source": self.source, "source_kind": self.source_kind,
                  "revisions": [{"name": n, "sha": s} for n, s in zip(self.revisions, self.shas)],
                  "weights": list(self.weights), "dtype": self.dtype}
        if self.copied is not None:  # an unknown rule stays unknown: `recipe` derives it again
            recipe["copied"] = sorted(self.copied)
        if self.layer_weights is not None or self.layer_groups is not None:
            recipe.update(layer_weights=self.layer_weights, layer_groups=self.layer_groups)
        if self.duplicates:
            recipe["duplicates"] = self.duplicates.as_dict()
        return recipe | ({"source_options": dict(self.source_options)} if self.source_options else {})

    @classmethod
    def from_dict(cls, recipe: Mapping, where: str = "the recipe", weighted: bool = True) -> Recipe:
        """Every field checked by type and value; `weighted=False` for a study's recipe (its weights are its trials)."""
        if not isinstance(recipe, Mapping):
            raise RecipeError(f"Cannot read {where}: it is not a YAML mapping of fields (it is a "
                              f"{type(recipe).__name__}). {_RECIPE}")

        def get(key: str, ok, what: str, default=_MISSING):
            value = recipe.get(key, default)
            if value is _MISSING:
                raise RecipeError(f"Cannot read {where}: {key!r} is missing. {_RECIPE}")
            if not ok(value):
                raise RecipeError(f"Cannot read {where}: `{key}` must be {what}, got {reprlib.repr(value)}. {_RECIPE}")
            return value

        source = get("source", lambda v: isinstance(v, str) and v, "a Hub repo id or a path")
        from .sources import SOURCES  # the registered kinds (imports torch): only where a recipe is read

        kinds = [cls.kind for cls in SOURCES]
        kind = get("source_kind", lambda v: v in kinds, " or ".join(kinds), "hub")
        revisions = get("revisions", lambda v: isinstance(v, list) and v and all(
            isinstance(r, Mapping) and isinstance(r.get("name"), str) and r["name"] and "," not in r["name"]
            and isinstance(r.get("sha"), str) and _PIN.fullmatch(r["sha"]) for r in v),
            "a list of {name: REVISION, sha: COMMIT}, each sha a full commit id (40 or 64 lowercase hex digits)")
        n = len(revisions)
        numbers = f"a list of {n} finite numbers (one per revision, oldest first)"
        weights = get("weights", lambda v: _numbers(v, n) or not weighted and not v, numbers,
                      _MISSING if weighted else [])
        layer_weights = get("layer_weights", lambda v: v is None or isinstance(v, Mapping) and v and all(
            isinstance(k, str) and _numbers(w, n) for k, w in v.items()), f"a map of depth group to {numbers}", None)
        return cls(source, [r["name"] for r in revisions], [r["sha"] for r in revisions], list(weights or []), kind,
                   get("dtype", lambda v: v is None or v in MERGE_DTYPES, f"one of {', '.join(MERGE_DTYPES)}", None),
                   get("copied", lambda v: v is None or isinstance(v, list) and all(isinstance(c, str) for c in v),
                       "a list of tensor names", None),
                   None if layer_weights is None else dict(layer_weights),
                   get("layer_groups", lambda v: v is None or isinstance(v, Mapping) and all(
                       type(v.get(k)) is int and v[k] >= 1 for k in ("groups", "layers")),
                       "a map with whole numbers `groups` and `layers` (at least 1)", None),
                   Duplicates.from_dict(get("duplicates", lambda v: v is None or isinstance(v, Mapping),
                                            "a map of `identical` and `partial`", None)),
                   get("source_options", lambda v: v is None or isinstance(v, Mapping) and all(
                       k in ("config", "key_map") and isinstance(x, str) for k, x in v.items()),
                       "a map of `config` and `key_map` to paths or names", None))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        import yaml

        try:
            recipe = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise RecipeError(f"Cannot read the recipe {path}: {' '.join(str(err).split())}. {_RECIPE}") from err
        return cls.from_dict(recipe, f"the recipe {path}")



_MISSING = object()
_PIN = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # a commit id (or a folder's 40-digit fingerprint)
_RECIPE = ("A recipe is the bomerge_recipe.yaml that hf-bomerge writes next to a merged model: fix it, or write it "
           "again by re-running the merge.")


def _numbers(value, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(
        type(w) in (int, float) and math.isfinite(w) for w in value)


