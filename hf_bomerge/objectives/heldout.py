"""The held-out objective: a `datasets` split tokenized once, packed into fixed blocks, cached, and
evaluated as mean token negative log-likelihood (the same number transformers' `loss` gives).

The protocol is the one users compare with: each row is a document, tokenized as the model's tokenizer does
by default (with a BOS where the tokenizer adds one), followed by EOS; the documents are concatenated and cut
into full blocks. Only what the token cap needs is read: a Hub split is streamed (offline: read row by row from
`datasets`' cache) and tokenized each time; a local file's blocks are cached, keyed by its bytes, so an edited
file is tokenized again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..defaults import DEFAULT_MAX_EVAL_TOKENS  # noqa: F401  (re-exported)
from ..errors import DataError
from ..sources import check_dataset_access, local_cause
from ..sources.offline import cached_default_config
from ..specs import DEFAULT_DATASET, DEFAULT_DATASET_CONFIG, HeldOutSpec  # noqa: F401  (re-exported)

_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_split(spec: HeldOutSpec, token: str | bool | None = None, streaming: bool = False):
    """The split as a `datasets.Dataset` (any columns), loaded with `token`: the one the models get (a string,
    None for huggingface_hub's own lookup, False for none: then no token of the environment is sent). With
    `streaming`, a Hub split is an `IterableDataset`: its files are read only as far as it is iterated."""
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
        check_dataset_access(spec.dataset, token)
        config = spec.config
        if config is None and datasets.config.HF_DATASETS_OFFLINE:
            config = cached_default_config(spec.dataset)
        with _quiet(datasets):  # "Using the latest cached version…" offline: nothing a user can act on
            return datasets.load_dataset(spec.dataset, config, split=spec.split, token=token, streaming=streaming)
    except DataError:
        raise
    except Exception as err:
        if local_cause(err):
            raise DataError(f"Could not load the held-out dataset {spec.label}: {local_cause(err)}") from err
        raise DataError(f"Could not load the held-out dataset {spec.label}: {str(err) or type(err).__name__}. "
                        "Check --dataset, "
                        "--dataset-config and --split (a local file is its own single split).") from err


@contextlib.contextmanager
def _quiet(datasets):
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def load_texts(spec: HeldOutSpec, split=None, token: str | bool | None = None) -> list[str]:
    """The non-empty texts of the split (or of the already loaded `split`), in order."""
    ds = split if split is not None else load_split(spec, token)
    if spec.text_column not in ds.column_names:
        raise _no_column(spec, ds.column_names)
    texts = [t for t in ds[spec.text_column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise DataError(f"The dataset {spec.label} has no non-empty text in column {spec.text_column!r}.")
    return texts


def _no_column(spec: HeldOutSpec, columns) -> DataError:
    return DataError(f"The dataset {spec.label} has no column {spec.text_column!r} (it has {columns}); pass "
                     "--text-column.")


def hub_texts(spec: HeldOutSpec, token: str | bool | None = None) -> Iterator[str]:
    """The non-empty texts of a Hub split, in order, read as they are consumed: streamed from the Hub, or offline
    from `datasets`' cache (`hf-bomerge download` fills it)."""
    import datasets

    rows = load_split(spec, token, streaming=not datasets.config.HF_DATASETS_OFFLINE)
    if rows.column_names is not None and spec.text_column not in rows.column_names:
        raise _no_column(spec, rows.column_names)
    found = False
    try:
        for row in rows:
            if spec.text_column not in row:
                raise _no_column(spec, list(row))
            text = row[spec.text_column]
            if isinstance(text, str) and text.strip():
                found = True
                yield text
    except DataError:
        raise
    except Exception as err:  # a stream breaks while it is read: the network, or a malformed file
        raise DataError(f"Could not read the held-out dataset {spec.label}: {str(err) or type(err).__name__}. "
                        "Check --dataset, or try again.") from err
    if not found:
        raise DataError(f"The dataset {spec.label} has no non-empty text in column {spec.text_column!r}.")


PROTOCOL = 3  # bump when the tokenization or packing changes: cached blocks and studies of another one differ
# 3: documents kept apart (the confirm part takes whole documents; `confirm.split_documents`)


def tokenize_documents(texts: Iterable[str], tokenizer, block_size: int, max_tokens: int) -> list[list[int]]:
    """Each text as a document (the tokenizer's own special tokens, then EOS), in order, up to `max_tokens` in all
    (at least one block; the last document is cut there). `texts` is read in growing chunks only until the cap is
    reached (at most about twice what it needs)."""
    wanted = max(max_tokens, block_size)
    eos = tokenizer.eos_token_id
    docs: list[list[int]] = []
    total, texts, chunk = 0, iter(texts), 64
    while total < wanted and (batch := list(islice(texts, chunk))):
        for doc in tokenizer(batch)["input_ids"]:
            if eos is not None and (not doc or doc[-1] != eos):
                doc = [*doc, eos]
            if doc and total < wanted:
                docs.append(doc[: wanted - total])
                total += len(docs[-1])
        chunk *= 2
    if total < block_size:
        raise DataError(f"The held-out text has {total} tokens, fewer than one block of {block_size}; "
                        "use a larger split or a smaller --block-size.")
    return docs


def pack(docs: Sequence[Sequence[int]], block_size: int) -> torch.Tensor:
    """The documents concatenated and cut into [n_blocks, block_size] (the remainder dropped: every block full).

    >>> pack([[1, 2, 3], [4, 5]], 2).tolist()
    [[1, 2], [3, 4]]
    """
    ids = [t for doc in docs for t in doc]
    n = len(ids) // block_size
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def pack_units(docs: Sequence[Sequence[int]], block_size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, owner): the documents concatenated into blocks, the last one padded with `pad` after its text (a
    causal model's earlier positions never see it), and each token's document index (-1: padding). Every token
    of every document is scored, in packed context as the search part's tokens are.

    >>> blocks, owner = pack_units([[1, 2, 3], [4, 5]], 4, 0)
    >>> blocks.tolist(), owner.tolist()
    ([[1, 2, 3, 4], [5, 0, 0, 0]], [[0, 0, 0, 1], [1, -1, -1, -1]])
    """
    ids = [t for doc in docs for t in doc]
    who = [i for i, doc in enumerate(docs) for _ in doc]
    fill = -len(ids) % block_size
    shape = (-1, block_size)
    return (torch.tensor(ids + [pad] * fill, dtype=torch.long).view(shape),
            torch.tensor(who + [-1] * fill, dtype=torch.long).view(shape))


def tokenize_blocks(texts: Iterable[str], tokenizer, block_size: int, max_tokens: int) -> torch.Tensor:
    """The protocol users compare with: `tokenize_documents`, concatenated, cut into full blocks (`pack`)."""
    return pack(tokenize_documents(texts, tokenizer, block_size, max_tokens), block_size)


def tokenizer_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "tokenizer_config.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def content_fingerprint(spec: HeldOutSpec, split=None, token: str | bool | None = None) -> str:
    """What the data is, not what it is called: the bytes of a local file (or of a folder's files), or the
    `datasets` fingerprint of a Hub split (it changes with the dataset's revision and data files)."""
    path = Path(spec.dataset).expanduser()
    if path.exists():
        digest = hashlib.sha256()
        for file in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()[:32]
    split = split if split is not None else load_split(spec, token)
    return "datasets:" + str(getattr(split, "_fingerprint", None) or spec.label)


def heldout_documents(spec: HeldOutSpec, tokenizer, tokenizer_folder: Path, block_size: int, max_tokens: int,
                      cache_dir: Path, token: str | bool | None = None) -> list[list[int]]:
    """The tokenized documents of `spec` (`tokenize_documents`). A Hub split is streamed (its access checked,
    `load_split`) and read only as far as `max_tokens` needs, every time: a cache key from its content would need
    that same read, and it would save only the tokenizing. A local file's documents are cached on disk
    (safetensors, keyed by the file's bytes, the tokenizer, the block size, the token cap and the protocol) so a
    rerun does not re-tokenize."""
    if not Path(spec.dataset).expanduser().exists():
        return tokenize_documents(hub_texts(spec, token), tokenizer, block_size, max_tokens)
    key = [content_fingerprint(spec), spec.text_column, tokenizer_fingerprint(tokenizer_folder),
           block_size, max_tokens, PROTOCOL]

    def build() -> dict[str, torch.Tensor]:
        docs = tokenize_documents(load_texts(spec), tokenizer, block_size, max_tokens)
        return {"ids": torch.tensor([t for d in docs for t in d], dtype=torch.long),
                "lengths": torch.tensor([len(d) for d in docs], dtype=torch.long)}

    stored = cached_tensors(Path(cache_dir) / "heldout", key, build)
    return [d.tolist() for d in stored["ids"].split(stored["lengths"].tolist())]


def heldout_blocks(spec: HeldOutSpec, tokenizer, tokenizer_folder: Path, block_size: int, max_tokens: int,
                   cache_dir: Path, token: str | bool | None = None) -> torch.Tensor:
    """Every document of `spec` packed into full blocks (`pack`): what a fixed merge and `--eval-dataset` score."""
    return pack(heldout_documents(spec, tokenizer, tokenizer_folder, block_size, max_tokens, cache_dir, token),
                block_size)


def blocks_digest(blocks: torch.Tensor) -> str:
    """A short hash of exactly the tokens evaluated: part of a study's identity."""
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()[:16]


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
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total, count


@torch.no_grad()
def unit_sums(model: torch.nn.Module, blocks: torch.Tensor, owner: torch.Tensor, batch_size: int = 4
              ) -> list[tuple[float, int]]:
    """(Σ next-token NLL, tokens) of each document of a `pack_units` packing: each predicted token counts for the
    document it belongs to (padding for none). Their ratio over all documents is the mean token NLL."""
    model.eval()
    device = next(model.parameters()).device
    units = int(owner.max()) + 1 if owner.numel() else 0
    sums = torch.zeros(units + 1, dtype=torch.float64)
    counts = torch.zeros(units + 1, dtype=torch.long)
    for batch, who in zip(blocks.split(batch_size), owner.split(batch_size)):
        logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:].to(device), reduction="none").double().cpu()
        target = torch.where(who[:, 1:] >= 0, who[:, 1:], units).reshape(-1)  # padding: the spare last slot
        sums.index_add_(0, target, nll.reshape(-1))
        counts.index_add_(0, target, torch.ones_like(target))
    return [(float(t), int(c)) for t, c in zip(sums[:units], counts[:units])]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
