"""Search spaces: how the sampler's parameters map to a weight vector over N checkpoints (oldest first).

Each space is one small class registered by name in `SPACES` (a new space is one class here):
- `pairwise`: θ = λ·θ_t + (1−λ)·θ_{t−1}, λ ∈ [λ_min, 1]; both bounds are evaluated first.
- `simplex`: N coordinates xᵢ ∈ [ε, 1] on a log scale, wᵢ ∝ xᵢ − ε: every single checkpoint is an exact
  corner and no face of the box collapses to one weight vector (benchmarks/README.md, "search").
- `family`: the last `window` checkpoints weighted ∝ (1−decay)^age: two dimensions for any N.
- `layered` (`--layer-groups G`): a weight vector per depth group, interpolated between a shallow and a deep
  simplex vector (`hf_bomerge.merging.layers`): 2·N dimensions whatever G.
- `schedule`: WSM weights emulating an LR decay over the last window of training *progress* (`schedules.py`):
  window × shape × floor, three dimensions for any N; needs each revision's progress (tokens or steps).

Nothing here imports Optuna: a space only calls `trial.suggest_float/suggest_int` on the trial it is given,
so the command line can list the spaces without importing the sampler.

>>> space = make_space("auto", 2)
>>> space.name, space.param_names(), space.weights({"lambda": 0.75})
('pairwise', ['lambda'], [0.25, 0.75])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from ..errors import RevisionError, StudyError
from ..merging import schedules as S
from ..merging import weights as W
from ..merging.layers import LayerGroups, LayerWeights

logger = logging.getLogger("hf_bomerge")

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
    needs_progress: ClassVar[bool] = False

    def __init__(self, n: int, lambda_min: float = 0.0, progress: Sequence[float] | None = None):
        self.n, self.lambda_min = n, lambda_min
        self.progress = None if progress is None else [float(p) for p in progress]

    @property
    def kind(self) -> str:
        """The registered name (the recipe's and the study's `search`)."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, lambda_min={self.lambda_min})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and ((other.n, other.lambda_min, other.progress)
                                              == (self.n, self.lambda_min, self.progress))

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


@register
class Schedule(SearchSpace):
    """WSM weights for a decay over the last window of training progress (`schedules.decay_weights`): three
    dimensions for any N, `window` (a fraction of the revisions' progress span, log scale: from a quarter of the
    last gap to one gap before the oldest), `shape` (k of the exp decay: k > 0 drops early, 0 is linear, k < 0
    late) and `floor` (the LR left at the end: 1 is the latest checkpoint alone).

    >>> space = make_space("schedule", 5, progress=[0, 1, 2, 3, 4])
    >>> [round(w, 3) for w in space.weights({"window": 1.0, "shape": 0.0, "floor": 0.0})]
    [0.125, 0.25, 0.25, 0.25, 0.125]
    """

    name = "schedule"
    needs_progress = True
    SHAPE = 16.0  # |k| ≤ 16: across the window, the weight density changes by up to e¹⁶

    def __init__(self, n, lambda_min=0.0, progress=None):
        super().__init__(n, lambda_min, progress)
        p = self.progress
        span = p[-1] - p[0]
        if any(b <= a for a, b in zip(p, p[1:])):
            raise StudyError(f"--search schedule needs revisions whose progress increases strictly, got {p}.")
        self.unit = [(v - p[0]) / span for v in p]  # progress on [0, 1]: the window is a fraction of the span
        self.low = 0.25 * (self.unit[-1] - self.unit[-2])
        self.high = 1.0 + (self.unit[1] - self.unit[0])

    def suggest(self, trial):
        return self.weights({"window": trial.suggest_float("window", self.low, self.high, log=True),
                             "shape": trial.suggest_float("shape", -self.SHAPE, self.SHAPE),
                             "floor": trial.suggest_float("floor", 0.0, 1.0)})

    def weights(self, params):
        return S.decay_weights(self.unit, params["window"], "exp", params["shape"], params["floor"])

    def param_names(self):
        return ["window", "shape", "floor"]

    def seeds(self, labels, ema_alpha=0.2):
        # the latest, uniform and EMA (out of this space where spacing is uneven: evaluated beside the study),
        # then WSM's linear decay over the whole span and over its latter half
        known = {"wsm-linear": {"window": 1.0, "shape": 0.0, "floor": 0.0},
                 "wsm-linear-half": {"window": 0.5, "shape": 0.0, "floor": 0.0}}
        self._known = [(self.weights(p), p) for p in known.values()]
        return super().seeds(labels, ema_alpha) + [(label, self.weights(p)) for label, p in known.items()]

    def singles(self, labels):
        return [(labels[-1], W.one_hot(self.n, self.n - 1))]

    def raw_params(self, weights):
        """Numerical inversion (least squares from a few starts); `params_for` keeps it only if exact."""
        if same_weights(weights, W.one_hot(self.n, self.n - 1)):
            return {"window": self.high, "shape": 0.0, "floor": 1.0}
        for w, params in getattr(self, "_known", ()):
            if same_weights(weights, w):
                return dict(params)
        from scipy.optimize import least_squares

        target = list(weights)
        first = next(i for i, w in enumerate(target) if w > 1e-12)
        starts = [1.0 - self.unit[first - 1] - 1e-9 if first else self.high,
                  1.0 - (self.unit[first] + self.unit[max(0, first - 1)]) / 2 if first else 1.0]
        bounds = ([math.log(self.low), -self.SHAPE, 0.0], [math.log(self.high), self.SHAPE, 1.0])
        best = None
        for f in starts:
            for k in (0.0, -4.0, 4.0):
                for floor in (0.0, target[-1] / 2):
                    x0 = [min(max(math.log(max(f, self.low)), bounds[0][0]), bounds[1][0]), k, floor]
                    fit = least_squares(lambda x: [a - b for a, b in zip(self._w(x), target)], x0, bounds=bounds,
                                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
                    if best is None or fit.cost < best.cost:
                        best = fit
                    if best.cost < 1e-24:
                        return self._params(best.x)
        return self._params(best.x)

    def _w(self, x):
        return self.weights(self._params(x))

    def _params(self, x):
        return {"window": min(self.high, max(self.low, math.exp(x[0]))), "shape": float(x[1]), "floor": float(x[2])}


SEARCHES = ("auto", *SPACES)


def make_space(search: str, n: int, lambda_min: float = 0.0, progress: Sequence[float] | None = None) -> SearchSpace:
    """The space registered as `search`; `auto` picks pairwise for 2 checkpoints, simplex up to 8, schedule
    beyond. `progress`: each checkpoint's training progress (tokens or steps, oldest first; the `schedule`
    space needs it: `revisions.progress_values`).

    >>> make_space("auto", 12, progress=range(1000, 13000, 1000)).name
    'schedule'
    """
    if search != "auto" and search not in SPACES:
        raise StudyError(f"Unknown --search {search!r}; choose one of auto, {', '.join(SPACES)}.")
    if n < 2:
        raise StudyError(f"A merge needs at least 2 checkpoints, got {n}; widen --revisions.")
    if search == "auto":
        search = auto_kind(n)
    if search == "pairwise" and n != 2:
        raise StudyError(f"--search pairwise merges two adjacent checkpoints, but {n} were selected; "
                         "select two (e.g. --revisions last:2) or use --search simplex/family.")
    if not 0.0 <= lambda_min < 1.0:
        raise StudyError(f"--lambda-min must be in [0, 1), got {lambda_min}.")
    if SPACES[search].needs_progress and (progress is None or len(progress) != n):
        raise StudyError(f"--search {search} weighs the checkpoints by their training progress, but "
                         f"{'none' if progress is None else len(progress)} progress values were given for {n} "
                         "checkpoints; pass progress= (revisions.progress_values) or use --search family.")
    return SPACES[search](n, lambda_min, progress)


def auto_kind(n: int) -> str:
    """What `--search auto` picks for n checkpoints."""
    return "pairwise" if n == 2 else "simplex" if n <= MAX_SIMPLEX else "schedule"


def space_for(search: str, names: Sequence[str], lambda_min: float = 0.0) -> SearchSpace:
    """`make_space` for resolved revisions (oldest first): their progress is read from the names when the space
    needs it. `auto` falls back to `family` where the names carry no progress.

    >>> space = space_for("auto", [f"step{100 * i}" for i in range(1, 10)])
    >>> space.kind, space.unit[1]
    ('schedule', 0.125)
    """
    from ..sources.revisions import progress_values  # the sources package imports torch; specs need this light

    kind = auto_kind(len(names)) if search == "auto" and len(names) >= 2 else search
    progress = None
    if kind in SPACES and SPACES[kind].needs_progress:
        try:
            progress = progress_values(names)[0]
        except RevisionError as err:
            if search != "auto":
                raise
            logger.warning("%s --search auto uses the family space instead.", err)
            kind = "family"
    return make_space(kind, len(names), lambda_min, progress)


def same_weights(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(abs(x - y) < 1e-9 for x, y in zip(a, b))
