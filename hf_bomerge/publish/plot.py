"""The search plot shown in the model card: the objective per trial (baselines marked) and the chosen weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..objectives import objective_class

if TYPE_CHECKING:
    from ..searching.study import Trial

PLOT_FILE = "bomerge_search.png"


def plot_search(trials: list[Trial], revisions: list[str], weights: list[float], path: str | Path,
                objective: str = "loss") -> Path:
    """Write a PNG (byte-stable: no timestamp, no version metadata) and return its path."""
    import matplotlib

    from ..searching.study import best_of  # here: exporting a fixed merge (no plot) never imports Optuna

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
    label = f"held-out {objective_class(objective).header(objective)}"
    ax_loss.set(xlabel="trial", ylabel=label, title="search")
    ax_loss.legend(fontsize=8)
    ax_w.bar(range(len(weights)), weights, color="tab:green")
    ax_w.set_xticks(range(len(weights)), revisions, rotation=45, ha="right", fontsize=7)
    ax_w.set(ylabel="weight", title="merge weights (oldest first)")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return Path(path)


LAYER_PLOT_FILE = "bomerge_layers.png"


def plot_layer_weights(layer_weights: dict[str, list[float]], revisions: list[str], path: str | Path) -> Path:
    """A heatmap of a layered merge's weights: depth groups (shallow at the top) × revisions (oldest first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(layer_weights)
    values = [layer_weights[g] for g in groups]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(revisions), 1.2 + 0.45 * len(groups)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, max(max(v) for v in values)), aspect="auto")
    for i, row in enumerate(values):
        for j, w in enumerate(row):
            ax.text(j, i, f"{w:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if w < 0.6 * max(max(v) for v in values) else "black")
    ax.set_xticks(range(len(revisions)), revisions, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set(title="merge weights per depth group")
    fig.colorbar(image, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return Path(path)
