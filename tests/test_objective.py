"""`--objective METRIC`: merge weights searched to maximize an `evaluate` metric of multiple-choice questions.

The questions come from the demo trajectory's held-out code (stdlib packages never trained on): the
question is a snippet, the right choice its true next characters, the others the next characters of other
snippets. The metric is a local module (tests/assets/metrics/mc_accuracy), so nothing needs the Hub.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import optuna
import pytest
import torch

from hf_bomerge.cli import main

# Every test here runs real searches on a multiple-choice metric (minutes on a CPU): the end-to-end tier.
pytestmark = pytest.mark.e2e

METRIC = Path(__file__).parent / "assets" / "metrics" / "mc_accuracy"
MAX_TOKENS = "40000"  # every question of the set below
CONTEXT = 128  # the demo model's max_position_embeddings


def build_multiple_choice(validation: Path, out: Path, n_items: int = 96, n_choices: int = 4,
                          question_chars: int = 240, choice_chars: int = 12) -> Path:
    """Questions spread over the held-out files; every 8th answer is given as the right choice's text."""
    texts = [json.loads(line)["text"] for line in validation.open()]
    pairs = []
    for text in texts:
        for start in range(0, len(text) - question_chars - choice_chars, question_chars + choice_chars):
            question = text[start:start + question_chars].rstrip()
            choice = text[start + len(question):start + len(question) + choice_chars]
            if question.strip() and choice.strip():
                pairs.append((question, choice))
    pairs = pairs[::len(pairs) // n_items][:n_items]
    assert len(pairs) == n_items
    rows = []
    for i, (question, right) in enumerate(pairs):
        others = [pairs[(i + 1 + k * n_items // n_choices) % n_items][1] for k in range(n_choices - 1)]
        answer = i % n_choices
        choices = others[:answer] + [right] + others[answer:]
        rows.append({"question": question, "choices": choices, "answer": right if i % 8 == 7 else answer})
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def run_cli(*args: str) -> tuple[int, dict | None, str]:
    """`hf-bomerge ARGS --json --quiet` in this process: exit code, the JSON object, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--json", "--quiet"])
    lines = out.getvalue().strip().splitlines()
    return code, json.loads(lines[-1]) if code == 0 else None, err.getvalue()


@pytest.fixture(scope="module")
def questions(trajectory, tmp_path_factory) -> Path:
    return build_multiple_choice(trajectory / "heldout" / "validation.jsonl",
                                 tmp_path_factory.mktemp("mc") / "questions.jsonl")


@pytest.fixture(scope="module")
def metric_run(trajectory, questions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metric_run")
    code, summary, err = run_cli(str(trajectory), "--revisions", "last:4", "--objective", str(METRIC),
                                 "--dataset", str(questions), "--max-eval-tokens", MAX_TOKENS, "--trials", "8",
                                 "--output", str(tmp / "merged"), "--cache-dir", str(tmp / "cache"))
    assert code == 0, err[-3000:]
    return tmp, summary, err


def test_metric_search_maximizes_and_is_at_least_every_baseline(metric_run):
    from huggingface_hub import ModelCard

    tmp, summary, err = metric_run
    assert summary["objective"] == "mc_accuracy" and summary["trials"] == 8
    assert set(summary["baselines"]) == {*summary["revisions"], "uniform", "ema"}
    assert summary["loss"] >= max(summary["baselines"].values())
    assert summary["loss"] > 0.35  # clearly above chance (0.25): the set can tell checkpoints apart
    study = optuna.load_study(study_name=summary["study"], storage=f"sqlite:///{tmp / 'cache' / 'studies.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.best_value == summary["loss"]
    # every 4th question is kept from the search (the confirm part): 72 searched, 24 confirmed
    assert "held-out mc_accuracy (higher is better)" in err and "search part (72 questions, computed in float32)" in err
    assert "on the confirm part (24 questions the search never saw)" in err
    confirm = summary["confirm"]
    assert confirm["units"] == 24 and confirm["unit"] == "questions"
    assert set(confirm["baselines"]) == set(summary["baselines"])
    best = confirm["baselines"][confirm["best_baseline"]]
    assert best == max(confirm["baselines"].values())  # higher is better: the best baseline is the highest
    lo, hi = confirm["interval"]
    assert lo <= confirm["loss"] - best <= hi
    card = ModelCard.load(Path(summary["output"]) / "README.md")
    result = card.data.eval_results[0]
    assert (result.metric_type, result.metric_name) == ("mc_accuracy", "mc_accuracy")
    assert result.metric_value == pytest.approx(confirm["loss"], abs=1e-6)  # the number the search never saw
    assert "| model | mc_accuracy (higher is better) |" in card.text
    assert "paired bootstrap 95% interval over questions" in card.text


def test_reported_metric_is_the_saved_models_accuracy_scored_independently(metric_run, questions):
    """Each choice scored one at a time with transformers: the sum of its tokens' log-probabilities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, summary, _ = metric_run
    folder = Path(summary["output"])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    correct = []
    rows = [json.loads(line) for line in questions.open()]
    for row in rows:
        scores = []
        for choice in row["choices"]:
            n_question = len(tokenizer(row["question"], add_special_tokens=False)["input_ids"])
            ids = tokenizer(row["question"] + choice, add_special_tokens=False)["input_ids"]
            n_choice = len(ids) - n_question
            ids = ids[-CONTEXT:]  # the oldest question tokens give way, as documented
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[t - 1, ids[t]].item() for t in range(len(ids) - n_choice, len(ids))))
        answer = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        correct.append(scores.index(max(scores)) == answer)
    held = [c for i, c in enumerate(correct) if i % 4 == 3]  # the confirm part: questions 3, 7, 11, …
    searched = [c for i, c in enumerate(correct) if i % 4 != 3]
    assert summary["loss"] == sum(searched) / len(searched)
    assert summary["confirm"]["loss"] == sum(held) / len(held)


def _answer_out_of_range(tmp_path: Path, questions: Path) -> Path:
    row = json.loads(questions.read_text().splitlines()[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**row, "answer": 5}) + "\n")
    return path


def _two_valued_metric(tmp_path: Path) -> Path:
    folder = tmp_path / "two_values"
    folder.mkdir()
    code = (METRIC / "mc_accuracy.py").read_text().replace("class McAccuracy", "class TwoValues")
    code = code.replace('return {"accuracy":', 'return {"correct": 1, "accuracy":')
    (folder / "two_values.py").write_text(code)
    return folder


@pytest.mark.parametrize("case, expect", [
    ("no such metric", ["no_such_metric", "needs a connection", "local path"]),
    ("text dataset", ["no column 'question'", "choices", "answer"]),
    ("answer out of range", ["answer=5", "0 to 3"]),
    ("several values", ["two_values", "several values", "['accuracy', 'correct']"]),
])
def test_unusable_metric_or_data_is_a_clear_error(trajectory, questions, tmp_path, case, expect):
    objective, dataset = str(METRIC), str(questions)
    if case == "no such metric":
        objective = str(tmp_path / "no_such_metric")
    elif case == "text dataset":
        dataset = str(trajectory / "heldout" / "validation.jsonl")
    elif case == "answer out of range":
        dataset = str(_answer_out_of_range(tmp_path, questions))
    else:
        objective = str(_two_valued_metric(tmp_path))
    code, _, err = run_cli(str(trajectory), "--revisions", "last:2", "--objective", objective, "--dataset", dataset,
                           "--trials", "3", "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    assert code == 2 and "Traceback" not in err
    assert all(text in err for text in expect), err
    assert not (tmp_path / "out").exists()


def test_loss_and_metric_studies_with_equal_inputs_do_not_mix(trajectory, questions, tmp_path):
    common = [str(trajectory), "--revisions", "last:2", "--dataset", str(questions), "--text-column", "question",
              "--max-eval-tokens", MAX_TOKENS, "--trials", "3", "--cache-dir", str(tmp_path / "cache")]
    code, loss, err = run_cli(*common, "--output", str(tmp_path / "loss"))
    assert code == 0, err
    code, metric, err = run_cli(*common, "--objective", str(METRIC), "--output", str(tmp_path / "metric"))
    assert code == 0, err
    assert (loss["objective"], metric["objective"]) == ("loss", "mc_accuracy")
    assert loss["study"] != metric["study"]
    assert loss["loss"] > 1 and 0 <= metric["loss"] <= 1  # a NLL in nats/token, an accuracy
    code, _, err = run_cli(*common, "--objective", str(METRIC), "--study-name", loss["study"],
                           "--output", str(tmp_path / "mixed"))
    assert code == 2 and "objective" in err and "incomparable" in err
