"""`watch.png`: the held-out objective over training, one point per round of `hf-bomerge watch`.

Three curves: the latest single checkpoint (what training alone gives at that point), the searched merge of
the window ending there, and the uniform average of that window (PMA's SMA): the "annealing preview".
"""

from __future__ import annotations

from pathlib import Path

from ..objectives import objective_class


def plot_watch(rounds: list[dict], path: str | Path) -> Path | None:
    """Write the PNG (byte-stable: no timestamp) from the ledger's records; nothing without a round.

    >>> plot_watch(read_ledger("merges"), "merges/watch.png")     # doctest: +SKIP
    """
    if not rounds:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(rounds)))
    curves = {"latest checkpoint": [r["baselines"].get(r["latest"]) for r in rounds],
              "merge (searched)": [r.get("loss") for r in rounds],
              "uniform average": [r["baselines"].get("uniform") for r in rounds]}
    styles = {"latest checkpoint": ("o-", "tab:gray"), "merge (searched)": ("s-", "tab:blue"),
              "uniform average": ("^--", "tab:orange")}
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(rounds) + 3), 3.6))
    for label, values in curves.items():
        points = [(i, v) for i, v in zip(x, values) if v is not None]
        if points:
            ax.plot(*zip(*points), styles[label][0], color=styles[label][1], ms=4, label=label)
    objective = rounds[-1].get("objective", "loss")
    ylabel = f"held-out {objective_class(objective).header(objective)}"
    ax.set_xticks(x, [r["latest"] for r in rounds], rotation=45, ha="right", fontsize=7)
    ax.set(xlabel="latest revision of the window", ylabel=ylabel, title="merge while training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    staging = Path(path).with_suffix(".png.partial")
    fig.savefig(staging, dpi=100, format="png", metadata={"Software": None})
    plt.close(fig)
    staging.replace(path)
    return Path(path)
