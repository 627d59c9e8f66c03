"""The model card: `model_cards/bomerge.md` rendered with huggingface_hub's ModelCard/ModelCardData.

Deterministic: the same result gives the same bytes (no timestamps), so a re-push is a no-op.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .heldout import perplexity

if TYPE_CHECKING:
    from .api import MergeResult


def render_card(result: "MergeResult", repo_id: str | None = None, license: str | None = None,
                plot: str | None = None) -> ModelCard:
    """The README.md of a merged model.

    >>> render_card(result).save("merged/README.md")   # doctest: +SKIP
    """
    model_name = (repo_id or result.output or "merged").rstrip("/").split("/")[-1]
    source_url = (f"https://huggingface.co/{result.source}" if result.source_kind == "hub" else result.source)
    evals = []
    is_loss = result.objective == "loss"
    if result.loss is not None and result.dataset:
        evals.append(_eval(model_name, result.dataset, result.objective, result.loss))
        if is_loss:
            evals.append(_eval(model_name, result.dataset, "perplexity", perplexity(result.loss)))
    for name, row in result.generalization.items():
        evals.append(_eval(model_name, name, "loss", row["merged"]))
    data = ModelCardData(
        library_name="transformers",
        base_model=result.source if result.source_kind == "hub" else None,
        base_model_relation="merge" if result.source_kind == "hub" else None,
        tags=["hf-bomerge", "merge", "checkpoint-merging"],
        datasets=[result.dataset] if result.dataset and "/" in result.dataset and result.dataset_is_hub else None,
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
        source=result.source,
        source_url=source_url,
        revisions=[{"name": n, "sha": s, "weight": w} for n, s, w in zip(result.revisions, result.shas, result.weights)],
        searched=result.search is not None,
        search=result.search,
        trials=result.trials,
        dataset=result.dataset,
        eval_tokens=result.eval_tokens,
        eval_questions=result.eval_questions,
        objective=result.objective,
        objective_text="loss" if is_loss else f"{result.objective} of multiple-choice questions (maximized)",
        loss=result.loss,
        ppl=perplexity(result.loss) if result.loss is not None and is_loss else None,
        baselines=[{"name": k, "loss": v, "ppl": perplexity(v) if is_loss else None}
                   for k, v in result.baselines.items()],
        generalization=result.generalization,
        plot=plot,
    )


def _eval(model_name: str, dataset: str, metric: str, value: float) -> EvalResult:
    return EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset,
                      metric_type=metric, metric_name=metric, metric_value=round(float(value), 6))
