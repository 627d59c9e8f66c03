"""A small, real checkpoint trajectory built locally, offline and cached: the data of the built-in demo.

One tiny Pythia-like ``GPTNeoXForCausalLM`` is trained with AdamW at a constant learning rate on CPython's
own standard-library source, and checkpoints are saved along the way, laid out like Pythia's Hub branches::

    root/step250/ ... root/step600/   pytorch_model.bin (fp16, zip format, with Pythia's legacy buffers),
                                      config.json, generation_config.json, tokenizer files
    root/main/                        model.safetensors (the last step), config, tokenizer
    root/heldout/validation.jsonl     in-domain held-out code (stdlib packages never trained on), + .txt
    root/heldout/ood.jsonl            out-of-domain English prose (pydoc's topic help texts)
    root/trajectory.json              what was built, how, and the training loss at each checkpoint

The late checkpoints are noisy (the learning rate never decays), so averaging a few of them lowers the
held-out loss below that of any single one: the effect hf-bomerge exists to find.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BUILD_VERSION = 1
EOS = "<|endoftext|>"
PARAMS = {  # everything that shapes the result; its hash names the cache folder
    "vocab_size": 1024, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 128, "rotary_pct": 0.25, "batch_size": 8, "lr": 6e-3,
    "warmup_steps": 30, "weight_decay": 0.01, "betas": [0.9, 0.95], "seed": 0,
    "steps": list(range(250, 601, 50)), "train_chars": 3_000_000, "ood_chars": 300_000,
    "heldout_packages": ["email", "http", "json"],
}
# Top-level stdlib folders that are not ordinary library code (or are held out) and never trained on.
SKIPPED_DIRS = {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "pydoc_data",
                "ensurepip", "encodings", "tkinter", "distutils"}


def default_root() -> Path:
    """The cache folder for the current build parameters: ``$HF_BOMERGE_CACHE`` or ``~/.cache/hf_bomerge``."""
    import torch
    import transformers

    from .sources import default_cache_dir  # the sources package (torch, the Hub client): only when the demo runs

    return default_cache_dir() / "demo" / _build_id(torch.__version__, transformers.__version__)


def _build_id(torch_version: str, transformers_version: str) -> str:
    key = json.dumps([BUILD_VERSION, PARAMS, sorted(SKIPPED_DIRS), platform.python_version(), torch_version,
                      transformers_version], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def build_trajectory(root: Path | None = None, *, quiet: bool = False) -> Path:
    """Return a folder holding the demo trajectory (see the module docstring), building it if needed.

    The build takes about 20 s on two CPU cores and needs no network. It is written to a temporary
    sibling folder and renamed into place when complete, so ``root`` is either absent or whole; a
    later call finds it and returns at once. ``root`` defaults to :func:`default_root`.
    """
    root = Path(root) if root is not None else default_root()
    if (root / "trajectory.json").is_file():
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but holds no complete demo trajectory; remove it and retry")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _build(tmp, quiet=quiet)
        if root.exists():
            root.rmdir()  # an empty folder left by the caller
        os.rename(tmp, root)
    except OSError:
        if not (root / "trajectory.json").is_file():  # another process won the race if it exists
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _stdlib_texts() -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """Training files, held-out files and out-of-domain (name, text) records, all from the stdlib."""
    lib = Path(os.__file__).parent
    held_pkgs = set(PARAMS["heldout_packages"])
    files = sorted(p for p in lib.rglob("*.py") if p.parts[len(lib.parts)] not in SKIPPED_DIRS)
    heldout = [p for p in files if p.parts[len(lib.parts)] in held_pkgs]
    train, size = [], 0
    for p in files:
        if p.parts[len(lib.parts)] not in held_pkgs and size < PARAMS["train_chars"]:
            train.append(p)
            size += p.stat().st_size
    try:  # pydoc's help texts: English prose about Python, a different domain from the code
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed stdlib: the module docstrings instead
        topics = {str(p.relative_to(lib)): ast.get_docstring(ast.parse(_read(p))) or "" for p in train}
    ood, size = [], 0
    for name in sorted(topics):
        if size < PARAMS["ood_chars"] and topics[name].strip():
            ood.append((name, topics[name]))
            size += len(topics[name])
    return train, heldout, ood


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _legacy_state_dict(model, dtype) -> dict:
    """The model's weights in ``dtype`` plus the buffers real Pythia ``.bin`` files carry, in their place."""
    import torch

    cfg = model.config
    n = cfg.max_position_embeddings
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n)
    inv_freq = model.gpt_neox.rotary_emb.inv_freq.detach().float().clone()
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(".attention.query_key_value.weight"):  # Pythia's order: buffers before qkv
            prefix = name[: -len("query_key_value.weight")]
            out[prefix + "bias"] = mask.clone()
            out[prefix + "masked_bias"] = torch.tensor(-1e9).to(dtype)  # -inf in fp16, as in Pythia
            out[prefix + "rotary_emb.inv_freq"] = inv_freq.clone()
        out[name] = tensor.detach().to(dtype).clone()
    return out


def _save_common(folder: Path, model, tokenizer) -> None:
    """config.json, generation_config.json and the tokenizer files, loadable by transformers 4 and 5."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # v5 writes "TokenizersBackend", unknown to v4
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def corpus(params: dict):
    """The stdlib corpus tokenized with a byte-level BPE trained on it: (tokenizer, training tokens with an EOS
    after each file, train files, held-out files, out-of-domain texts)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    train_files, heldout_files, ood = _stdlib_texts()
    texts = [_read(p) for p in train_files]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=params["vocab_size"], min_frequency=2,
                            special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                        unk_token=EOS)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    data = torch.tensor([i for e in bpe.encode_batch(texts) for i in e.ids + [eos_id]])
    return tokenizer, data, train_files, heldout_files, ood


def model_config(params: dict, eos_id: int):
    """The tiny Pythia-like GPT-NeoX of `params`."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=params["vocab_size"], hidden_size=params["hidden_size"],
        num_hidden_layers=params["num_hidden_layers"], num_attention_heads=params["num_attention_heads"],
        intermediate_size=4 * params["hidden_size"], max_position_embeddings=params["max_position_embeddings"],
        rotary_pct=params["rotary_pct"], rotary_emb_base=10000, tie_word_embeddings=False,
        use_parallel_residual=True, bos_token_id=eos_id, eos_token_id=eos_id, hidden_act="gelu",
    )


def train_step(model, opt, data, gen, block: int, batch: int) -> float:
    """One optimizer step on `batch` random windows of `block` tokens of `data` (drawn with `gen`); the loss."""
    import torch

    idx = torch.randint(0, len(data) - block, (batch,), generator=gen)
    windows = torch.stack([data[i : i + block] for i in idx.tolist()])
    loss = model(input_ids=windows, labels=windows).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def write_heldout(held: Path, heldout_files, ood, *, text_copy: bool = False) -> None:
    """heldout/validation.jsonl (the held-out stdlib files; with `text_copy`, also as validation.txt) and
    heldout/ood.jsonl (English prose)."""
    held.mkdir()
    lib = Path(os.__file__).parent
    texts = [(p, _read(p)) for p in heldout_files]
    with open(held / "validation.jsonl", "w") as f:
        for p, text in texts:
            f.write(json.dumps({"text": text, "source": str(p.relative_to(lib))}) + "\n")
    if text_copy:
        (held / "validation.txt").write_text("".join(text + "\n\n" for _, text in texts))
    with open(held / "ood.jsonl", "w") as f:
        for name, text in ood:
            f.write(json.dumps({"text": text, "source": f"pydoc_data.topics:{name}"}) + "\n")


def _build(out: Path, *, quiet: bool) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import GPTNeoXForCausalLM

    def log(msg: str) -> None:
        if not quiet:
            print(f"[demo] {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    tokenizer, data, train_files, heldout_files, ood = corpus(PARAMS)
    log(f"tokenizer trained; {len(data):,} training tokens from {len(train_files)} stdlib files")
    config = model_config(PARAMS, tokenizer.convert_tokens_to_ids(EOS))
    T = PARAMS["max_position_embeddings"]
    steps, B, losses = PARAMS["steps"], PARAMS["batch_size"], {}
    with torch.random.fork_rng():
        torch.manual_seed(PARAMS["seed"])
        model = GPTNeoXForCausalLM(config)
        config.dtype = torch.float16  # as Pythia's configs say; the checkpoints are stored in fp16
        config.architectures = ["GPTNeoXForCausalLM"]
        gen = torch.Generator().manual_seed(PARAMS["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=PARAMS["lr"], betas=tuple(PARAMS["betas"]),
                                weight_decay=PARAMS["weight_decay"])
        warm = PARAMS["warmup_steps"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
        model.train()
        recent: list[float] = []
        for step in range(1, steps[-1] + 1):
            loss = train_step(model, opt, data, gen, T, B)
            sched.step()
            recent = (recent + [loss])[-50:]
            if step in steps:
                losses[f"step{step}"] = round(sum(recent) / len(recent), 4)
                folder = out / f"step{step}"
                _save_common(folder, model, tokenizer)
                torch.save(_legacy_state_dict(model, torch.float16), folder / "pytorch_model.bin")
                log(f"step{step}: train loss {losses[f'step{step}']:.3f} ({time.perf_counter() - start:.1f} s)")
    _save_common(out / "main", model, tokenizer)  # Pythia's main: the last step, as safetensors
    fp16 = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(fp16, out / "main" / "model.safetensors", metadata={"format": "pt"})

    write_heldout(out / "heldout", heldout_files, ood, text_copy=True)
    lib = Path(os.__file__).parent

    import transformers

    meta = {
        "build_id": _build_id(torch.__version__, transformers.__version__), "build_version": BUILD_VERSION,
        "model_type": "gpt_neox", "revisions": [f"step{s}" for s in steps], "main": f"step{steps[-1]}",
        "params": PARAMS, "lr_schedule": f"linear warmup {PARAMS['warmup_steps']} steps, then constant",
        "tokens_per_step": B * T, "train_loss": losses, "train_tokens_available": len(data),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_files": [str(p.relative_to(lib)) for p in train_files],
        "heldout": {"validation": "heldout/validation.jsonl", "validation_txt": "heldout/validation.txt",
                    "ood": "heldout/ood.jsonl", "validation_files": [str(p.relative_to(lib)) for p in heldout_files]},
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "build_seconds": round(time.perf_counter() - start, 1),
    }
    (out / "trajectory.json").write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion
    log(f"built in {meta['build_seconds']} s")
