"""lm-evaluation-harness objectives (`--objective lm-eval:TASK`): local task YAMLs written here over local jsonl
files, the demo run's real checkpoints, lm-eval itself scoring the live merged model, and the real `lm_eval` CLI in
a fresh process confirming the number on the saved folder. Everything runs offline (no dataset leaves the disk)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import hf_bomerge
from hf_bomerge.errors import OptionError
from hf_bomerge.objectives import check_evaluation, objective_class
from hf_bomerge.specs import EvalSpec, HeldOutSpec

QUESTIONS = [("import", ["os", "banana"]), ("return", ["None", "zzq"]), ("for i in", ["range(10):", "qq"]),
             ("if x is not", ["None:", "Nine"]), ("class Foo(object):", ["pass", "zz"]), ("def", ["__init__(self):", "}}"]),
             ("self.assertEqual(a,", ["b)", "]]"]), ("raise", ["ValueError(", "xyzzy"])]


@pytest.fixture(scope="module")
def tasks(trajectory: Path, tmp_path_factory) -> Path:
    """A folder of two local lm-eval tasks: `tiny_mc` (multiple choice, 24 questions, acc) and `tiny_ppl`
    (loglikelihood_rolling over 12 held-out texts of the demo run, word_perplexity: lower is better)."""
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    with open(folder / "mc.jsonl", "w") as f:
        for i in range(24):
            question, choices = QUESTIONS[i % len(QUESTIONS)]
            flip = (i // len(QUESTIONS)) % 2  # the right answer is first, then second
            f.write(json.dumps({"question": question, "choices": choices[::-1] if flip else choices,
                                "answer": flip}) + "\n")
    texts = [json.loads(line)["text"] for line in (trajectory / "heldout" / "validation.jsonl").open()]
    with open(folder / "ppl.jsonl", "w") as f:
        for text in texts[:12]:
            f.write(json.dumps({"text": text[:400]}) + "\n")
    with open(folder / "cloze.jsonl", "w") as f:  # the next word of a held-out text, or another text's: close calls
        for row in cloze_rows(texts):
            f.write(json.dumps(row) + "\n")
    (folder / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'mc.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    (folder / "tiny_cloze.yaml").write_text((folder / "tiny_mc.yaml").read_text().replace(
        "tiny_mc", "tiny_cloze").replace("mc.jsonl", "cloze.jsonl"))
    (folder / "tiny_ppl.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / 'ppl.jsonl'}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        """))
    return folder


def cloze_rows(texts: list[str], n: int = 80) -> list[dict]:
    """`n` questions: eight words of a held-out text, then its next word or the next word of another text."""
    spans = []
    for k, text in enumerate(texts):
        words = [w for w in text.split(" ") if w.strip() and "\n" not in w]
        spans += [(words[j - 8:j], words[j]) for j in range(8 + k % 5, len(words), 97)]
    rows = []
    for i in range(n):
        context, word = spans[(i * 37) % len(spans)]
        other = next(w for c, w in spans[(i * 53 + 11) % len(spans):] + spans if w != word)
        choices = [word, other] if i % 2 == 0 else [other, word]
        rows.append({"question": " ".join(context), "choices": choices, "answer": i % 2})
    return rows


def offline_env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def lm_eval_cli(output: Path, tasks: Path, names: str, tmp: Path, *extra: str) -> dict:
    """`lm_eval --model hf` on the saved folder in a fresh process, offline: {task: its results}."""
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={output},dtype=float32", "--tasks", names, "--include_path", str(tasks), "--device", "cpu",
           "--batch_size", "4", "--output_path", str(tmp / "lm_eval_out"), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = sorted((tmp / "lm_eval_out").rglob("results_*.json"))
    return json.loads(found[-1].read_text())["results"]


def demo_steps(trajectory: Path, n: int) -> str:
    return ",".join(json.loads((trajectory / "trajectory.json").read_text())["revisions"][-n:])


def test_the_name_carries_the_direction():
    """Known from the recorded name alone (a study, a card, a resumed result): the metric and its direction."""
    assert objective_class("lm-eval:tiny_mc/acc/max").higher_is_better
    assert not objective_class("lm-eval:tiny_ppl/word_perplexity/min").higher_is_better
    assert objective_class("lm-eval:arc_easy,piqa/acc/max").describe("lm-eval:arc_easy,piqa/acc/max") == (
        "the mean acc of the lm-eval tasks arc_easy, piqa (maximized)")


@pytest.mark.parametrize("evaluation, refused", [
    (dict(objective="loss", lm_eval_metric="acc"), "--lm-eval-metric"),
    (dict(objective="accuracy", lm_eval_tasks="."), "--lm-eval-tasks"),
    (dict(objective="lm-eval:tiny_mc", data=HeldOutSpec("notes.txt", None, "train")), "--dataset"),
    (dict(objective="lm-eval:tiny_mc", lm_eval_tasks="/no/such/folder"), "/no/such/folder"),
    (dict(objective="lm-eval:,"), "names no task"),
])
def test_options_an_objective_would_ignore_are_refused_before_any_download(evaluation, refused):
    with pytest.raises(OptionError, match=re.escape(refused)):
        check_evaluation(EvalSpec(**evaluation))


@pytest.mark.e2e
def test_a_fixed_merge_scores_what_the_lm_eval_cli_measures_on_the_saved_folder(trajectory, tasks, tmp_path):
    """`hf-bomerge ... --weights --objective lm-eval:tiny_mc` (a real CLI process, offline) reports in --json the
    accuracy the real `lm_eval` CLI measures on the written folder; the same for a perplexity task, whose number
    (unlike a count of right answers) would show any difference in the model evaluated."""
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "hf_bomerge.cli", str(trajectory), "--revisions", demo_steps(trajectory, 2),
           "--weights", "0.3,0.7", "--objective", "lm-eval:tiny_mc", "--lm-eval-tasks", str(tasks),
           "--output", str(out), "--json", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=offline_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["objective"] == "lm-eval:tiny_mc/acc/max"
    ppl = hf_bomerge.merge(str(trajectory), demo_steps(trajectory, 2), weights=[0.3, 0.7],
                           objective="lm-eval:tiny_ppl", lm_eval_tasks=str(tasks), progress=False, device="cpu",
                           cache_dir=tmp_path / "cache")
    assert ppl.objective == "lm-eval:tiny_ppl/word_perplexity/min"
    measured = lm_eval_cli(out, tasks, "tiny_mc,tiny_ppl", tmp_path)
    assert summary["loss"] == measured["tiny_mc"]["acc,none"]
    assert ppl.loss == pytest.approx(measured["tiny_ppl"]["word_perplexity,none"], rel=1e-5)
    assert math.isfinite(ppl.loss) and ppl.loss > 1


@pytest.mark.e2e
def test_a_search_on_an_lm_eval_task_follows_its_metric_and_confirms_per_document(trajectory, tasks, tmp_path):
    """A search maximizes accuracy and minimizes word perplexity, each the best of its trials; every 4th document
    is kept for the confirm part, whose number is what the `lm_eval` CLI measures on those documents of the saved
    merge (its own weighted perplexity, recomputed here from per-document values); the card says what was scored."""
    common = dict(lm_eval_tasks=str(tasks), trials=4, confirm_fraction=0.25, progress=False, device="cpu",
                  cache_dir=tmp_path / "cache")
    acc = hf_bomerge.search(str(trajectory), demo_steps(trajectory, 2), objective="lm-eval:tiny_cloze", **common)
    values = [t.loss for t in acc.trace if t.loss is not None]
    assert acc.objective == "lm-eval:tiny_cloze/acc/max" and acc.loss == max(values)
    assert acc.eval_questions == 60 and acc.dataset == "lm-eval tiny_cloze"
    assert (acc.confirm.units, acc.confirm.unit, acc.confirm.higher_is_better) == (20, "documents", True)
    assert acc.confirm.interval is not None  # 20 documents: the bootstrap's interval is reported
    assert all(v * 20 == round(v * 20) for v in acc.confirm.baselines.values())
    ppl = hf_bomerge.search(str(trajectory), demo_steps(trajectory, 3), objective="lm-eval:tiny_ppl", **common)
    values = [t.loss for t in ppl.trace if t.loss is not None]
    assert ppl.objective == "lm-eval:tiny_ppl/word_perplexity/min" and ppl.loss == min(values)
    assert ppl.confirm.units == 3 and ppl.confirm.interval is None and not ppl.confirm.higher_is_better
    assert ppl.confirm.best_baseline == min(ppl.confirm.baselines, key=ppl.confirm.baselines.get)
    saved = ppl.save_pretrained(tmp_path / "ppl", progress=False)
    measured = lm_eval_cli(saved, tasks, "tiny_ppl", tmp_path, "--samples", '{"tiny_ppl": [3, 7, 11]}')
    assert ppl.confirm.loss == pytest.approx(measured["tiny_ppl"]["word_perplexity,none"], rel=1e-5)
    card = (acc.save_pretrained(tmp_path / "out", progress=False) / "README.md").read_text()
    assert "acc of the lm-eval task tiny_cloze (maximized)" in card and "type: acc\n" in card


@pytest.mark.e2e
def test_without_the_extra_the_objective_names_the_install_line(trajectory, tasks, tmp_path):
    """lm-eval missing, simulated honestly: a real CLI process whose `sitecustomize` makes `import lm_eval` fail as
    an absent package does. The run stops with exit 2 and one paragraph naming the extra, before any model loads."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""\
        import sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name == "lm_eval" or name.startswith("lm_eval."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Absent())
        """))
    env = {**offline_env(), "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "hf_bomerge.cli", str(trajectory), "--revisions", demo_steps(trajectory, 2),
           "--objective", "lm-eval:tiny_mc", "--lm-eval-tasks", str(tasks), "--trials", "3",
           "--output", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert 'pip install -e ".[lm-eval]"' in proc.stderr and "hf-bomerge[lm-eval]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert not (tmp_path / "cache" / "heldout").exists()  # nothing read or tokenized


@pytest.mark.e2e
def test_the_hand_written_scorer_agrees_with_lm_eval_on_the_same_questions(trajectory, tasks, tmp_path):
    """The `evaluate`-metric objective (kept: it needs no lm-eval and takes any `evaluate` metric) scores each
    choice as lm-eval does: the same questions give the same accuracy, for each revision and a merge."""
    rows = [json.loads(line) for line in (tasks / "cloze.jsonl").open()]
    questions = tmp_path / "questions.jsonl"  # lm-eval's " " between question and choice, as a trailing space
    questions.write_text("".join(json.dumps({**r, "question": r["question"] + " "}) + "\n" for r in rows))
    metric = str(Path(__file__).parent / "assets" / "metrics" / "mc_accuracy")
    common = dict(progress=False, device="cpu", cache_dir=tmp_path / "cache")
    steps, seen = demo_steps(trajectory, 3), set()
    for weights in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.2, 0.3]):
        hand = hf_bomerge.merge(str(trajectory), steps, weights=weights, objective=metric, dataset=str(questions),
                                **common)
        lm = hf_bomerge.merge(str(trajectory), steps, weights=weights, objective="lm-eval:tiny_cloze",
                              lm_eval_tasks=str(tasks), **common)
        assert hand.eval_questions == 80 and hand.loss == lm.loss, weights
        seen.add(hand.loss)
    assert len(seen) > 1  # the revisions differ on these questions: equal numbers are not a coincidence


@pytest.mark.e2e
def test_numbers_rescored_in_the_saved_dtype_are_the_reloaded_models(trajectory, tasks, tmp_path):
    """A search in bfloat16 reports its numbers again in the saved float16, on a model loaded anew: lm-eval must
    score that model, not the one the search ran on (compared with a fixed merge evaluated in float16)."""
    common = dict(objective="lm-eval:tiny_ppl", lm_eval_tasks=str(tasks), progress=False, device="cpu",
                  cache_dir=tmp_path / "cache")
    found = hf_bomerge.search(str(trajectory), demo_steps(trajectory, 2), trials=3, confirm_fraction=0.0,
                              eval_dtype="bfloat16", **common)
    assert found.eval_dtype == "float16"
    fixed = hf_bomerge.merge(str(trajectory), demo_steps(trajectory, 2), weights=found.weights,
                             eval_dtype="float16", **common)
    assert found.loss == pytest.approx(fixed.loss, rel=1e-6)
    assert found.loss != pytest.approx(min(t.loss for t in found.trace if t.loss is not None), rel=1e-4)


@pytest.mark.e2e
def test_a_task_with_a_function_has_the_same_identity_in_every_process(tasks, tmp_path):
    """A study resumes only on the same inputs: a task whose YAML names a Python function (`!function`) must give
    the same digest in a fresh process (a function's repr holds its address, which changes)."""
    folder = tmp_path / "fn_tasks"
    folder.mkdir()
    (folder / "utils.py").write_text("def keep(dataset):\n    return dataset\n")
    (folder / "tiny_fn.yaml").write_text((tasks / "tiny_mc.yaml").read_text().replace("tiny_mc", "tiny_fn")
                                         + "process_docs: !function utils.keep\n")
    code = ("import sys; from pathlib import Path; from hf_bomerge.objectives.lmeval import load_tasks, tasks_digest;"
            "print(tasks_digest(load_tasks(['tiny_fn'], Path(sys.argv[1]))['tasks'], 'acc'))")
    digests = [subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              env=offline_env(), timeout=300).stdout.strip() for _ in range(2)]
    assert digests[0] == digests[1] and len(digests[0]) == 16
