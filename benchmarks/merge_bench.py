"""Merge engine vs mergekit on four Pythia-410m-shaped fp16 checkpoints (see benchmarks/README.md).

    python benchmarks/merge_bench.py [--rounds 3] [--applies 5]

Everything it builds (checkpoints, the mergekit venv, outputs) lives under benchmarks/out/ (gitignored)
and is reused by later runs. Each merge is a separate process under /usr/bin/time -v; hf-bomerge and
mergekit alternate, after an untimed warm-up read of the inputs and one untimed run of each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CKPTS = OUT / "ckpts"                  # pytorch_model.bin with legacy buffers, like real Pythia steps
CKPTS_ST = OUT / "ckpts-safetensors"   # only made if mergekit cannot read the .bin files
VENV = OUT / "venv-mergekit"
MERGEKIT = "mergekit==0.1.5"
REVISIONS = ["step1000", "step2000", "step3000", "step4000"]
WEIGHTS = [0.1, 0.2, 0.3, 0.4]
LAYERS, HIDDEN, INTER, VOCAB, CTX, HEADS = 24, 1024, 4096, 50304, 2048, 16
LEGACY = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": HIDDEN, "initializer_range": 0.02,
    "intermediate_size": INTER, "layer_norm_eps": 1e-05, "max_position_embeddings": CTX,
    "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "rotary_emb_base": 10000,
    "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "use_parallel_residual": True, "vocab_size": VOCAB,
}


def log(msg: str) -> None:
    print(f"[merge_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- fixtures
def pythia_state(seed: int) -> dict[str, torch.Tensor]:
    """Random fp16 weights under real Pythia key names, in the stored order, legacy buffers included."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, mean=0.0: (torch.randn(shape, generator=g) * 0.02 + mean).half()  # noqa: E731
    rot = int(HIDDEN // HEADS * 0.25)
    sd = {"gpt_neox.embed_in.weight": rnd(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"gpt_neox.layers.{i}."
        for ln in ("input_layernorm", "post_attention_layernorm"):
            sd[p + ln + ".weight"], sd[p + ln + ".bias"] = rnd(HIDDEN, mean=1.0), rnd(HIDDEN)
        sd[p + "attention.bias"] = torch.tril(torch.ones(CTX, CTX, dtype=torch.bool)).view(1, 1, CTX, CTX)
        sd[p + "attention.masked_bias"] = torch.tensor(-1e9).half()  # -inf in fp16
        sd[p + "attention.rotary_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
        for name, (o, n) in {"attention.query_key_value": (3 * HIDDEN, HIDDEN), "attention.dense": (HIDDEN, HIDDEN),
                             "mlp.dense_h_to_4h": (INTER, HIDDEN), "mlp.dense_4h_to_h": (HIDDEN, INTER)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = rnd(o, n), rnd(o)
    sd["gpt_neox.final_layer_norm.weight"] = rnd(HIDDEN, mean=1.0)
    sd["gpt_neox.final_layer_norm.bias"] = rnd(HIDDEN)
    sd["embed_out.weight"] = rnd(VOCAB, HIDDEN)
    return sd


def write_folder_files(folder: Path) -> None:
    """config.json and a minimal fast tokenizer (mergekit copies a tokenizer into its output)."""
    from tokenizers import Tokenizer, models
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2))
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="<|endoftext|>")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


def build_checkpoints() -> list[Path]:
    folders = [CKPTS / r for r in REVISIONS]
    for seed, folder in enumerate(folders):
        if (folder / "pytorch_model.bin").is_file():
            continue
        log(f"building {folder}")
        write_folder_files(folder)
        torch.save(pythia_state(seed), folder / "tmp.bin")  # zip format (torch >= 1.6 default)
        (folder / "tmp.bin").rename(folder / "pytorch_model.bin")
    return folders


def safetensors_copies(folders: list[Path]) -> list[Path]:
    """The same checkpoints as model.safetensors without the legacy buffers (mergekit fallback)."""
    from safetensors.torch import save_file
    out = [CKPTS_ST / f.name for f in folders]
    for src, dst in zip(folders, out):
        if not (dst / "model.safetensors").is_file():
            write_folder_files(dst)
            sd = torch.load(src / "pytorch_model.bin", weights_only=True, mmap=True)
            save_file({k: v for k, v in sd.items() if not k.endswith(LEGACY)}, dst / "model.safetensors",
                      metadata={"format": "pt"})
    return out


def ensure_mergekit() -> str:
    py = VENV / "bin" / "python"
    if not (VENV / "bin" / "mergekit-yaml").exists():
        log(f"installing {MERGEKIT} into {VENV}")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # first, or pip pulls a CUDA build
        subprocess.run(pip + [MERGEKIT, "torch==2.13.0"], check=True)
    return subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


# ---------------------------------------------------------------- measuring
def timed(cmd: list[str], tag: str) -> dict:
    """Run cmd under /usr/bin/time -v: wall seconds, peak RSS (GiB), last stdout line if JSON."""
    tfile = OUT / f"time-{tag}.txt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    p = subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile)] + cmd, capture_output=True, text=True, env=env)
    t = tfile.read_text()
    h, m, s = ([0] + [float(x) for x in re.search(r"Elapsed.*: ([\d:.]+)", t).group(1).split(":")])[-3:]
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", t).group(1)) for k in ("User", "System"))
    res = {"rc": p.returncode, "wall": 3600 * h + 60 * m + s, "cpu": cpu, "stderr": p.stderr[-3000:],
           "rss": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 2**20}
    lines = p.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        res["info"] = json.loads(lines[-1])
    return res


def warm_read(paths: list[Path]) -> float:
    n = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(1 << 24):
                n += len(chunk)
    return n


def mem_bandwidth(gib: float = 2.0) -> tuple[float, float]:
    """Best of 3: copy GB/s (read + write bytes counted) and read GB/s (sum), torch, all cores."""
    a = torch.ones(int(gib * 2**30) // 4)
    b = torch.empty_like(a)
    copy, read = [], []
    for _ in range(3):
        t = time.perf_counter(); b.copy_(a); copy.append(2 * a.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter(); a.sum(); read.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    return max(copy), max(read)


def dir_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.endswith(suffix))


def max_errors(out_dir: Path, folders: list[Path]) -> dict:
    """Max |out − ref| over all merged tensors, ref = Σ wᵢθᵢ in float64 (raw, and cast to fp16);
    plus what happened to the legacy buffers."""
    from safetensors import safe_open
    srcs = [torch.load(f / "pytorch_model.bin", weights_only=True, mmap=True) for f in folders]
    outs = {}
    for f in out_dir.glob("*.safetensors"):
        h = safe_open(str(f), framework="pt")
        outs.update({k: h for k in h.keys()})
    raw = f16 = 0.0
    wrong = total = 0
    buffers = []
    for name, t in srcs[-1].items():
        if name not in outs:
            if name.endswith(LEGACY):
                buffers.append(f"{name.split('attention.')[-1]} missing")
            continue
        got = outs[name].get_tensor(name)
        if name.endswith(LEGACY):
            if not (got.dtype == t.dtype and torch.equal(got, t)):
                buffers.append(f"{name.split('attention.')[-1]} changed to {got.dtype} {got.flatten()[:2].tolist()}")
            continue
        ref = sum(w * s[name].double() for w, s in zip(WEIGHTS, srcs))
        d_raw = (got.double() - ref).abs().max().item()
        d_f16 = (got.double() - ref.half().double()).abs().max().item()
        wrong += int((got != ref.half()).sum())
        total += got.numel()
        raw, f16 = max(raw, d_raw), max(f16, d_f16)
    kinds = sorted(set(buffers))
    return {"raw": raw, "f16": f16, "wrong": wrong / total,
            "buffers": "; ".join(kinds) or "copied unchanged"}


def differing_merged(a: Path, b: Path) -> tuple[int, int]:
    """How many merged (non-buffer) tensors differ bit-wise between two outputs, of how many."""
    from safetensors import safe_open
    fa, fb = (safe_open(str(d / "model.safetensors"), framework="pt") for d in (a, b))
    names = [n for n in fa.keys() if not n.endswith(LEGACY)]
    return sum(not torch.equal(fa.get_tensor(n), fb.get_tensor(n)) for n in names), len(names)


# ---------------------------------------------------------------- workers (run as subprocesses)
def worker_hf(out_dir: str, folders: list[str]) -> None:
    from hf_bomerge.checkpoints import CheckpointSet
    from hf_bomerge.writer import export_merge
    t0 = time.perf_counter()
    ckpts = CheckpointSet(folders)
    t1 = time.perf_counter()
    export_merge(ckpts, WEIGHTS, out_dir, dtype=torch.float16)
    print(json.dumps({"open_s": t1 - t0, "export_s": time.perf_counter() - t1}))


def worker_resident(applies: int, device: str, folders: list[str]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from hf_bomerge.checkpoints import CheckpointSet
    from hf_bomerge.mergers import ResidentMerger
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folders[-1]), dtype=torch.float32).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    merger = ResidentMerger(model, CheckpointSet(folders))
    setup = time.perf_counter() - t0
    times = []
    for _ in range(applies + 1):  # the first apply faults the mmap'd sources in: reported apart
        t = time.perf_counter(); merger.apply(WEIGHTS); sync(); times.append(time.perf_counter() - t)
    print(json.dumps({"setup_s": setup, "first_s": times[0], "median_s": statistics.median(times[1:]),
                      "params": sum(p.numel() for p in model.parameters())}))


# ---------------------------------------------------------------- main
def transformers_version() -> str:
    import importlib.metadata
    return importlib.metadata.version("transformers")


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if l.startswith("Model name")), platform.processor())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--applies", type=int, default=5)
    ap.add_argument("--mergekit-python", help="an interpreter that can import mergekit (default: install "
                    f"{MERGEKIT} into {VENV.relative_to(HERE.parent)} and run its mergekit-yaml)")
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["hf", "resident"], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "hf":
        return worker_hf(a.args[0], a.args[1:])
    if a.worker == "resident":
        return worker_resident(a.applies, a.device, a.args)

    OUT.mkdir(exist_ok=True)
    folders = build_checkpoints()
    mk_py = a.mergekit_python or str(VENV / "bin" / "python")
    if a.mergekit_python:
        mk_cmd = [a.mergekit_python, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]
        mk_version = subprocess.run([a.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    else:
        mk_cmd, mk_version = [str(VENV / "bin" / "mergekit-yaml")], ensure_mergekit()
    load0 = os.getloadavg()
    bins = [f / "pytorch_model.bin" for f in folders]
    in_bytes = sum(p.stat().st_size for p in bins)
    hf_out, mk_out = OUT / "merged-hf", OUT / "merged-mergekit"

    def mk_config(srcs: list[Path]) -> Path:
        cfg = OUT / "mergekit.yml"
        cfg.write_text("merge_method: linear\ndtype: float16\nmodels:\n" + "".join(
            f"  - model: {s}\n    parameters:\n      weight: {w}\n" for s, w in zip(srcs, WEIGHTS)))
        return cfg

    runs = {
        "hf-bomerge": lambda: timed([sys.executable, __file__, "--worker", "hf", str(hf_out)] + [str(f) for f in folders], "hf"),
        "mergekit": lambda: timed(mk_cmd + [str(mk_config(mk_srcs)), str(mk_out)], "mk"),
    }
    log(f"warm-up read of {in_bytes / 1e9:.2f} GB of inputs")
    warm_read(bins)
    mk_srcs, notes = folders, []
    for tool, out in (("hf-bomerge", hf_out), ("mergekit", mk_out)):  # untimed warm-up runs (imports, caches)
        shutil.rmtree(out, ignore_errors=True)
        r = runs[tool]()
        if r["rc"] and tool == "mergekit":
            err = r["stderr"].strip().splitlines()[-1:] or ["?"]
            notes.append(f"mergekit {mk_version} failed on the .bin checkpoints with legacy buffers: {err[0]}; "
                         "it was given safetensors copies without those buffers instead.")
            log(notes[-1])
            mk_srcs = safetensors_copies(folders)
            warm_read([s / "model.safetensors" for s in mk_srcs])
            shutil.rmtree(out, ignore_errors=True)
            r = runs[tool]()
        if r["rc"]:
            sys.exit(f"{tool} failed:\n{r['stderr']}")
    log("timing interpreter start + imports alone (best of 3)")
    imports = {tool: min(timed(cmd, "imports")["wall"] for _ in range(3)) for tool, cmd in (
        ("hf-bomerge", [sys.executable, "-c", "import torch, hf_bomerge.engine, hf_bomerge.checkpoints"]),
        ("mergekit", [mk_py, "-c", "import mergekit.scripts.run_yaml"]))}
    log("measuring memory bandwidth")
    bw_copy, bw_read = mem_bandwidth()

    results: dict[str, list[dict]] = {"hf-bomerge": [], "mergekit": []}
    for rnd in range(a.rounds):
        for tool, out in (("hf-bomerge", hf_out), ("mergekit", mk_out)):
            shutil.rmtree(out, ignore_errors=True)
            r = runs[tool]()
            if r["rc"]:
                sys.exit(f"{tool} failed:\n{r['stderr']}")
            r["bytes"] = (in_bytes if tool == "hf-bomerge" or mk_srcs is folders else
                          sum((s / "model.safetensors").stat().st_size for s in mk_srcs)) + dir_bytes(out)
            results[tool].append(r)
            log(f"round {rnd + 1} {tool}: {r['wall']:.2f} s, {r['rss']:.2f} GiB {r.get('info', '')}")
    errors = {"hf-bomerge": max_errors(hf_out, folders), "mergekit": max_errors(mk_out, folders)}
    ndiff, nmerged = differing_merged(hf_out, mk_out)
    load1 = os.getloadavg()
    resident = []
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        log(f"timing ResidentMerger.apply on {dev}")
        res = timed([sys.executable, __file__, "--worker", "resident", "--applies", str(a.applies), "--device", dev]
                    + [str(f) for f in folders], "resident")
        if res["rc"]:  # reported, not fatal: the export comparison above still stands
            err = res["stderr"].strip().splitlines()[-1]
            resident.append(f"ResidentMerger on {dev} FAILED (transformers {transformers_version()}): {err}")
            continue
        ri = res["info"]
        resident.append(
            f"ResidentMerger.apply on {dev} (4 fp16 checkpoints → float32 GPTNeoXForCausalLM, {ri['params'] / 1e6:.0f} M "
            f"params): median {ri['median_s']:.3f} s over {a.applies} applies (first apply {ri['first_s']:.3f} s, "
            f"setup {ri['setup_s']:.2f} s, process peak RSS {res['rss']:.2f} GiB).")

    rows = []
    for tool, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        gbs = statistics.median(r["bytes"] / r["wall"] / 1e9 for r in rs)
        e = errors[tool]
        walls = ", ".join(f"{r['wall']:.2f}" for r in rs)
        cpu = statistics.median(r["cpu"] for r in rs)
        rows.append(f"| {tool} | {wall:.2f} ({walls}) | {imports[tool]:.2f} | {cpu:.1f} | "
                    f"{max(r['rss'] for r in rs):.2f} | {gbs:.2f} | {gbs / bw_copy:.1%} | "
                    f"{e['f16']:.3g} | {e['wrong']:.2e} | {e['raw']:.3g} | {e['buffers']} |")
    hf, mk = (statistics.median(r["wall"] for r in results[t]) for t in results)
    hrss, mrss = (max(r["rss"] for r in results[t]) for t in results)
    md = "\n".join([
        f"Machine: {machine()}; mergekit {mk_version}.",
        f"Inputs: 4 × Pythia-410m-shaped fp16 pytorch_model.bin with legacy buffers, {in_bytes / 1e9:.2f} GB in all; "
        f"weights {WEIGHTS}; {a.rounds} alternating rounds, page cache warm.",
        "",
        "| tool | wall s, median (rounds) | interpreter + imports alone, s | CPU s (user+sys), median "
        "| peak RSS GiB (max) "
        "| GB/s = (input files + output files) / wall | of memory copy bandwidth "
        "| max abs err vs fp16(Σ wᵢθᵢ in fp64) | fraction of elements ≠ fp16(ref) | max abs err vs raw fp64 "
        "| legacy buffers in output |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        f"hf-bomerge vs mergekit: {mk / hf:.2f}× the speed, {hrss / mrss:.2f}× the peak RSS "
        f"(target ≥ 3× and ≤ 0.33×). Merged tensors differing bit-wise between the two outputs: {ndiff} of {nmerged}.",
        f"Memory bandwidth (torch, best of 3, 2 GiB): copy {bw_copy:.1f} GB/s (read + write counted), "
        f"read (sum) {bw_read:.1f} GB/s.",
        f"hf-bomerge phases (last round): open {results['hf-bomerge'][-1]['info']['open_s']:.2f} s, "
        f"export_merge {results['hf-bomerge'][-1]['info']['export_s']:.2f} s (rest: interpreter start, imports, exit).",
        *resident,
        f"Load average (1 min) before / after the timed rounds: {load0[0]:.2f} / {load1[0]:.2f} "
        f"(other work on the machine slows both tools; compare within one run).",
        *(f"Note: {n}" for n in notes),
    ])
    print(md)
    (OUT / "merge_bench.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
