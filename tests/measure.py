"""Independent measurements for the tests: a plain-torch float64 reference merge and transformers' own loss.

Nothing here imports hf_bomerge: these are the numbers hf-bomerge's reports are checked against.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

LEGACY_BUFFERS = ("masked_bias", "inv_freq", "attention.bias")


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


def reference_merge(folders: list[Path], weights: list[float], out: Path, copied: tuple[str, ...] = ()) -> Path:
    """Σ wᵢθᵢ in float64 with plain torch, rounded to each tensor's stored dtype; legacy buffers and the
    tensors named in `copied` are taken from the last folder. Config, tokenizer and code files are copied."""
    states = [load_state(f) for f in folders]
    merged = {k: (sum(w * s[k].double() for w, s in zip(weights, states)).to(v.dtype)
                  if v.is_floating_point() and not k.endswith(LEGACY_BUFFERS) and k not in copied else v)
              for k, v in states[-1].items()}
    out.mkdir(parents=True)
    for f in folders[-1].iterdir():
        if f.suffix in (".json", ".py", ".txt", ".model"):
            shutil.copy(f, out / f.name)
    torch.save(merged, out / "pytorch_model.bin")
    return out


def documents(texts: list[str], tokenizer, max_tokens: int = 16384) -> list[list[int]]:
    """Rows as documents (the tokenizer's own special tokens, then EOS), the first `max_tokens` tokens in all."""
    docs, total = [], 0
    for text in texts:
        if isinstance(text, str) and text.strip() and total < max_tokens:
            doc = (tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])[: max_tokens - total]
            docs.append(doc)
            total += len(doc)
    return docs


def document_blocks(texts: list[str], tokenizer, block: int, max_tokens: int = 16384) -> torch.Tensor:
    """Rows as documents, concatenated, cut into full blocks."""
    ids = [t for doc in documents(texts, tokenizer, max_tokens) for t in doc]
    return torch.tensor(ids[: len(ids) // block * block]).view(-1, block)


def split_by_document(docs: list[list[int]], block: int) -> tuple[torch.Tensor, list[list[int]], torch.Tensor]:
    """A search's default 3:1 split, by document: documents 3, 7, 11, … are the confirm part; when that gives
    fewer than 20 where runs give 20 (or no document is picked), the documents cut into contiguous runs (`block`
    tokens at most, short enough for 20 confirm runs, at least 64) and the last quarter of the runs. Returns the search
    part's full blocks, the confirm documents (or runs), and their blocks (concatenated, the last one padded)."""
    by_doc = len(docs) // 4 if len(docs) >= 8 else 0  # confirm documents 3, 7, 11, ...
    size = min(block, max(64, sum(map(len, docs)) // 4 // 20))  # runs short enough for 20 confirm runs
    runs = [d[i:i + size] for d in docs for i in range(0, len(d), size)]
    if by_doc >= 20 or (by_doc and len(runs) // 4 < 20):
        search = [d for i, d in enumerate(docs) if i % 4 != 3]
        held = [d for i, d in enumerate(docs) if i % 4 == 3]
    else:
        search, held = runs[: len(runs) - len(runs) // 4], runs[len(runs) - len(runs) // 4:]
    ids = [t for d in search for t in d]
    flat = [t for d in held for t in d]
    flat += [0] * (-len(flat) % block)
    return torch.tensor(ids[: len(ids) // block * block]).view(-1, block), held, torch.tensor(flat).view(-1, block)


def confirm_document_losses(model, held: list[list[int]], blocks: torch.Tensor) -> list[tuple[float, int]]:
    """(NLL sum, tokens scored) of each confirm document with transformers' own `labels=` loss: the document's
    tokens are the labels, every other position -100 (a document's first token in a block is not predicted)."""
    block = blocks.size(1)
    starts = [0]
    for d in held:
        starts.append(starts[-1] + len(d))
    out = []
    with torch.no_grad():
        for j in range(len(held)):
            total, count = 0.0, 0
            for b in range(starts[j] // block, (starts[j + 1] - 1) // block + 1):
                labels = torch.full((block,), -100)
                lo, hi = max(starts[j], b * block) - b * block, min(starts[j + 1], (b + 1) * block) - b * block
                labels[lo:hi] = blocks[b, lo:hi]
                n = int((labels[1:] != -100).sum())
                if n:
                    total += model(input_ids=blocks[b][None], labels=labels[None]).loss.item() * n
                    count += n
            out.append((total, count))
    return out


def heldout_loss(folder: Path, dataset: str, split: str = "train", block_size: int | None = None,
                 max_tokens: int = 16384, trust_remote_code: bool = False, dtype=torch.float32,
                 part: str = "all") -> float:
    """The held-out loss of a saved model measured without hf-bomerge: `datasets` rows as documents,
    transformers' own `labels=` loss. `dataset` is a Hub id or a local .jsonl file (its column `text`). `part`:
    "all" (every document packed into full blocks, the mean of their losses: a fixed merge's number), or a
    search's default 3:1 split by document (`split_by_document`): "search" (its full blocks), "confirm" (the
    mean over the confirm documents' tokens)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    block = block_size or min(2048, model.config.max_position_embeddings)
    if Path(dataset).is_file():
        rows = datasets.load_dataset("json", data_files=dataset, split="train")
    else:
        rows = datasets.load_dataset(dataset, split=split)
    docs = documents(rows["text"], tokenizer, max(max_tokens, block))
    if part == "confirm":
        _, held, blocks = split_by_document(docs, block)
        sums = confirm_document_losses(model, held, blocks)
        return sum(t for t, _ in sums) / sum(n for _, n in sums)
    if part == "search":
        blocks = split_by_document(docs, block)[0]
    else:
        ids = [t for d in docs for t in d]
        blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    with torch.no_grad():
        return sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)
