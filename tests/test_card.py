"""The model card and `--push-to-hub` from the command line, read back through the test Hub."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download

from hf_bomerge.cli import main
from hf_bomerge.publish.card import render_card
from hf_bomerge.result import MergeResult
from hf_bomerge.searching.study import Trial

TOKEN = "hf_test_card_token_456"


def _result(revisions, weights, search) -> MergeResult:
    shas = [f"{i:040x}" for i in range(1, len(revisions) + 1)]
    trace = [Trial(i, weights, 3.0 - 0.1 * i, seed=r) for i, r in enumerate(revisions)]
    return MergeResult(source="EleutherAI/pythia-160m", revisions=revisions, shas=shas, weights=weights,
                       loss=2.5, baselines={**{r: 3.0 for r in revisions}, "uniform": 2.7, "ema": 2.8},
                       generalization={"ood.jsonl": {"merged": 3.1, "best_single": 3.3, "uniform": 3.2,
                                                     "best_single_revision": revisions[-1]}},
                       trials=12, study="s", search=search, dataset="Salesforce/wikitext:wikitext-2-raw-v1@validation",
                       dataset_id="Salesforce/wikitext", dataset_config="wikitext-2-raw-v1", dataset_split="validation",
                       eval_tokens=16384, license="apache-2.0", trace=trace)


@pytest.mark.parametrize("search, revisions, weights", [
    ("pairwise", ["step142000", "step143000"], [0.35, 0.65]),
    ("simplex", ["step140000", "step141000", "step142000", "step143000"], [0.1, 0.2, 0.3, 0.4]),
])
def test_card_renders_parses_back_and_is_byte_stable(tmp_path, search, revisions, weights):
    result = _result(revisions, weights, search)
    card = render_card(result, repo_id="me/merged", license=result.license, plot="bomerge_search.png")
    card.save(tmp_path / "README.md")
    again = ModelCard.load(tmp_path / "README.md")
    assert again.data.base_model == "EleutherAI/pythia-160m" and again.data.base_model_relation == "merge"
    assert again.data.license == "apache-2.0" and again.data.library_name == "transformers"
    assert again.data.pipeline_tag == "text-generation"  # the Hub's widget and search need it
    assert {"hf-bomerge", "merge", "checkpoint-merging"} <= set(again.data.tags)
    metrics = {(e.dataset_type, e.metric_type): e.metric_value for e in again.data.eval_results}
    assert metrics[("Salesforce/wikitext", "loss")] == 2.5
    assert metrics[("ood.jsonl", "loss")] == 3.1  # a local file is named as one
    heldout = next(e for e in again.data.eval_results if e.dataset_type == "Salesforce/wikitext")
    # The Hub reads model-index's dataset `type` as a dataset id; config and split have their own fields.
    assert (heldout.dataset_config, heldout.dataset_split) == ("wikitext-2-raw-v1", "validation")
    assert again.data.datasets == ["Salesforce/wikitext"]
    assert "github.com" not in again.text  # no invented links: the project has no public address yet
    for r, sha in zip(revisions, result.shas):
        assert f"`{r}` | `{sha}`" in again.text
    assert f"{search} search" in again.text and "bomerge_search.png" in again.text
    assert 'from_pretrained("me/merged")' in again.text and "--recipe bomerge_recipe.yaml" in again.text
    assert "Liu" in again.text and "Li, Yunshui" in again.text  # the methods' citations
    render_card(result, repo_id="me/merged", license=result.license, plot="bomerge_search.png").save(tmp_path / "b.md")
    assert (tmp_path / "README.md").read_bytes() == (tmp_path / "b.md").read_bytes()


@pytest.mark.e2e
def test_cli_push_to_hub_publishes_a_loadable_model_with_its_card(test_hub, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    code = main([test_hub.repo_id, "--revisions", "last:2", "--dataset", test_hub.dataset_id, "--split",
                 "validation", "--trials", "5", "--output", str(tmp_path / "out"), "--push-to-hub",
                 "bomerge-tester/pythia-tiny-bomerge", "--private", "--token", TOKEN, "--quiet", "--json",
                 "--cache-dir", str(tmp_path / "c")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pushed to" in captured.err and "bomerge-tester/pythia-tiny-bomerge" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    sha = HfApi().list_repo_refs("bomerge-tester/pythia-tiny-bomerge").branches[0].target_commit
    folder = Path(snapshot_download("bomerge-tester/pythia-tiny-bomerge", revision=sha, token=TOKEN))
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"  # carried over from the source repo's card
    assert card.data.base_model == test_hub.repo_id
    assert all(s in card.text for s in summary["shas"])
    assert 'from_pretrained("bomerge-tester/pythia-tiny-bomerge")' in card.text
    assert (folder / "bomerge_search.png").is_file() and (folder / "bomerge_recipe.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), local.parameters()))
    for path in [*folder.rglob("*"), *(tmp_path / "out").rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in captured.out + captured.err
    assert test_hub.writer.private.get("model/bomerge-tester/pythia-tiny-bomerge") is True


def test_a_note_is_one_paragraph_after_the_opening_and_absent_otherwise(tmp_path):
    result = _result(["step142000", "step143000"], [0.35, 0.65], "pairwise")
    plain = render_card(result, repo_id="me/merged").text
    result = dataclasses.replace(result, note="Merging constant-LR checkpoints matched an annealed run here.")
    noted = render_card(result, repo_id="me/merged").text
    assert result.note not in plain
    assert f"trials) against the held-out loss on {result.dataset}.\n\n{result.note}\n" in noted
    assert noted.replace(f"\n\n{result.note}", "") == plain  # nothing else changes


def test_a_local_source_is_named_by_its_folder_not_its_path():
    result = MergeResult(source="/home/someone/private/run-7", revisions=["checkpoint-1", "checkpoint-2"],
                         shas=["a" * 40, "b" * 40], weights=[0.5, 0.5], source_kind="folder")
    text = render_card(result, repo_id="me/merged").content
    assert "/home/someone" not in text and "`run-7`" in text
    assert "huggingface.co/" not in text.split("---")[-1].split("## Use it")[0]  # no invented link to a local run


def test_the_card_and_the_summary_say_a_loss_in_the_words_of_a_win(tmp_path):
    """A merge that wins on the search part but loses on the confirm part and out of domain: the card and the CLI
    summary say both, in the same words; the loss names the part it covers."""
    from hf_bomerge.cli.output import format_summary

    revisions = ["step142000", "step143000"]
    lost = dataclasses.replace(
        _result(revisions, [0.35, 0.65], "pairwise"),
        generalization={"ood.jsonl": {"merged": 3.4, "best_single": 3.3, "uniform": 3.2,
                                      "best_single_revision": "step143000"}},
        confirm={"loss": 2.9, "baselines": {"step142000": 3.0, "step143000": 2.8, "uniform": 2.85},
                 "best_baseline": "step143000", "interval": [0.05, 0.15], "units": 40, "unit": "documents",
                 "max_eval_tokens": 16384})
    text = format_summary(lost)
    card = render_card(lost, repo_id="me/merged").text
    for said in (text, card):
        assert "Salesforce/wikitext:wikitext-2-raw-v1@validation, search part" in said
        assert ("On the confirm part (40 documents the search never saw): the merge is worse than the best baseline "
                "(step143000) by 0.10000 nats/token; its paired bootstrap 95% interval over documents [+0.05000, "
                "+0.15000] excludes 0; it is worse than the uniform average by 0.05000 nats/token.") in said
        assert ("On ood.jsonl (loss; not used by the search): the merge is worse than the best single checkpoint "
                "(step143000) by 0.10000 nats/token and worse than the uniform average by 0.20000 nats/token.") in said
        assert ("the merge is better than the best single checkpoint (step142000) by 0.50000 nats/token and better "
                "than the uniform average by 0.20000 nats/token.") in said
    assert lost.summary()["loss_part"] == "search" and lost.summary()["confirm"]["verdict"] == "not better"
    fixed = dataclasses.replace(lost, confirm=None, generalization={}, search=None)
    assert fixed.summary()["loss_part"] == "all" and "every document" in format_summary(fixed)
    assert "every document" in render_card(fixed).text
