"""Schedule-shaped merge weights: checkpoints of a constant-LR run merged so as to emulate a learning-rate decay
over the last *window* of training progress (WSM, Tian et al. 2025, arXiv 2507.17634; Megatron-LM's weighted
checkpoint merge, styles linear and minus-sqrt, window in tokens).

The mapping (derived here; WSM's Theorem 3.1 is its discrete form). Let the run train at a constant LR, with
checkpoints θ₀ … θ_K at progress p₀ < … < p_K (tokens or steps), and let a decay schedule with LR multiplier
m(t) start at s = p_K − W (m = 1 before s) and run to e = p_K. Had the run used m, its update over [t, t+dt]
would be m(t)·dθ(t), so the decayed model is θ̂ = θ₀ + ∫ m dθ. Between two checkpoints only the endpoints are
known; take the constant-LR path to be straight there (the update rate constant over the segment). Then

    θ̂ = θ₀ + Σⱼ w̄ⱼ (θⱼ − θⱼ₋₁),    w̄ⱼ = the mean of m over (pⱼ₋₁, pⱼ],

and collecting the terms of each θⱼ (WSM's c = w − w_next):

    c₀ = 1 − w̄₁,    cⱼ = w̄ⱼ − w̄ⱼ₊₁,    c_K = w̄_K.

So checkpoint j's weight is the LR drop between its segment and the next one, the latest keeps the LR left at
the end, and segments before s (w̄ = 1) give nothing: a window is a span of *progress*, and unevenly spaced
checkpoints are weighted by progress, not by index. The weights are non-negative whenever m is non-increasing
and sum to 1 (the sum telescopes). A window longer than the span puts the mass before p₀ on θ₀.
Special cases: m ≡ 1 (no decay) is the latest checkpoint alone; a linear decay gives equal weights to the
interior checkpoints and half to the two ends (the trapezoid rule); 1−sqrt weighs the window's start most.

Decays m(u), u = (t − s)/W ∈ [0, 1], each ending at `floor` (the LR left, a fraction of the peak):
linear 1−u, cosine (1+cos πu)/2, sqrt 1−√u (Megatron's minus-sqrt), exp (e^{−ku} − e^{−k})/(1 − e^{−k})
(k > 0 drops early, k < 0 late; k → 0 is linear), each as m = floor + (1 − floor)·d(u).

>>> [round(w, 3) for w in decay_weights([0, 1, 2, 3, 4], 4.0, "linear")]
[0.125, 0.25, 0.25, 0.25, 0.125]
>>> decay_weights([0, 1, 2, 3, 4], 2.0, "linear", floor=1.0)
[0.0, 0.0, 0.0, 0.0, 1.0]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import WeightsError

# name -> D(u, shape): ∫₀ᵘ d, where d is the decay from 1 (u = 0) to 0 (u = 1)
DECAYS: dict[str, Callable[[float, float], float]] = {}


def _decay(name: str):
    def add(fn):
        DECAYS[name] = fn
        return fn
    return add


@_decay("linear")
def _linear(u: float, shape: float) -> float:
    return u - u * u / 2


@_decay("cosine")
def _cosine(u: float, shape: float) -> float:
    return u / 2 + math.sin(math.pi * u) / (2 * math.pi)


@_decay("sqrt")
def _sqrt(u: float, shape: float) -> float:
    return u - 2.0 / 3.0 * u ** 1.5


@_decay("exp")
def _exp(u: float, k: float) -> float:
    if abs(k) < 1e-6:
        return _linear(u, 0.0)
    # ∫₀ᵘ (e^{−kx} − e^{−k}) dx / (1 − e^{−k}), in expm1 form: exact near k = 0 and no overflow for |k| ≤ 50
    return (-math.expm1(-k * u) / k - u * math.exp(-k)) / -math.expm1(-k)


def decay_weights(progress: Sequence[float], window: float, decay: str = "linear", shape: float = 0.0,
                  floor: float = 0.0) -> list[float]:
    """WSM weights over checkpoints at `progress` (oldest first, increasing) for a `decay` over the last `window`
    of progress ending at the latest checkpoint (see the module docstring for the derivation).

    >>> [round(w, 4) for w in decay_weights([0, 1, 2, 4], 2.0, "linear")]   # uneven: by progress, not index
    [0.0, 0.0, 0.5, 0.5]
    """
    p = [float(v) for v in progress]
    if decay not in DECAYS:
        raise WeightsError(f"Unknown decay {decay!r}; choose one of {', '.join(DECAYS)}.")
    if len(p) < 1 or any(b <= a for a, b in zip(p, p[1:])):
        raise WeightsError(f"Checkpoint progress must increase strictly (oldest first), got {p}.")
    if not (window > 0 and math.isfinite(window)):
        raise WeightsError(f"The window must be a positive amount of training progress, got {window}.")
    if not 0.0 <= floor <= 1.0:
        raise WeightsError(f"The decay's floor must be in [0, 1], got {floor}.")
    start, end, integral = p[-1] - window, p[-1], DECAYS[decay]

    def G(t: float) -> float:  # ∫ m from `start` to t (m = 1 before the window)
        if t <= start:
            return t - start
        u = min(1.0, (t - start) / window)
        return window * (floor * u + (1.0 - floor) * integral(u, shape))

    # w̄ⱼ, segment j = (pⱼ₋₁, pⱼ]; exactly 1 before the window (no rounding weight on checkpoints it leaves out)
    means = [1.0 if b <= start else (G(b) - G(a)) / (b - a) for a, b in zip(p, p[1:])]
    if end == start or not means:
        return [0.0] * (len(p) - 1) + [1.0]
    w = [1.0 - means[0]] + [a - b for a, b in zip(means, means[1:])] + [means[-1]]
    w = [max(0.0, v) for v in w]  # rounding where m is flat
    total = sum(w)
    return [v / total for v in w]


# Fixed rules `--method wsm-*`: Megatron-LM's and WSM's named schedules (floor 0).
WSM_METHODS = {"wsm-linear": "linear", "wsm-cosine": "cosine", "wsm-sqrt": "sqrt"}


def wsm(method: str, progress: Sequence[float], window: float | None = None) -> list[float]:
    """`--method wsm-linear|wsm-cosine|wsm-sqrt --window W`: W in the progress unit (default: the whole span of
    the revisions, so the oldest one starts the window). A window longer than the span is refused.

    >>> [round(w, 3) for w in wsm("wsm-sqrt", [100, 200, 300])]
    [0.471, 0.391, 0.138]
    """
    span = progress[-1] - progress[0]
    if window is None:
        window = span
    if window > span * (1 + 1e-9):
        raise WeightsError(f"--window {window:g} is longer than the revisions span ({progress[0]:g} to "
                           f"{progress[-1]:g}, {span:g}); the decay would start before the oldest checkpoint. "
                           "Widen --revisions or give a shorter --window (in the unit of the revision names: "
                           "tokens when they carry them, else steps; --tokens-per-step converts steps).")
    return decay_weights(progress, window, WSM_METHODS[method])
