"""How long a trial will take on the user's device, estimated before anything is downloaded.

A trial is a re-merge (Σ wᵢθᵢ written into the resident model) and a forward pass over the held-out search
tokens. Both are calibrated here on the device itself, from config.json alone:

- the forward: the model class built from the config with ONE layer (random values, nothing loaded), timed on
  a short batch including the loss; its measured FLOP rate, applied to the full model's FLOPs per token
  (2 × non-embedding parameters, the output head, attention), gives the full forward. Without a model class
  (remote code not trusted) a matrix-multiply probe gives the rate instead.
- the re-merge: `merge_into` (what `ResidentMerger` runs) timed on N synthetic sources of 4 Mi elements,
  scaled by the parameter count.

benchmarks/trial_bench.py compares this estimate with measured trials (see benchmarks/README.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

PROBE_ELEMENTS = 1 << 22


@dataclass
class Estimate:
    """Seconds per trial (`merge_s` + `forward_s`) and for the whole search (trials + confirm scoring)."""

    merge_s: float
    forward_s: float
    trial_s: float
    search_s: float
    trials: int
    search_tokens: int
    confirm_tokens: int
    flops_per_token: float
    flop_rate: float
    calibration: str
    max_eval_tokens: int = 0  # the held-out cap the estimate assumes (the device's default unless given)
    block_size: int = 0

    def describe(self) -> str:
        return (f"  time      ~{_duration(self.trial_s)} per trial on this device (re-merge {_duration(self.merge_s)}, "
                f"forward over {self.search_tokens} held-out tokens {_duration(self.forward_s)}; cap "
                f"{self.max_eval_tokens} tokens in blocks of {self.block_size}"
                + (f", about {self.confirm_tokens} of them, whole documents, kept for the confirm part"
                   if self.confirm_tokens else "") + "); "
                f"~{_duration(self.search_s)} for {self.trials} trials and the confirm scoring "
                f"(calibrated by {self.calibration}; downloads, model load and export not included)")

    def as_dict(self) -> dict:
        return asdict(self)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def shape(config: dict) -> tuple[int, int, int]:
    """(hidden size, layers, vocabulary) under the names the common configs use."""
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers") or 0
    return int(hidden), int(layers), int(config.get("vocab_size") or 0)


def flops_per_token(config: dict, params: int, context: int) -> float:
    """Forward FLOPs per token: 2 per weight that multiplies (the input embedding does not; the output head does,
    tied or not) plus attention scores and values over a causal context of `context` tokens."""
    hidden, layers, vocab = shape(config)
    tied = bool(config.get("tie_word_embeddings", False))
    matmul_params = params if tied else params - vocab * hidden  # untied: the input embedding is a lookup
    return 2.0 * matmul_params + 2.0 * layers * context * hidden  # causal: on average half of 4·T·H


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _best_of(fn, device: str, repeat: int = 2, warmup=None) -> float:
    (warmup or fn)()  # kernels, allocator, first-touch page faults
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def merge_seconds_per_param(device: str, n: int, stored, target) -> float:
    """Seconds per parameter of `ResidentMerger.apply`'s arithmetic, measured on `device`."""
    import torch

    from .merging.engine import as_sources, merge_into, weighted_sum_  # heavy (torch): only when a trial is timed

    sources = as_sources([[torch.rand(PROBE_ELEMENTS, device=device).to(stored)] for _ in range(n)])
    out = torch.empty(PROBE_ELEMENTS, dtype=target, device=device)
    weights = [1.0 / n] * n
    if device == "cpu":
        run = lambda: merge_into(out, sources, weights, stored, check=False)
    else:
        run = lambda: weighted_sum_([out], sources, weights)
    return _best_of(run, device, repeat=3) / PROBE_ELEMENTS


def matmul_rate(device: str, dtype, hidden: int, tokens: int) -> float:
    """FLOP/s of a (tokens × H) · (H × 4H) product in `dtype` on `device`: the shape of an MLP layer."""
    import torch

    hidden = max(hidden, 64)
    a = torch.rand(tokens, hidden, device=device).to(dtype)
    b = torch.rand(hidden, 4 * hidden, device=device).to(dtype)
    return 2.0 * tokens * hidden * 4 * hidden / _best_of(lambda: a @ b, device)


def forward_rate(config: dict, device: str, dtype, tokens: int, batch: int) -> float | None:
    """FLOP/s of the config's model class with one layer (random values) on a batch of `batch` × `tokens`,
    loss included; None when the class cannot be built here (remote code, an unknown architecture)."""
    import torch
    import torch.nn.functional as F

    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        if "auto_map" in config:
            return None
        fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "transformers_version")}
        small = AutoConfig.for_model(config["model_type"], **fields)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(small, key):
                setattr(small, key, 1)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(small)
        model = model.to_empty(device=device).to(dtype).eval()
    except Exception:
        return None
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02)  # no NaN or denormals from uninitialized memory
        for name, b in model.named_buffers():  # non-persistent buffers (rotary frequencies): recomputed at init
            if b.is_floating_point():
                b.uniform_(0.0, 0.02) if "inv_freq" in name else b.zero_()
        ids = torch.randint(0, shape(config)[2] or 2, (batch, tokens), device=device)

        def run(ids=ids):
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1)).item()

        seconds = _best_of(run, device, warmup=lambda: run(ids[:, :64]))
    params = sum(p.numel() for p in model.parameters())
    return flops_per_token(config, params, tokens) * batch * tokens / seconds


def estimate(config: dict, params: int, *, n_checkpoints: int, device: str, eval_dtype: str | None,
             stored_itemsize: int, batch_size: int, block_size: int | None, max_eval_tokens: int, trials: int,
             confirm_fraction: float = 0.25, method: str = "model") -> Estimate:
    """The time of one trial and of `trials` trials on `device`, calibrated there (a few seconds).

    `method`: "model" (a one-layer model of the config's class, timed; the matmul probe when it cannot be
    built) or "matmul" (the matmul probe only).

    >>> e = estimate({"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
    ...               "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64},
    ...              200_000, n_checkpoints=2, device="cpu", eval_dtype=None, stored_itemsize=2, batch_size=4,
    ...              block_size=None, max_eval_tokens=1024, trials=20)
    >>> e.trial_s > 0 and e.search_tokens == 768
    True
    """
    import torch

    from .merging.engine import DTYPES  # heavy (torch): only when a trial is timed

    dtype = DTYPES[eval_dtype] if eval_dtype else (torch.float32 if device == "cpu" else torch.bfloat16)
    stored = {2: torch.float16, 4: torch.float32, 8: torch.float64}.get(stored_itemsize, torch.float16)
    context = int(config.get("max_position_embeddings") or 2048)
    block = min(block_size or 2048, context)
    blocks = max(max_eval_tokens, block) // block
    confirm = sum(1 for i in range(blocks) if math.floor((i + 1) * confirm_fraction + 1e-9) >
                  math.floor(i * confirm_fraction + 1e-9)) if confirm_fraction > 0 else 0
    if confirm < 2 or confirm >= blocks:
        confirm = 0
    # whole documents go to the confirm part: about `confirm_fraction` of the tokens, whatever the documents' lengths
    search_tokens, confirm_tokens = (blocks - confirm) * block, confirm * block
    hidden = shape(config)[0]
    # CPU: one block of up to 1024 tokens (GEMMs as efficient as the real batch's, a few seconds); GPU: a real batch
    probe_tokens, probe_batch = (min(block, 1024), 1) if device == "cpu" else (block, batch_size)
    rate, how = None, "a matmul probe"
    if method == "model":
        rate = forward_rate(config, device, dtype, probe_tokens, probe_batch)
        how = "a one-layer model of this config" if rate else how
    rate = rate or matmul_rate(device, dtype, hidden, probe_tokens * probe_batch)
    fpt = flops_per_token(config, params, block)
    accumulate = dtype if dtype.itemsize >= 4 else torch.float32
    merge_s = merge_seconds_per_param(device, n_checkpoints, stored, accumulate) * params
    forward_s = fpt * search_tokens / rate
    confirm_s = (n_checkpoints + 3) * (merge_s + fpt * confirm_tokens / rate) if confirm_tokens else 0.0
    trial_s = merge_s + forward_s
    return Estimate(merge_s, forward_s, trial_s, trials * trial_s + confirm_s, trials, search_tokens, confirm_tokens,
                    fpt, rate, f"{how} timed on {device} in {str(dtype).removeprefix('torch.')}", max_eval_tokens, block)
