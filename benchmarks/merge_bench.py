"""Merge engine vs mergekit on four Pythia-410m-shaped fp16 checkpoints (see benchmarks/README.md).

    python benchmarks/merge_bench.py [--rounds 3] [--applies 5] [--levers 2] [--mergekit-python PY]

Everything it builds (checkpoints, the mergekit venv, outputs) lives under benchmarks/out/ (gitignored)
and is reused by later runs. Each merge is a separate process under /usr/bin/time -v; hf-bomerge and
mergekit alternate, after an untimed warm-up read of the inputs and one untimed run of each.
"""

from __future__ import annotations

import argparse
import functools
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

if "--worker" in sys.argv:  # a lever variant runs the command: the same OpenMP policy as `hf-bomerge` sets
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from cpu import cpu_model

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CKPTS = OUT / "ckpts"                  # pytorch_model.bin with legacy buffers, like real Pythia steps
CKPTS_ST = OUT / "ckpts-st"            # the same tensors (legacy buffers included) as model.safetensors
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
    rnd = lambda *shape, mean=0.0: (torch.randn(shape, generator=g) * 0.02 + mean).half()
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
    """The same checkpoints as model.safetensors, every tensor kept (mergekit's gpt-neox definition requires the
    legacy `masked_bias`)."""
    from safetensors.torch import save_file
    out = [CKPTS_ST / f.name for f in folders]
    for src, dst in zip(folders, out):
        if not (dst / "model.safetensors").is_file():
            write_folder_files(dst)
            sd = torch.load(src / "pytorch_model.bin", weights_only=True, mmap=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, dst / "tmp.safetensors", metadata={"format": "pt"})
            (dst / "tmp.safetensors").rename(dst / "model.safetensors")
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
def hf_cli(root: Path, out: Path, variant: str = "shipped") -> list[str]:
    """The user's command: `hf-bomerge ROOT --revisions ... --weights ... --no-eval`, optionally with one lever
    turned back (see `worker_variant`)."""
    args = [str(root), "--revisions", f"{REVISIONS[0]}..{REVISIONS[-1]}", "--weights", ",".join(map(str, WEIGHTS)),
            "--no-eval", "--dtype", "float16", "--quiet", "--overwrite", "--output", str(out)]
    if variant == "shipped":
        return [sys.executable, "-m", "hf_bomerge.cli", *args]
    return [sys.executable, __file__, "--worker", variant, *args]


VARIANTS = {
    "write-in-line": "each buffer written before the next is filled (no writer thread)",
    "tensor-then-copy": "each tensor merged into its own memory, then copied into the file buffer (the export before)",
    "copying-reader": "safetensors read with positioned reads into fresh memory (the reader before this change)",
    "model-rule": "the merge rule from the model class built on the meta device (imports transformers)",
    "buffered-write": "the shards written through the page cache, then fsync'd (the writer before O_DIRECT)",
}


def worker_variant(variant: str, args: list[str]) -> int:
    """The CLI with one lever turned back, to measure what it is worth."""
    from hf_bomerge import cli
    from hf_bomerge.merging import durable, engine, writer
    from hf_bomerge.reading import checkpoints

    if variant == "write-in-line":
        def hand_over(self, last=False, _threaded=durable.DurableFile._hand_over):
            _threaded(self, last)
            self._wait()
        durable.DurableFile._hand_over = hand_over
    elif variant == "tensor-then-copy":
        def write_tensor(f, ckpts, info, weights, dtype, kept):
            tensor = writer.merged_tensor(ckpts, info.name, weights, dtype).to(info.dtype)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
        writer._write_tensor = write_tensor
    elif variant == "copying-reader":
        def get(self, name, _mapped=checkpoints.Checkpoint.get):
            index, offset = self._where[name]
            if offset < 0:
                return _mapped(self, name)
            info = self.infos[name]
            out = torch.empty(info.shape, dtype=info.dtype)
            with open(self.files[index], "rb") as f:
                f.seek(offset)
                f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
            return out
        checkpoints.Checkpoint.get = get
        checkpoints.Checkpoint.release = lambda self, name: None
    elif variant == "model-rule":
        engine.suffix_rule_suffices = lambda folder: False
    elif variant == "buffered-write":
        writer.DurableFile = functools.partial(writer.DurableFile, direct=False)
    return cli.main(args)


def worker_resident(applies: int, device: str, folders: list[str]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_bomerge.merging.mergers import ResidentMerger
    from hf_bomerge.reading.checkpoints import CheckpointSet
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


def transformers_version() -> str:
    import importlib.metadata
    return importlib.metadata.version("transformers")


def machine() -> str:
    cpu = cpu_model()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM; Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers_version()}")


def write_bandwidth(nbytes: int) -> tuple[float, str]:
    """Best of 3 each way: GB/s of writing `nbytes` to a new file in 64 MiB writes, fsync included (as the
    export), buffered and with O_DIRECT (hf_bomerge.merging.durable); the faster way and its name."""
    from hf_bomerge.merging.durable import DurableFile

    block = os.urandom(64 << 20)
    count = max(1, nbytes // len(block))
    path, best = OUT / "write-probe.bin", {}
    for way in ("buffered", "O_DIRECT"):
        for _ in range(3):
            t = time.perf_counter()
            with open(path, "wb") if way == "buffered" else DurableFile(path, buffer_size=len(block)) as f:
                for _ in range(count):
                    f.write(block)
                if way == "buffered":
                    f.flush()
                    os.fsync(f.fileno())
            best[way] = max(best.get(way, 0.0), count * len(block) / (time.perf_counter() - t) / 1e9)
            path.unlink()
    way = max(best, key=best.get)
    return best[way], way


def import_floor() -> float:
    """Best of 3: a bare interpreter that imports torch (what any merge in Python pays before reading a byte)."""
    return min(timed([sys.executable, "-c", "import torch"], "imports")["wall"] for _ in range(3))


FORMATS = {"bin": ("pytorch_model.bin (fp16, legacy buffers)", "pytorch_model.bin"),
           "safetensors": ("model.safetensors (fp16, legacy buffers)", "model.safetensors")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--applies", type=int, default=5, help="ResidentMerger.apply repetitions (0: skip)")
    ap.add_argument("--formats", default="bin,safetensors")
    ap.add_argument("--levers", type=int, default=0, metavar="R",
                    help="also time R alternating rounds of the CLI with each lever turned back (safetensors)")
    ap.add_argument("--mergekit-python", help="an interpreter that can import mergekit (default: install "
                    f"{MERGEKIT} into {VENV.relative_to(HERE.parent)} and run its mergekit-yaml)")
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=["resident", *VARIANTS], help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args()
    if a.worker == "resident":
        return worker_resident(a.applies, a.device, a.args)
    if a.worker:
        sys.exit(worker_variant(a.worker, a.args + rest))

    OUT.mkdir(exist_ok=True)
    folders = {"bin": build_checkpoints()}
    folders["safetensors"] = safetensors_copies(folders["bin"])
    formats = a.formats.split(",")
    if a.mergekit_python:
        mk_cmd = [a.mergekit_python, "-c", "import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())"]
        mk_py = a.mergekit_python
    else:
        ensure_mergekit()
        mk_cmd, mk_py = [str(VENV / "bin" / "mergekit-yaml")], str(VENV / "bin" / "python")
    mk_version = subprocess.run([mk_py, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True, check=True).stdout.strip()
    os.environ["HF_BOMERGE_CACHE"] = str(OUT / "cache")
    load0 = os.getloadavg()

    def inputs(fmt: str) -> list[Path]:
        return [f / FORMATS[fmt][1] for f in folders[fmt]]

    def mk_config(fmt: str) -> Path:
        cfg = OUT / f"mergekit-{fmt}.yml"
        cfg.write_text("merge_method: linear\ndtype: float16\nmodels:\n" + "".join(
            f"  - model: {s}\n    parameters:\n      weight: {w}\n" for s, w in zip(folders[fmt], WEIGHTS)))
        return cfg

    def out_dir(tool: str, fmt: str) -> Path:
        return OUT / f"merged-{tool}-{fmt}"

    runs = {("hf-bomerge", fmt): (lambda fmt=fmt: timed(hf_cli(folders[fmt][0].parent, out_dir("hf-bomerge", fmt)), "hf"))
            for fmt in formats}
    runs.update({("mergekit", fmt): (lambda fmt=fmt: timed([*mk_cmd, str(mk_config(fmt)), str(out_dir("mergekit", fmt))],
                                                           "mk"))
                 for fmt in formats})
    if a.levers:
        runs.update({(v, "safetensors"): (lambda v=v: timed(hf_cli(folders["safetensors"][0].parent,
                                                                    out_dir(v, "safetensors"), v), v))
                     for v in VARIANTS})

    def run(key) -> dict:
        shutil.rmtree(out_dir(*key), ignore_errors=True)
        r = runs[key]()
        if r["rc"]:
            sys.exit(f"{key} failed:\n{r['stderr']}")
        r["bytes"] = sum(p.stat().st_size for p in inputs(key[1])) + dir_bytes(out_dir(*key))
        return r

    for fmt in formats:
        log(f"warm-up read of the {fmt} inputs")
        warm_read(inputs(fmt))
    for key in [k for k in runs if k[0] in ("hf-bomerge", "mergekit")]:  # untimed: imports and caches warm
        log(f"warm-up run {key}")
        run(key)
    log("timing interpreter start + imports alone (best of 3)")
    imports = {"hf-bomerge": import_floor(),
               "mergekit": min(timed([mk_py, "-c", "import mergekit.scripts.run_yaml"], "imports")["wall"]
                               for _ in range(3))}
    log("measuring memory and write bandwidth")
    bw_copy, bw_read = mem_bandwidth()
    out_bytes = dir_bytes(out_dir("hf-bomerge", formats[0]))
    bw_write, write_way = write_bandwidth(out_bytes)

    results: dict = {key: [] for key in runs}
    main_keys = [k for k in runs if k[0] in ("hf-bomerge", "mergekit")]
    for rnd in range(a.rounds):
        for key in main_keys:
            results[key].append(run(key))
            log(f"round {rnd + 1} {key}: {results[key][-1]['wall']:.2f} s, {results[key][-1]['rss']:.2f} GiB")
    for rnd in range(a.levers):
        for key in [("hf-bomerge", "safetensors")] + [(v, "safetensors") for v in VARIANTS]:
            results[key].append(run(key))
            log(f"lever round {rnd + 1} {key}: {results[key][-1]['wall']:.2f} s")
    load1 = os.getloadavg()
    (OUT / "merge_bench.json").write_text(json.dumps({" ".join(k): v for k, v in results.items()}, default=str))

    def med(key, field="wall"):
        return statistics.median(r[field] for r in results[key])

    header = ("| inputs | tool | wall s, median (rounds) | interpreter + imports alone, s | CPU s, median "
              "| peak RSS GiB (max) | GB/s (in + out files) / wall | × floor | max abs err vs fp16(Σ wᵢθᵢ in fp64) "
              "| elements ≠ fp16(ref) | legacy buffers in output |")
    rows, verdicts = [header, "| --- " * 11 + "|"], []
    for fmt in formats:
        in_bytes = sum(p.stat().st_size for p in inputs(fmt))
        out_b = dir_bytes(out_dir("hf-bomerge", fmt))
        floor = (in_bytes + out_b) / (bw_copy * 1e9) + out_b / (bw_write * 1e9)
        for tool in ("hf-bomerge", "mergekit"):
            key, e = (tool, fmt), max_errors(out_dir(tool, fmt), folders["bin"])
            walls = ", ".join(f"{r['wall']:.2f}" for r in results[key])
            rows.append(f"| {FORMATS[fmt][0]}, {in_bytes / 1e9:.2f} GB | {tool} | {med(key):.2f} ({walls}) | "
                        f"{imports[tool]:.2f} | {med(key, 'cpu'):.1f} | {max(r['rss'] for r in results[key]):.2f} | "
                        f"{statistics.median(r['bytes'] / r['wall'] / 1e9 for r in results[key]):.2f} | "
                        f"{med(key) / floor:.2f} | {e['f16']:.3g} | {e['wrong']:.2e} | {e['buffers']} |")
        hf, mk = med(("hf-bomerge", fmt)), med(("mergekit", fmt))
        hrss = max(r["rss"] for r in results[("hf-bomerge", fmt)])
        mrss = max(r["rss"] for r in results[("mergekit", fmt)])
        ndiff, nmerged = differing_merged(out_dir("hf-bomerge", fmt), out_dir("mergekit", fmt))
        verdicts.append(
            f"{fmt}: hf-bomerge {mk / hf:.2f}× mergekit's speed (target ≥ 3), {hrss / mrss:.2f}× its peak RSS "
            f"(target ≤ 0.33); {hf / floor:.2f}× this machine's floor of {floor:.2f} s (target ≤ 2; floor = "
            f"(input {in_bytes / 1e9:.2f} GB + output {out_b / 1e9:.2f} GB) at the copy bandwidth + the output at the "
            f"write bandwidth); {hf / (floor + imports['hf-bomerge']):.2f}× floor + `import torch`. "
            f"Merged tensors differing bit-wise between the tools: {ndiff} of {nmerged}.")
    levers = []
    if a.levers:
        base = med(("hf-bomerge", "safetensors"))
        levers = ["", "Levers (safetensors inputs, the shipped CLI against the same CLI with one lever turned back, "
                  f"{a.levers} alternating rounds; medians):", "",
                  "| variant | wall s, median (rounds) | CPU s | peak RSS GiB | Δ wall vs shipped |", "| --- " * 5 + "|"]
        for key in [("hf-bomerge", "safetensors")] + [(v, "safetensors") for v in VARIANTS]:
            rs = results[key][-a.levers:]
            w, walls = statistics.median(r["wall"] for r in rs), ", ".join(f"{r['wall']:.2f}" for r in rs)
            name = "shipped" if key[0] == "hf-bomerge" else f"{key[0]}: {VARIANTS[key[0]]}"
            levers.append(f"| {name} | {w:.2f} ({walls}) | "
                          f"{statistics.median(r['cpu'] for r in rs):.1f} | {max(r['rss'] for r in rs):.2f} | "
                          f"{w - base:+.2f} |")
    resident = []
    for dev in (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])) if a.applies else []:
        log(f"timing ResidentMerger.apply on {dev}")
        res = timed([sys.executable, __file__, "--worker", "resident", "--applies", str(a.applies), "--device", dev]
                    + [str(f) for f in folders["bin"]], "resident")
        if res["rc"]:
            resident.append(f"ResidentMerger on {dev} FAILED: {res['stderr'].strip().splitlines()[-1]}")
            continue
        ri = res["info"]
        resident.append(f"ResidentMerger.apply on {dev} (4 fp16 checkpoints → float32 model, {ri['params'] / 1e6:.0f} M "
                        f"params): median {ri['median_s']:.3f} s over {a.applies} applies (first {ri['first_s']:.3f} s, "
                        f"setup {ri['setup_s']:.2f} s, peak RSS {res['rss']:.2f} GiB).")
    md = "\n".join([
        f"Machine: {machine()}; mergekit {mk_version}.",
        f"Command: `hf-bomerge ROOT --revisions {REVISIONS[0]}..{REVISIONS[-1]} --weights "
        f"{','.join(map(str, WEIGHTS))} --no-eval --dtype float16 --quiet` vs `mergekit-yaml` (linear, float16); "
        f"4 Pythia-410m-shaped checkpoints per format; {a.rounds} rounds, each running every (tool, format) once in "
        "turn; page cache warm.", "", *rows, "", *verdicts, "",
        f"Bandwidth: memory copy {bw_copy:.1f} GB/s (read + write counted; torch, 2 GiB, best of 3), read {bw_read:.1f} "
        f"GB/s; file write {bw_write:.2f} GB/s ({out_bytes / 1e9:.2f} GB in 64 MiB writes + fsync, {write_way}; the "
        "faster of buffered and O_DIRECT, best of 3 each). "
        f"`python -c 'import torch'` alone: {imports['hf-bomerge']:.2f} s.",
        *levers, "", *resident,
        f"Load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f} (a shared machine: compare within one run).",
    ])
    print(md)
    (OUT / "merge_bench.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
