"""Search spaces: how the sampler's parameters map to a weight vector over N checkpoints (oldest first).

Each space is one small class registered by name in `SPACES` (a new space is one class here):
- `pairwise`: θ = λ·θ_t + (1−λ)·θ_{t−1}, λ ∈ [λ_min, 1]; both bounds are evaluated first.
- `simplex`: N coordinates xᵢ ∈ [ε, 1] on a log scale, wᵢ ∝ xᵢ − ε: every single checkpoint is an exact
  corner and no face of the box collapses to one weight vector (benchmarks/README.md, "search").
- `family`: the last `window` checkpoints weighted ∝ (1−decay)^age: two dimensions for any N.
- `layered` (`--layer-groups G`): a weight vector per depth group, interpolated between a shallow and a deep
  simplex vector (`hf_bomerge.layers`): 2·N dimensions whatever G.

Nothing here imports Optuna: a space only calls `trial.suggest_float/suggest_int` on the trial it is given,
so the command line can list the spaces without importing the sampler.

>>> space = make_space("auto", 2)
>>> space.name, space.param_names(), space.weights({"lambda": 0.75})
('pairwise', ['lambda'], [0.25, 0.75])
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, Sequence

from . import weights as W
from .errors import StudyError
from .layers import LayerGroups, LayerWeights

if TYPE_CHECKING:
    import optuna

MAX_SIMPLEX = 8
# The simplex coordinates' floor: xᵢ = ε drops checkpoint i; the box spans weight ratios up to 1/ε ≈ e⁶ on a
# log scale, as softmax logits in [−3, 3] would, but with exact corners.
SIMPLEX_FLOOR = math.exp(-6.0)


class SearchSpace:
    """A parameterization of weight vectors over `n` checkpoints. Subclasses set `name` and implement
    `suggest`, `weights`, `param_names` and `seeds`; `params_for` inverts `weights` where it can."""

    name: ClassVar[str]

    def __init__(self, n: int, lambda_min: float = 0.0):
        self.n, self.lambda_min = n, lambda_min

    @property
    def kind(self) -> str:
        """The registered name (the recipe's and the study's `search`)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, lambda_min={self.lambda_min})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (other.n, other.lambda_min) == (self.n, self.lambda_min)

    def suggest(self, trial: optuna.Trial) -> list[float]:
        """The trial's weight vector (an enqueued seed or a retried trial gets its fixed parameters)."""
        raise NotImplementedError

    def weights(self, params: dict) -> list[float]:
        raise NotImplementedError

    def param_names(self) -> list[str]:
        raise NotImplementedError

    def seeds(self, labels: Sequence[str], ema_alpha: float = 0.2) -> list[tuple[str, list[float]]]:
        """The baselines, in the order they are evaluated: single checkpoints, then the uniform average and EMA."""
        return self.singles(labels) + [("uniform", W.uniform(self.n)), ("ema", W.ema(self.n, ema_alpha))]

    def singles(self, labels: Sequence[str]) -> list[tuple[str, list[float]]]:
        raise NotImplementedError

    def raw_params(self, weights: Sequence[float]) -> dict | None:
        raise NotImplementedError

    def params_for(self, weights: Sequence[float]) -> dict | None:
        """The parameters that give `weights`, or None when the space does not contain them."""
        params = self.raw_params(weights)
        if params is None or not same_weights(self.weights(params), weights):
            return None
        return params


SPACES: dict[str, type[SearchSpace]] = {}


def register(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: make `cls` available as `--search <cls.name>`."""
    SPACES[cls.name] = cls
    return cls


@register
class Pairwise(SearchSpace):
    """Two adjacent checkpoints: [1−λ, λ], λ ∈ [λ_min, 1] (Liu et al. 2025)."""

    name = "pairwise"

    def suggest(self, trial):
        return W.pairwise(trial.suggest_float("lambda", self.lambda_min, 1.0))

    def weights(self, params):
        return W.pairwise(params["lambda"])

    def param_names(self):
        return ["lambda"]

    def raw_params(self, weights):
        return {"lambda": weights[1]} if weights[1] >= self.lambda_min - 1e-12 else None

    def singles(self, labels):
        # Both bounds of λ first: the GP's first acquisition then interpolates between them.
        low = f"λ={self.lambda_min:g}" if self.lambda_min > 0 else labels[0]
        return [(labels[1], W.one_hot(2, 1)), (low, W.pairwise(self.lambda_min))]


@register
class Simplex(SearchSpace):
    """Any convex combination of N checkpoints: wᵢ ∝ xᵢ − ε, xᵢ ∈ [ε, 1] on a log scale."""

    name = "simplex"

    def suggest(self, trial):
        return self.weights({p: trial.suggest_float(p, SIMPLEX_FLOOR, 1.0, log=True) for p in self.param_names()})

    def weights(self, params):
        return W.from_ratio_coords([params[p] for p in self.param_names()], SIMPLEX_FLOOR)

    def param_names(self):
        return [f"x{i}" for i in range(self.n)]

    def raw_params(self, weights):
        return dict(zip(self.param_names(), W.to_ratio_coords(weights, SIMPLEX_FLOOR)))

    def singles(self, labels):
        return [(labels[i], W.one_hot(self.n, i)) for i in reversed(range(self.n))]


@register
class Family(SearchSpace):
    """The last `window` checkpoints weighted ∝ (1−decay)^age: two dimensions for any N."""

    name = "family"

    def suggest(self, trial):
        return W.window_decay(self.n, trial.suggest_int("window", 1, self.n, log=True),
                              trial.suggest_float("decay", 0.0, 1.0))

    def weights(self, params):
        return W.window_decay(self.n, params["window"], params["decay"])

    def param_names(self):
        return ["window", "decay"]

    def raw_params(self, weights):
        return {"window": len([w for w in weights if w > 0]), "decay": 0.0}

    def singles(self, labels):
        return [(labels[-1], W.one_hot(self.n, self.n - 1))]


@register
class Layered(SearchSpace):
    """Depth-wise weights: a shallow and a deep simplex vector (N log-ratio coordinates each, as `simplex`),
    group g of G+2 at depth t = g/(G+1) weighted ∝ (1−t)·shallow + t·deep. Seeded with the simplex's
    baselines at shallow = deep, so every global baseline is in the space. `weights` gives a `LayerWeights`;
    `plain` its parameter-weighted mean over the groups (what a trial records as its `weights`).

    >>> space = Layered(2, groups=LayerGroups(1, 2), sizes=[1, 2, 1])
    >>> lw = space.weights({"s0": 1.0, "s1": SIMPLEX_FLOOR, "d0": SIMPLEX_FLOOR, "d1": 1.0})
    >>> lw.as_dict()["blocks 0-1"], space.plain(lw)
    ([0.5, 0.5], [0.5, 0.5])
    """

    name = "layered"

    def __init__(self, n: int, lambda_min: float = 0.0, groups: LayerGroups | None = None,
                 sizes: Sequence[int] | None = None):
        super().__init__(n, lambda_min)
        if groups is None:
            raise StudyError("--search layered needs --layer-groups G (the number of groups of transformer blocks).")
        if n > MAX_SIMPLEX:
            raise StudyError(f"--layer-groups searches 2·N weights and takes at most {MAX_SIMPLEX} revisions, got "
                             f"{n}; narrow --revisions or lower --max-checkpoints.")
        self.groups, self.sizes = groups, list(sizes) if sizes is not None else [1] * len(groups)

    def __eq__(self, other) -> bool:
        return super().__eq__(other) and (other.groups, other.sizes) == (self.groups, self.sizes)

    def suggest(self, trial):
        return self.weights({p: trial.suggest_float(p, SIMPLEX_FLOOR, 1.0, log=True) for p in self.param_names()})

    def weights(self, params):
        shallow = W.from_ratio_coords([params[f"s{i}"] for i in range(self.n)], SIMPLEX_FLOOR)
        deep = W.from_ratio_coords([params[f"d{i}"] for i in range(self.n)], SIMPLEX_FLOOR)
        return LayerWeights.interpolate(self.groups, shallow, deep)

    def plain(self, weights) -> list[float]:
        return weights.mean(self.sizes) if isinstance(weights, LayerWeights) else list(weights)

    def param_names(self):
        return [f"s{i}" for i in range(self.n)] + [f"d{i}" for i in range(self.n)]

    def raw_params(self, weights):
        x = W.to_ratio_coords(weights, SIMPLEX_FLOOR)
        return {**{f"s{i}": v for i, v in enumerate(x)}, **{f"d{i}": v for i, v in enumerate(x)}}

    def params_for(self, weights):
        params = self.raw_params(weights)
        return params if same_weights(self.weights(params).vectors[0], weights) else None

    def singles(self, labels):
        return [(labels[i], W.one_hot(self.n, i)) for i in reversed(range(self.n))]


SEARCHES = ("auto", *SPACES)


def make_space(search: str, n: int, lambda_min: float = 0.0) -> SearchSpace:
    """The space registered as `search`; `auto` picks pairwise for 2 checkpoints, simplex up to 8, family beyond.

    >>> make_space("auto", 12).name
    'family'
    """
    if search != "auto" and search not in SPACES:
        raise StudyError(f"Unknown --search {search!r}; choose one of auto, {', '.join(SPACES)}.")
    if n < 2:
        raise StudyError(f"A merge needs at least 2 checkpoints, got {n}; widen --revisions.")
    if search == "auto":
        search = "pairwise" if n == 2 else "simplex" if n <= MAX_SIMPLEX else "family"
    if search == "pairwise" and n != 2:
        raise StudyError(f"--search pairwise merges two adjacent checkpoints, but {n} were selected; "
                         "select two (e.g. --revisions last:2) or use --search simplex/family.")
    if not 0.0 <= lambda_min < 1.0:
        raise StudyError(f"--lambda-min must be in [0, 1), got {lambda_min}.")
    return SPACES[search](n, lambda_min)


def same_weights(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) < 1e-9 for x, y in zip(a, b))
