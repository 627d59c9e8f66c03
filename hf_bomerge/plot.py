"""The search plot shown in the model card: the objective per trial (baselines marked) and the chosen weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .study import Trial

PLOT_FILE = "bomerge_search.png"


def plot_search(trials: list["Trial"], revisions: list[str], weights: list[float], path: str | Path,
                objective: str = "loss") -> Path:
    """Write a PNG (byte-stable: no timestamp, no version metadata) and return its path."""
    from .study import best_of  # here: exporting a fixed merge (no plot) never imports Optuna
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_w) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    numbers = [t.number for t in trials]
    losses = [t.loss for t in trials]
    best_so_far = [best_of(losses[: i + 1], objective=objective) for i in range(len(losses))]
    seeds = [(t.number, t.loss) for t in trials if t.seed]
    ax_loss.plot(numbers, losses, "o", color="tab:blue", ms=4, label="GP trial")
    if seeds:
        ax_loss.plot(*zip(*seeds), "s", color="tab:orange", ms=5, label="baseline seed")
    ax_loss.step(numbers, best_so_far, where="post", color="black", lw=1, label="best so far")
    label = "held-out loss (nats/token)" if objective == "loss" else f"held-out {objective} (higher is better)"
    ax_loss.set(xlabel="trial", ylabel=label, title="search")
    ax_loss.legend(fontsize=8)
    ax_w.bar(range(len(weights)), weights, color="tab:green")
    ax_w.set_xticks(range(len(weights)), revisions, rotation=45, ha="right", fontsize=7)
    ax_w.set(ylabel="weight", title="merge weights (oldest first)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return Path(path)
