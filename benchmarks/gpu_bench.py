"""GPU benchmark: the in-memory trial re-merge and the held-out evaluation on Pythia-1B-shaped weights.

    python benchmarks/gpu_bench.py            # needs a CUDA GPU; random weights of the real shapes

Measures, on one GPU, with N fp16 checkpoints resident:
- `weighted_sum_` per trial (what `ResidentMerger.apply` runs) for N=4 into a float32 model, for a pair as
  θ₀ + λΔ (one axpy), and the per-tensor float32 path of a bf16 model; against the bound set by the bytes a
  merge must move (read N sources, write the target) at the measured device copy bandwidth;
- the forward pass of the held-out evaluation (bf16, batch × 2048 tokens): tokens/s and the fraction of
  the GPU's dense bf16 peak (FLOPs ≈ 2 · params · tokens, attention not counted).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from hf_bomerge.merging.engine import as_sources, select, weighted_sum_

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    dev = torch.device("cuda")
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                           intermediate_size=8192, max_position_embeddings=2048, rotary_pct=0.25,
                           tie_word_embeddings=False)
    with torch.device(dev):
        model = GPTNeoXForCausalLM(config).to(torch.float32)
    params = [p.data for p in model.parameters()]
    n_params = sum(p.numel() for p in params)
    sources = [[torch.randn_like(p, dtype=torch.float16) for p in params] for _ in range(args.n)]
    weights = [1.0 / args.n] * args.n

    big = torch.empty(2 * 1024**3 // 4, device=dev)
    copy_s = timed(big.clone, args.repeat)
    bandwidth = 2 * big.numel() * 4 / copy_s  # read + write
    del big

    rows = []
    general = as_sources(sources)
    moved = n_params * (2 * args.n + 4)
    rows.append((f"N={args.n} → float32 model", timed(partial(weighted_sum_, params, general, weights), args.repeat),
                 moved))
    pair = as_sources(sources[:2])
    moved = n_params * (2 + 4 + 4)
    rows.append(("pair θ₀+λΔ → float32 model", timed(partial(weighted_sum_, params, pair, [0.3, 0.7]), args.repeat),
                 moved))
    del pair
    model = model.to(torch.bfloat16)
    params = [p.data for p in model.parameters()]

    def half_model(general=general):
        for k, target in enumerate(params):
            acc = torch.empty(target.shape, dtype=torch.float32, device=dev)
            weighted_sum_([acc], select(general, k), weights)
            target.copy_(acc.to(torch.float16))

    rows.append((f"N={args.n} → bf16 model (per-tensor float32)", timed(half_model, args.repeat),
                 n_params * (2 * args.n + 2)))

    name = torch.cuda.get_device_name()
    print(f"device: {name}; torch {torch.__version__}; params {n_params / 1e9:.3f} B; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)\n")
    print("| trial re-merge | ms | bytes moved (min) | bound at copy bandwidth, ms | × bound |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, seconds, nbytes in rows:
        bound = nbytes / bandwidth
        print(f"| {label} | {seconds * 1e3:.2f} | {nbytes / 1e9:.1f} GB | {bound * 1e3:.2f} | {seconds / bound:.2f} |")

    del general, sources
    torch.cuda.empty_cache()
    ids = torch.randint(0, config.vocab_size, (args.batch, 2048), device=dev)
    model.eval()
    with torch.no_grad():
        forward_s = timed(lambda: model(input_ids=ids, use_cache=False).logits, max(3, args.repeat // 2))
    tokens = ids.numel()
    flops = 2 * n_params * tokens
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print("\n| evaluation forward (bf16) | tokens/s | TFLOP/s | of dense bf16 peak |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| batch {args.batch} × 2048 | {tokens / forward_s:,.0f} | {flops / forward_s / 1e12:.0f} | "
          f"{'%.0f%%' % (100 * flops / forward_s / 1e12 / peak) if peak else 'n/a'} |")


if __name__ == "__main__":
    main()
