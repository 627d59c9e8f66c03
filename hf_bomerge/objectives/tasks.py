"""A metric objective: multiple-choice questions scored by log-likelihood, graded by an `evaluate` metric.

The held-out split has the columns `question` (str), `choices` (list of str) and `answer` (the index of the
right choice, or its text). Each choice is scored the lm-eval-harness way: the sum of the log-likelihoods of
its tokens given the question; the prediction is the best-scoring choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .confirm import confirm_indices
from .heldout import HeldOutSpec, cached_tensors, content_fingerprint, load_split, tokenizer_fingerprint

COLUMNS = ("question", "choices", "answer")


@dataclass
class Metric:
    """An `evaluate` metric reduced to one number (higher is better).

    >>> Metric.load("tests/assets/metrics/mc_accuracy")([0, 1, 1], [0, 1, 0])   # doctest: +SKIP
    0.6666666666666666
    """

    name: str
    module: object

    @classmethod
    def load(cls, name_or_path: str) -> Metric:
        import evaluate

        try:
            module = evaluate.load(name_or_path, keep_in_memory=True)  # no Arrow cache file per trial
        except Exception as err:
            raise DataError(f"Could not load the evaluate metric {name_or_path!r}: {err}. A metric name such as "
                            "`accuracy` is fetched from the Hugging Face Hub and needs a connection; otherwise "
                            "pass --objective a local path to a metric script (NAME.py) or to its folder.") from err
        return cls(module.name, module)

    def __call__(self, predictions: list[int], references: list[int]) -> float:
        result = self.module.compute(predictions=predictions, references=references)
        keys = [k for k in result if k == self.name] or list(result)
        if len(keys) != 1:
            raise DataError(f"The metric {self.name!r} returned several values {sorted(result)} and none is named "
                            f"{self.name!r}, so it is unclear which one to maximize; use a metric that returns one.")
        return float(result[keys[0]])


def objective_key(objective: str) -> str:
    """What identifies an objective in a study's inputs: a local metric path made absolute."""
    path = Path(objective).expanduser()
    return str(path.resolve()) if path.exists() else objective


def load_items(spec: HeldOutSpec, token: str | bool | None = None, split=None) -> list[tuple[str, list[str], int]]:
    """(question, choices, answer index) of every row (of the already loaded `split`, if given), in order."""
    ds = split if split is not None else load_split(spec, token)
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"The dataset {spec.label} has no column {missing[0]!r} (it has {ds.column_names}); a "
                        "metric objective needs multiple-choice rows with the columns question (text), choices "
                        "(a list of texts) and answer (the index of the right choice, or its text).")
    items = []
    for row, (question, choices, answer) in enumerate(zip(*(ds[c] for c in COLUMNS))):
        if not (isinstance(question, str) and question and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)):
            raise DataError(f"Row {row} of {spec.label} needs a non-empty question and at least two non-empty "
                            f"choices; it has question={question!r}, choices={choices!r}.")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise DataError(f"Row {row} of {spec.label} has answer={answer!r}, which is neither an index into its "
                            f"{len(choices)} choices (0 to {len(choices) - 1}) nor the text of one of them.")
        items.append((question, choices, answer))
    if not items:
        raise DataError(f"The dataset {spec.label} has no rows.")
    return items


def encode_pair(tokenizer, question: str, choice: str) -> tuple[list[int], int]:
    """The tokens of question+choice and how many at the end are the choice's: everything after the
    question's own tokens (a trailing space of the question moves to the choice, as in lm-eval-harness)."""
    spaces = len(question) - len(question.rstrip())
    if spaces and len(question) > spaces:
        question, choice = question[:-spaces], question[-spaces:] + choice
    whole = tokenizer(question + choice, add_special_tokens=False)["input_ids"]
    return whole, len(whole) - len(tokenizer(question, add_special_tokens=False)["input_ids"])


def tokenize_choices(items, tokenizer, context: int, max_tokens: int) -> dict[str, torch.Tensor]:
    """Every (question, choice) pair, right-padded, for the first items whose pairs hold at most
    `max_tokens` tokens in all (at least one item). A pair longer than `context` loses its oldest tokens."""
    pairs, item_of, answers, total = [], [], [], 0
    for question, choices, answer in items:
        encoded = [encode_pair(tokenizer, question, c) for c in choices]
        cost = sum(len(ids) for ids, _ in encoded)
        if answers and total + cost > max_tokens:
            break
        if any(n < 1 or n >= context for _, n in encoded):
            raise DataError(f"A choice of the question {question[:60]!r} has no tokens of its own, or more than "
                            f"the model's context of {context}.")
        pairs += [(ids[-context:], min(n, context)) for ids, n in encoded]
        item_of += [len(answers)] * len(choices)
        answers.append(answer)
        total += cost
    ids = torch.zeros(len(pairs), max(len(p) for p, _ in pairs), dtype=torch.long)
    for row, (p, _) in enumerate(pairs):
        ids[row, :len(p)] = torch.tensor(p)
    return {"ids": ids, "lengths": torch.tensor([len(p) for p, _ in pairs]),
            "choice_lengths": torch.tensor([n for _, n in pairs]), "item": torch.tensor(item_of),
            "answers": torch.tensor(answers)}


def choice_set(spec: HeldOutSpec, tokenizer, tokenizer_folder: Path, context: int, max_tokens: int,
               cache_dir: Path, token: str | bool | None = None) -> dict[str, torch.Tensor]:
    """`tokenize_choices` of the split, cached on disk like the held-out blocks (a Hub split is loaded, and its
    access checked, once, before the cache is read)."""
    split = None if Path(spec.dataset).expanduser().exists() else load_split(spec, token)
    key = ["choices", content_fingerprint(spec, split, token), spec.text_column,
           tokenizer_fingerprint(tokenizer_folder), context, max_tokens]
    build = lambda: tokenize_choices(load_items(spec, token, split), tokenizer, context, max_tokens)
    return cached_tensors(Path(cache_dir) / "heldout", key, build)


def split_questions(pairs: dict[str, torch.Tensor], fraction: float) -> tuple[dict, dict | None]:
    """(search, confirm) parts of a `choice_set`, by question, as `confirm.confirm_indices` picks them (every
    4th question for 0.25); each part has its questions numbered from 0. None: no confirm part.

    >>> pairs = {"ids": torch.arange(16)[:, None], "lengths": torch.ones(16), "choice_lengths": torch.ones(16),
    ...          "item": torch.arange(8).repeat_interleave(2), "answers": torch.tensor([0, 1] * 4)}
    >>> search, confirm = split_questions(pairs, 0.25)
    >>> confirm["ids"].flatten().tolist(), confirm["item"].tolist(), len(search["answers"])
    ([6, 7, 14, 15], [0, 0, 1, 1], 6)
    """
    picked = confirm_indices(len(pairs["answers"]), fraction)
    if not picked:
        return pairs, None

    def part(questions: list[int]) -> dict[str, torch.Tensor]:
        number = {q: i for i, q in enumerate(questions)}
        rows = torch.tensor([r for r, q in enumerate(pairs["item"].tolist()) if q in number], dtype=torch.long)
        chosen = {k: pairs[k][rows] for k in ("ids", "lengths", "choice_lengths")}
        return {**chosen, "item": torch.tensor([number[q] for q in pairs["item"][rows].tolist()]),
                "answers": pairs["answers"][torch.tensor(questions, dtype=torch.long)]}

    kept = set(picked)
    return part([q for q in range(len(pairs["answers"])) if q not in kept]), part(picked)


@torch.no_grad()
def predict(model: torch.nn.Module, pairs: dict[str, torch.Tensor], batch_tokens: int) -> list[int]:
    """The index of the most likely choice of every item (the first one on a tie), scoring as many pairs
    per forward pass as fit in `batch_tokens` padded tokens.

    >>> predict(model, choice_set(spec, tokenizer, folder, 2048, 16384, cache), 8192)   # doctest: +SKIP
    [2, 0, 1, ...]
    """
    model.eval()
    device = next(model.parameters()).device
    per_batch = max(1, batch_tokens // pairs["ids"].size(1))
    scores = []
    for start in range(0, len(pairs["ids"]), per_batch):
        lengths = pairs["lengths"][start:start + per_batch]
        width = int(lengths.max())
        ids = pairs["ids"][start:start + per_batch, :width].to(device)
        positions = torch.arange(width, device=device)
        mask = positions < lengths.to(device)[:, None]
        logp = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1].float().log_softmax(-1)
        token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # position t predicts token t+1
        first = (lengths - pairs["choice_lengths"][start:start + per_batch]).to(device)[:, None]
        in_choice = (positions[1:] >= first) & mask[:, 1:]
        scores += torch.where(in_choice, token_logp, 0.0).sum(-1).tolist()
    by_item: dict[int, list[float]] = {}
    for item, score in zip(pairs["item"].tolist(), scores):
        by_item.setdefault(item, []).append(score)
    return [max(range(len(s)), key=s.__getitem__) for _, s in sorted(by_item.items())]
