"""The held-out objective: a `datasets` split tokenized once, packed into fixed blocks, cached, and
evaluated as mean token negative log-likelihood (the same number transformers' `loss` gives)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .errors import DataError

DEFAULT_DATASET = "Salesforce/wikitext"
DEFAULT_DATASET_CONFIG = "wikitext-2-raw-v1"
DEFAULT_MAX_EVAL_TOKENS = 16384
_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class HeldOutSpec:
    """Which text to evaluate on. A local file is its own single split.

    >>> HeldOutSpec.parse("Salesforce/wikitext:wikitext-103-raw-v1@test").split
    'test'
    """

    dataset: str = DEFAULT_DATASET
    config: str | None = DEFAULT_DATASET_CONFIG
    split: str = "validation"
    text_column: str = "text"

    @classmethod
    def parse(cls, spec: str, text_column: str = "text") -> "HeldOutSpec":
        """`DATASET[:CONFIG][@SPLIT]`, or a path to a local file/folder (used as is)."""
        if Path(spec).expanduser().exists():
            return cls(spec, None, "train", text_column)
        name, _, split = spec.partition("@")
        name, _, config = name.partition(":")
        return cls(name, config or None, split or "validation", text_column)

    @property
    def label(self) -> str:
        if Path(self.dataset).expanduser().exists():
            return Path(self.dataset).name
        return self.dataset + (f":{self.config}" if self.config else "") + f"@{self.split}"


def load_split(spec: HeldOutSpec, token: str | bool | None = None):
    """The split as a `datasets.Dataset` (any columns), loaded with `token`: the one the models get (a string,
    None for huggingface_hub's own lookup, False for none: then no token of the environment is sent)."""
    import datasets

    path = Path(spec.dataset).expanduser()
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"The held-out dataset file {path} is empty; give a file with text (--dataset).")
        if path.is_file():
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"Cannot read {path}: use a .txt, .json/.jsonl, .csv or .parquet file.")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), split="train")
        from .hub import check_dataset_access

        check_dataset_access(spec.dataset, token)
        config = spec.config
        if config is None and datasets.config.HF_DATASETS_OFFLINE:
            from .offline import cached_default_config

            config = cached_default_config(spec.dataset)
        with _quiet(datasets):  # "Using the latest cached version…" offline: nothing a user can act on
            return datasets.load_dataset(spec.dataset, config, split=spec.split, token=token)
    except DataError:
        raise
    except Exception as err:
        from .hub import local_cause

        if local_cause(err):
            raise DataError(f"Could not load the held-out dataset {spec.label}: {local_cause(err)}") from err
        raise DataError(f"Could not load the held-out dataset {spec.label}: {str(err) or type(err).__name__}. Check --dataset, "
                        "--dataset-config and --split (a local file is its own single split).") from err


@contextlib.contextmanager
def _quiet(datasets):
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def load_texts(spec: HeldOutSpec, token: str | bool | None = None) -> list[str]:
    """The non-empty texts of the split, in order."""
    ds = load_split(spec, token)
    if spec.text_column not in ds.column_names:
        raise DataError(f"The dataset {spec.label} has no column {spec.text_column!r} (it has "
                        f"{ds.column_names}); pass --text-column.")
    texts = [t for t in ds[spec.text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"The dataset {spec.label} has no non-empty text in column {spec.text_column!r}.")
    return texts


def tokenize_blocks(texts: list[str], tokenizer, block_size: int, max_tokens: int) -> torch.Tensor:
    """Join the texts with blank lines, tokenize, and cut the first `max_tokens` into
    [n_blocks, block_size] (the remainder is dropped, so every block is full)."""
    wanted = max(max_tokens, block_size)
    ids: list[int] = []
    start, chunk = 0, 64
    while start < len(texts) and len(ids) < wanted:
        piece = "\n\n".join(texts[start:start + chunk]) + "\n\n"
        ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        start, chunk = start + chunk, chunk * 2
    n_blocks = min(len(ids), wanted) // block_size
    if n_blocks == 0:
        raise DataError(f"The held-out text has {len(ids)} tokens, fewer than one block of {block_size}; "
                        "use a larger split or a smaller --block-size.")
    return torch.tensor(ids[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def tokenizer_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def heldout_blocks(spec: HeldOutSpec, tokenizer, tokenizer_folder: Path, block_size: int, max_tokens: int,
                   cache_dir: Path, token: str | bool | None = None) -> torch.Tensor:
    """Tokenized, packed blocks for `spec`, cached on disk (safetensors) so a rerun does not re-tokenize."""
    from .hub import check_dataset_access

    check_dataset_access(spec.dataset, token)  # the cached blocks too: only for whoever may read the dataset
    key = [asdict(spec), tokenizer_fingerprint(tokenizer_folder), block_size, max_tokens]
    build = lambda: {"blocks": tokenize_blocks(load_texts(spec, token), tokenizer, block_size, max_tokens)}  # noqa: E731
    return cached_tensors(Path(cache_dir) / "heldout", key, build)["blocks"]


def cached_tensors(folder: Path, key: list, build) -> dict[str, torch.Tensor]:
    """`build()` once per `key` (JSON-able), kept as a safetensors file in `folder`."""
    text = json.dumps(key)
    path = folder / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".safetensors")
    if path.is_file():
        return load_file(path)
    tensors = build()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"spec": text})
    tmp.replace(path)
    return tensors


def mean_nll(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood over all blocks (nats per token).

    >>> loss = mean_nll(model, blocks)   # doctest: +SKIP
    >>> math.exp(loss)                   # perplexity  # doctest: +SKIP
    """
    total, count = nll_sums(model, blocks, batch_size)
    return total / count


@torch.no_grad()
def nll_sums(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4, rank: int = 0,
             world: int = 1) -> tuple[float, int]:
    """(Σ next-token NLL, token count) over the batches `rank`, `rank + world`, … of the blocks: the same
    batches, so the same per-batch sums, whatever the number of processes."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in blocks.split(batch_size)[rank::world]:
        batch = batch.to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total, count


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
