"""The model card: `model_cards/bomerge.md` rendered with huggingface_hub's ModelCard/ModelCardData.

Deterministic: the same result gives the same bytes (no timestamps), so a re-push is a no-op.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..comparisons import comparisons, loss_part
from ..objectives import objective_class
from ..sources import source_class

if TYPE_CHECKING:
    from ..result import MergeResult


def render_card(result: MergeResult, repo_id: str | None = None, license: str | None = None,
                plot: str | None = None, layer_plot: str | None = None) -> ModelCard:
    """The README.md of a merged model (`layer_plot`: the heatmap of a layered merge's weights).

    >>> render_card(result).save("merged/README.md")   # doctest: +SKIP
    """
    model_name = (repo_id or result.output or "merged").rstrip("/").split("/")[-1]
    named = source_class(result.source_kind).card_fields(result.source)  # a local source: its folder's name, no link
    evals = []
    kind = objective_class(result.objective)
    heldout = _dataset(result.dataset, result.dataset_id, result.dataset_config, result.dataset_split)
    if result.loss is not None and result.dataset:
        # The number the search never saw, when there is one: the confirm part's.
        value = result.confirm.loss if result.confirm else result.loss
        evals.append(_eval(model_name, heldout, kind.metric(result.objective), value))
        if kind.perplexity(value) is not None:
            evals.append(_eval(model_name, heldout, "perplexity", kind.perplexity(value)))
    for name, row in result.generalization.items():
        evals.append(_eval(model_name, _parse_label(name), "loss", row["merged"]))
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",  # every merge here is a causal LM (AutoModelForCausalLM)
        base_model=named["base_model"],
        base_model_relation="merge" if named["base_model"] else None,
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
        source=named["name"],
        source_name=result.source_name,
        source_url=named["url"],
        revisions=[{"name": n, "sha": s, "weight": w} for n, s, w in zip(result.revisions, result.shas, result.weights)],
        searched=result.search is not None,
        search=result.search,
        trials=result.trials,
        dataset=result.dataset,
        eval_tokens=result.eval_tokens,
        eval_questions=result.eval_questions,
        eval_dtype=result.eval_dtype,
        objective=kind.metric(result.objective),
        header=kind.header(result.objective),
        unit=kind.unit,
        direction="higher is better" if kind.higher_is_better else "lower is better",
        amount=(f"{result.eval_questions} {kind.confirm_units}" if result.eval_questions else
                f"{result.eval_tokens} tokens" + (f", computed in {result.eval_dtype}" if result.eval_dtype else "")),
        objective_text=kind.describe(result.objective),
        loss=result.loss,
        loss_part=loss_part(result) if result.loss is not None else None,
        comparisons=comparisons(result),
        ppl=kind.perplexity(result.loss) if result.loss is not None else None,
        baselines=[{"name": k, "loss": v, "ppl": kind.perplexity(v)} for k, v in result.baselines.items()],
        generalization=result.generalization,
        confirm=result.confirm,
        **_confirm_terms(result),
        plot=plot,
        layer_weights=result.layer_weights,
        layer_groups=result.layer_groups,
        layer_plot=layer_plot,
        note=result.note,
        duplicates=" ".join(result.duplicates.sentences()),
        phase=" ".join(result.phase.sentences()) if result.phase else None,
    )


def _confirm_terms(result: MergeResult) -> dict:
    """The confirm table's column: the loss in nats, or the metric."""
    c = result.confirm
    if not c:
        return {}
    kind = objective_class(result.objective)
    return dict(confirm_header=kind.header(result.objective))


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
