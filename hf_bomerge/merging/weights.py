"""Weight vectors over checkpoints (oldest first). Every merge here is one: θ = Σ wᵢ θᵢ.

Fixed rules (SMA, EMA, WMA, pairwise λ, explicit) and the parameterizations the search uses
(pairwise λ, the simplex, a low-dimensional window/decay family) all end in a weight vector.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import WeightsError
from . import schedules

TOLERANCE = 1e-6


def uniform(n: int) -> list[float]:
    """Simple moving average (SMA, a uniform soup): wᵢ = 1/N.

    >>> uniform(4)
    [0.25, 0.25, 0.25, 0.25]
    """
    return [1.0 / n] * n


def ema(n: int, alpha: float = 0.2) -> list[float]:
    """Exponential moving average as in PMA: wᵢ = α(1−α)^(N−i), the oldest taking the remainder.

    >>> [round(w, 3) for w in ema(3, 0.2)]
    [0.64, 0.16, 0.2]
    """
    if not 0.0 < alpha <= 1.0:
        raise WeightsError(f"--ema-alpha must be in (0, 1], got {alpha}.")
    w = [alpha * (1 - alpha) ** (n - 1 - i) for i in range(n)]
    w[0] = max(0.0, 1.0 - sum(w[1:]))  # not -2e-16 when (1-α)^(N-1) is below the sum's rounding
    return w


def wma(n: int) -> list[float]:
    """Weighted moving average: wᵢ ∝ i (the latest weighs most).

    >>> wma(3)
    [0.16666666666666666, 0.3333333333333333, 0.5]
    """
    total = n * (n + 1) / 2
    return [(i + 1) / total for i in range(n)]


def pairwise(lam: float) -> list[float]:
    """θ = λ·θ_t + (1−λ)·θ_{t−1}, as [1−λ, λ] (oldest first).

    >>> pairwise(0.75)
    [0.25, 0.75]
    """
    return [1.0 - lam, lam]


def one_hot(n: int, i: int) -> list[float]:
    return [1.0 if j == i else 0.0 for j in range(n)]


def window_decay(n: int, window: int, decay: float) -> list[float]:
    """The `family` search space: the last `window` checkpoints, weighted ∝ (1−decay)^age.

    decay=0 is the uniform average of the window, decay=1 is the latest checkpoint alone.

    >>> window_decay(4, 2, 0.0)
    [0.0, 0.0, 0.5, 0.5]
    """
    window = max(1, min(int(window), n))
    raw = [0.0] * (n - window) + [(1.0 - decay) ** (n - 1 - i) for i in range(n - window, n)]
    if decay >= 1.0:
        raw = one_hot(n, n - 1)
    total = sum(raw)
    return [r / total for r in raw]


def from_simplex_coords(z: Sequence[float]) -> list[float]:
    """Map N−1 numbers in [0, 1] onto the N-simplex by stick-breaking.

    Uniformly random z gives uniformly random (Dirichlet(1)) weights (the search benchmark's reference draws;
    the simplex search itself uses `from_ratio_coords`, whose corners do not collapse).

    >>> [round(w, 6) for w in from_simplex_coords(to_simplex_coords([0.25, 0.25, 0.5]))]
    [0.25, 0.25, 0.5]
    """
    n = len(z) + 1
    weights, rest = [], 1.0
    for k, zk in enumerate(z):
        u = 1.0 - (1.0 - zk) ** (1.0 / (n - 1 - k))
        weights.append(rest * u)
        rest -= rest * u
    weights.append(rest)
    return weights


def to_simplex_coords(w: Sequence[float]) -> list[float]:
    """Inverse of `from_simplex_coords` (where the stick is used up, the remaining coordinates are 0)."""
    n = len(w)
    z, rest = [], 1.0
    for k in range(n - 1):
        u = min(1.0, w[k] / rest) if rest > 1e-12 else 0.0  # a stick of 1e-8 still holds a weight of 1e-8
        z.append(1.0 - (1.0 - u) ** (n - 1 - k))
        rest -= w[k]
    return z


def from_ratio_coords(x: Sequence[float], floor: float = 0.0) -> list[float]:
    """Map N numbers in [floor, 1] onto the N-simplex: wᵢ ∝ xᵢ − floor (all at the floor: uniform).

    A coordinate at the floor drops its checkpoint, so every single checkpoint is a corner of the box and
    no face of the box collapses to a point (only scaling all xᵢ − floor together leaves w unchanged).

    >>> from_ratio_coords([1.0, 0.5, 0.5])
    [0.5, 0.25, 0.25]
    """
    raw = [max(0.0, v - floor) for v in x]
    total = sum(raw)
    return [r / total for r in raw] if total > 0 else uniform(len(x))


def to_ratio_coords(w: Sequence[float], floor: float = 0.0) -> list[float]:
    """The coordinates of `w` in `from_ratio_coords` whose largest is 1 (a single checkpoint: a one-hot corner).

    >>> to_ratio_coords([0.5, 0.25, 0.25])
    [1.0, 0.5, 0.5]
    """
    top = max(w)
    return [1.0 if v == top else min(1.0, floor + (1.0 - floor) * max(0.0, v) / top) for v in w]


# The fixed rules (`--method`): name -> fn(n, ema_alpha, names=…, window=…, tokens_per_step=…) -> weights, the
# keywords for the rules that need the revisions' training progress. A new rule is one decorated function.
RULES: dict[str, Callable[..., list[float]]] = {}


def fixed_rule(*names: str):
    """Register `fn(n, ema_alpha, **context) -> weights` as `--method NAME` (the first name; the others are
    aliases). `context`: `names` (the revisions, oldest first), `window`, `tokens_per_step`."""
    def add(fn: Callable[..., list[float]]):
        for name in names:
            RULES[name] = fn
        return fn
    return add


@fixed_rule("sma", "uniform")
def _sma(n: int, ema_alpha: float, **_) -> list[float]:
    return uniform(n)


@fixed_rule("ema")
def _ema(n: int, ema_alpha: float, **_) -> list[float]:
    return ema(n, ema_alpha)


@fixed_rule("wma")
def _wma(n: int, ema_alpha: float, **_) -> list[float]:
    return wma(n)


def _wsm_rule(method: str):
    def fn(n: int, ema_alpha: float, names=None, window=None, tokens_per_step=None, **_) -> list[float]:
        from ..sources.revisions import progress_values  # the sources package imports torch; the CLI options need this light

        if names is None or len(names) != n:
            raise WeightsError(f"--method {method} weighs the revisions by their training progress; it needs "
                               "their names (steps or tokens).")
        return schedules.wsm(method, progress_values(names, tokens_per_step)[0], window)
    return fn


for _method in schedules.WSM_METHODS:
    fixed_rule(_method)(_wsm_rule(_method))

METHODS = tuple(name for name in RULES if name != "uniform")  # what --method offers


def rule(method: str, n: int, ema_alpha: float = 0.2, **context) -> list[float]:
    """A named fixed rule (`RULES`): `sma`/`uniform`, `ema`, `wma`, and WSM's `wsm-linear|wsm-cosine|wsm-sqrt`
    (`names=` the revisions, `window=` in their progress unit, default their whole span; `tokens_per_step=`).

    >>> rule("wma", 2)
    [0.3333333333333333, 0.6666666666666666]
    >>> rule("wsm-linear", 3, names=["step100", "step200", "step300"], window=100)
    [0.0, 0.5, 0.5]
    """
    if method not in RULES:
        raise WeightsError(f"Unknown --method {method!r}; choose one of {', '.join(METHODS)}.")
    if context.get("window") is not None and method not in schedules.WSM_METHODS:
        raise WeightsError(f"--window sets the window of a schedule-shaped merge ({', '.join(schedules.WSM_METHODS)}); "
                           f"--method {method} has none. Drop --window or pick a wsm-* method.")
    return RULES[method](n, ema_alpha, **context)


def parse_weights(text: str) -> list[float]:
    """`"0.25,0.75"` → [0.25, 0.75]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise WeightsError(f"--weights must be comma-separated numbers, got {text!r}.") from err


def check(weights: Sequence[float], n: int, allow_extrapolation: bool = False) -> list[float]:
    """Validate a weight vector for N checkpoints (oldest first).

    Without `allow_extrapolation` the weights must be finite, non-negative and sum to 1.

    >>> check([0.5, 0.5], 2)
    [0.5, 0.5]
    """
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise WeightsError(f"Got {len(weights)} weights for {n} checkpoints; give one weight per "
                           "revision, oldest first.")
    if not all(math.isfinite(w) for w in weights):
        raise WeightsError(f"Weights must be finite numbers, got {weights}.")
    if allow_extrapolation:
        return weights
    if any(w < 0 for w in weights):
        raise WeightsError(f"Negative weights {weights} extrapolate beyond the checkpoints; pass "
                           "--allow-extrapolation if that is what you want.")
    if abs(sum(weights) - 1.0) > TOLERANCE:
        raise WeightsError(f"Weights {weights} sum to {sum(weights):.6g}, not 1; normalize them or pass "
                           "--allow-extrapolation.")
    return weights
