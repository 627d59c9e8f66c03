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


def document_blocks(texts: list[str], tokenizer, block: int, max_tokens: int = 16384) -> torch.Tensor:
    """Rows as documents (the tokenizer's own special tokens, then EOS), concatenated, cut into full blocks."""
    ids: list[int] = []
    for text in texts:
        if isinstance(text, str) and text.strip() and len(ids) < max_tokens:
            ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids[: min(len(ids), max_tokens) // block * block]).view(-1, block)


def heldout_loss(folder: Path, dataset: str, split: str = "train", block_size: int | None = None,
                 max_tokens: int = 16384, trust_remote_code: bool = False, dtype=torch.float32,
                 part: str = "all") -> float:
    """The held-out loss of a saved model measured without hf-bomerge: `datasets` rows packed by
    `document_blocks`, transformers' own `labels=` loss of each block, averaged (all blocks are full).
    `dataset` is a Hub id or a local .jsonl file (its column `text`). `part`: all blocks, or the search part
    (blocks 0, 1, 2, 4, 5, 6, …) or the confirm part (blocks 3, 7, 11, …) of a search's default 3:1 split."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    block = block_size or min(2048, model.config.max_position_embeddings)
    if Path(dataset).is_file():
        rows = datasets.load_dataset("json", data_files=dataset, split="train")
    else:
        rows = datasets.load_dataset(dataset, split=split)
    blocks = document_blocks(rows["text"], tokenizer, block, max_tokens)
    if part != "all":
        blocks = blocks[[i for i in range(len(blocks)) if (i % 4 == 3) == (part == "confirm")]]
    with torch.no_grad():
        return sum(model(input_ids=b[None], labels=b[None]).loss.item() for b in blocks) / len(blocks)
