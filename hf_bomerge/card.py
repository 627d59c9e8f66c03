"""The model card: `model_cards/bomerge.md` rendered with huggingface_hub's ModelCard/ModelCardData.

Deterministic: the same result gives the same bytes (no timestamps), so a re-push is a no-op.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .heldout import perplexity

if TYPE_CHECKING:
    from .result import MergeResult


def render_card(result: "MergeResult", repo_id: str | None = None, license: str | None = None,
                plot: str | None = None, layer_plot: str | None = None) -> ModelCard:
    """The README.md of a merged model (`layer_plot`: the heatmap of a layered merge's weights).

    >>> render_card(result).save("merged/README.md")   # doctest: +SKIP
    """
    model_name = (repo_id or result.output or "merged").rstrip("/").split("/")[-1]
    source_url = f"https://huggingface.co/{result.source}" if result.source_kind == "hub" else None  # no invented links
    evals = []
    is_loss = result.objective == "loss"
    heldout = _dataset(result.dataset, result.dataset_id, result.dataset_config, result.dataset_split)
    if result.loss is not None and result.dataset:
        # The number the search never saw, when there is one: the confirm part's.
        evals.append(_eval(model_name, heldout, result.objective, (result.confirm or {}).get("loss", result.loss)))
        if is_loss:
            evals.append(_eval(model_name, heldout, "perplexity",
                               perplexity((result.confirm or {}).get("loss", result.loss))))
    for name, row in result.generalization.items():
        evals.append(_eval(model_name, _parse_label(name), "loss", row["merged"]))
    data = ModelCardData(
        library_name="transformers",
        base_model=result.source if result.source_kind == "hub" else None,
        base_model_relation="merge" if result.source_kind == "hub" else None,
        tags=["hf-bomerge", "merge", "checkpoint-merging"],
        datasets=[result.dataset_id] if result.dataset_id and "/" in result.dataset_id else None,
        license=license,
        model_name=model_name,
        eval_results=evals or None,
    )
    template = resources.files("hf_bomerge.model_cards").joinpath("bomerge.md").read_text()
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=model_name,
        repo_id=repo_id or model_name,
        # a local source is named by its folder: a published card never shows a path of the machine it ran on
        source=result.source if result.source_kind == "hub" else Path(result.source).name,
        source_url=source_url,
        revisions=[{"name": n, "sha": s, "weight": w} for n, s, w in zip(result.revisions, result.shas, result.weights)],
        searched=result.search is not None,
        search=result.search,
        trials=result.trials,
        dataset=result.dataset,
        eval_tokens=result.eval_tokens,
        eval_questions=result.eval_questions,
        eval_dtype=result.eval_dtype,
        objective=result.objective,
        objective_text="loss" if is_loss else f"{result.objective} of multiple-choice questions (maximized)",
        loss=result.loss,
        ppl=perplexity(result.loss) if result.loss is not None and is_loss else None,
        baselines=[{"name": k, "loss": v, "ppl": perplexity(v) if is_loss else None}
                   for k, v in result.baselines.items()],
        generalization=result.generalization,
        confirm=result.confirm,
        **_confirm_terms(result),
        plot=plot,
        layer_weights=result.layer_weights,
        layer_groups=result.layer_groups,
        layer_plot=layer_plot,
        note=result.note,
    )


def _confirm_terms(result: "MergeResult") -> dict:
    """How the confirm section speaks: blocks and nats for the loss, questions and the metric otherwise."""
    c = result.confirm
    if not c:
        return {}
    from .confirm import verdict

    said = verdict(c, higher_is_better=result.objective != "loss")
    if result.objective == "loss":
        return dict(confirm_units="blocks", confirm_header="loss (nats/token)", confirm_unit="nats/token",
                    confirm_verdict=said)
    return dict(confirm_units="questions", confirm_header=f"{result.objective} (higher is better)",
                confirm_unit=result.objective, confirm_verdict=said)


def _dataset(label: str | None, dataset_id: str | None, config: str | None, split: str | None) -> dict:
    """model-index dataset fields: a Hub dataset by its id with config and split apart; a local file by name."""
    if dataset_id:
        return {"dataset_type": dataset_id, "dataset_name": dataset_id, "dataset_config": config,
                "dataset_split": split}
    return {"dataset_type": label, "dataset_name": label}


def _parse_label(label: str) -> dict:
    """The fields of an `--eval-dataset` label, DATASET[:CONFIG]@SPLIT (a Hub set) or a file name."""
    if "@" not in label:
        return _dataset(label, None, None, None)
    name, _, split = label.rpartition("@")
    name, _, config = name.partition(":")
    return _dataset(label, name, config or None, split)


def _eval(model_name: str, dataset: dict, metric: str, value: float) -> EvalResult:
    return EvalResult(task_type="text-generation", **dataset, metric_type=metric, metric_name=metric,
                      metric_value=round(float(value), 6))
