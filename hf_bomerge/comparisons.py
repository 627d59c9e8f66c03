"""Every comparison a report makes, as plain sentences said the same way whichever way it goes: a merge that loses
to the uniform average or to the best single checkpoint (on the search part, the confirm part or an
`--eval-dataset`) is "worse than" it in the words a win would be "better than" in. The CLI summary, the model card
and the Space all print these, so none of them can say only the flattering half.

>>> compared(2.0, 2.1, "the uniform average", " nats/token")
'better than the uniform average by 0.10000 nats/token'
>>> compared(2.2, 2.1, "the uniform average", " nats/token", higher_is_better=True)
'better than the uniform average by 0.10000 nats/token'
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .objectives import objective_class

if TYPE_CHECKING:
    from .result import MergeResult

LOSS_UNIT = " nats/token"  # an --eval-dataset is always scored on the loss, whatever the objective


def compared(merged: float, other: float, label: str, unit: str, higher_is_better: bool = False) -> str:
    """"better than LABEL by D", "worse than LABEL by D", or "equal to LABEL"."""
    gain = (merged - other) if higher_is_better else (other - merged)
    if gain == 0:
        return f"equal to {label}"
    return f"{'better' if gain > 0 else 'worse'} than {label} by {abs(gain):.5f}{unit}"


def _against(merged: float, scores: dict[str, float], revisions: list[str], unit: str, higher: bool,
             skip: str | None = None) -> list[str]:
    """The merge against the best single checkpoint among `scores` and the uniform average (but `skip`), both
    ways."""
    singles = {k: v for k, v in scores.items() if k in revisions}
    out = []
    if singles:
        best = (max if higher else min)(singles, key=singles.get)
        if best != skip:
            out.append(compared(merged, singles[best], f"the best single checkpoint ({best})", unit, higher))
    if "uniform" in scores and skip != "uniform":
        out.append(compared(merged, scores["uniform"], "the uniform average", unit, higher))
    return out


def _joined(parts: list[str]) -> str:
    return " and ".join(parts)


def comparisons(result: MergeResult) -> list[str]:
    """One sentence per set the merge was scored on: the objective's set (its search part, or every document of a
    fixed merge), the confirm part (with its interval, or why there is none) and each `--eval-dataset`."""
    kind = objective_class(result.objective)
    unit, higher = kind.unit or f" {kind.metric(result.objective)}", kind.higher_is_better
    lines = []
    if result.loss is not None and result.baselines:
        parts = _against(result.loss, result.baselines, result.revisions, unit, higher)
        if parts:
            lines.append(f"On {result.dataset}, {loss_part(result)}: the merge is {_joined(parts)}.")
    c = result.confirm
    if c:
        head = compared(c.loss, c.baselines[c.best_baseline], f"the best baseline ({c.best_baseline})", unit, higher)
        if c.interval:
            ends = f"[{c.interval[0]:+.5f}, {c.interval[1]:+.5f}]"
            zero = "includes 0" if c.interval[0] <= 0 <= c.interval[1] else "excludes 0"
            head += f"; its paired bootstrap 95% interval over {c.unit} {ends} {zero}"
        else:
            head += f"; {c.no_interval}"
        others = _against(c.loss, c.baselines, result.revisions, unit, higher, skip=c.best_baseline)
        lines.append(f"On the confirm part ({c.units} {c.unit} the search never saw): the merge is {head}"
                     + (f"; it is {_joined(others)}." if others else "."))
    for name, row in result.generalization.items():
        single = f"the best single checkpoint ({row['best_single_revision']})"
        parts = [compared(row["merged"], row["best_single"], single, LOSS_UNIT),
                 compared(row["merged"], row["uniform"], "the uniform average", LOSS_UNIT)]
        lines.append(f"On {name} (loss; not used by the search): the merge is {_joined(parts)}.")
    return lines


def loss_part(result: MergeResult) -> str:
    """Which held-out tokens `result.loss` covers, in words (`--json`'s `loss_part`, `MergeResult.loss_part`)."""
    return "search part" if result.confirm else "every document"
