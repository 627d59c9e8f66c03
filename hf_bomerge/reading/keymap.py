"""Key maps: from a training run's tensor names to the names of the HF model its config builds.

A key map is a text file of rules, one a line, `RUN_NAME = HF_NAME [TRANSFORM]`; `*` matches any non-empty part of
a name and the k-th `*` of the left side fills the k-th of the right (`#` starts a comment). A run key that no
rule matches is not a model parameter (an optimizer's state, a dataloader's, `freqs_cis`) and is never read; the
first matching rule wins. A transform is `rope:FIELD`: the run stores q/k projections in the interleaved rotary
layout of Meta's Llama (torchtitan does), which HF Llama's `rotate_half` reads as halves, so the rows of each head
are permuted as torchtitan's own `Llama3StateDictAdapter.to_hf` does, with FIELD the config's head count for it.

>>> rules = parse_key_map("model.* = *", "inline")
>>> select(rules, ["model.lm_head.weight", "optimizer.step"], "a run")
{'lm_head.weight': ('model.lm_head.weight', None)}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, OptionError

BUILTIN = {
    # accelerate's FSDP SHARDED_STATE_DICT saves {"model": state_dict}: every model key under `model.`
    "accelerate": "model.* = *",
    # torchtitan's Llama 3 names (torchtitan/models/llama3/model/state_dict_adapter.py)
    "torchtitan-llama": """
tok_embeddings.weight = model.embed_tokens.weight
layers.*.attention.wq.weight = model.layers.*.self_attn.q_proj.weight rope:num_attention_heads
layers.*.attention.wk.weight = model.layers.*.self_attn.k_proj.weight rope:num_key_value_heads
layers.*.attention.wv.weight = model.layers.*.self_attn.v_proj.weight
layers.*.attention.wo.weight = model.layers.*.self_attn.o_proj.weight
layers.*.feed_forward.w1.weight = model.layers.*.mlp.gate_proj.weight
layers.*.feed_forward.w2.weight = model.layers.*.mlp.down_proj.weight
layers.*.feed_forward.w3.weight = model.layers.*.mlp.up_proj.weight
layers.*.attention_norm.weight = model.layers.*.input_layernorm.weight
layers.*.ffn_norm.weight = model.layers.*.post_attention_layernorm.weight
norm.weight = model.norm.weight
output.weight = lm_head.weight
""",
    "identity": "* = *",
}


@dataclass(frozen=True)
class Rule:
    run: str
    hf: str
    transform: str | None = None

    def match(self, key: str) -> str | None:
        found = re.fullmatch(_regex(self.run), key)
        if found is None:
            return None
        parts = iter(found.groups())
        return re.sub(r"\*", lambda _: next(parts), self.hf)


def _regex(pattern: str) -> str:
    return "".join("(.+?)" if p == "*" else re.escape(p) for p in re.split(r"(\*)", pattern))


def parse_key_map(text: str, where: str) -> list[Rule]:
    """The rules of a key map's text; a malformed line is an `OptionError` naming it."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        run, _, rest = line.partition("=")
        hf, *transform = rest.split() or [""]
        if not hf or not run.strip() or len(transform) > 1 or run.count("*") != hf.count("*") or (
                transform and not re.fullmatch(r"rope:[A-Za-z_]+", transform[0])):
            raise OptionError(f"{where}, line {number}: {line!r} is not a key-map rule `RUN_NAME = HF_NAME "
                              "[rope:CONFIG_FIELD]` with as many `*` on each side.")
        rules.append(Rule(run.strip(), hf, transform[0] if transform else None))
    if not rules:
        raise OptionError(f"{where} holds no key-map rules (`RUN_NAME = HF_NAME`, one a line).")
    return rules


def load_key_map(spec: str) -> tuple[str, list[Rule]]:
    """(its text, its rules) of `--key-map`: a built-in map's name or a file of rules."""
    if spec in BUILTIN:
        return BUILTIN[spec], parse_key_map(BUILTIN[spec], f"the built-in key map {spec}")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise OptionError(f"--key-map {spec}: neither a file of rules nor a built-in map "
                          f"({', '.join(BUILTIN)}).")
    text = path.read_text()
    return text, parse_key_map(text, f"--key-map {spec}")


def select(rules: list[Rule], keys, where: str) -> dict[str, tuple[str, str | None]]:
    """{HF name: (run key, transform)} for the run `keys` some rule matches; two keys onto one name are refused."""
    out: dict[str, tuple[str, str | None]] = {}
    for key in keys:
        rule, name = next(((r, n) for r in rules if (n := r.match(key)) is not None), (None, None))
        if rule is None:
            continue
        if name in out:
            raise CheckpointError(f"{where}: the key map maps both {out[name][0]!r} and {key!r} to {name!r}; "
                                  "make its rules tell them apart.")
        out[name] = (key, rule.transform)
    if not out:
        raise CheckpointError(f"{where}: no tensor name matches the key map, so nothing would be merged. Pass "
                              f"--key-map with rules for this run's names (built in: {', '.join(BUILTIN)}).")
    return out


def resolve_transforms(selected: dict, config: dict, shapes: dict, where: str) -> dict[str, list]:
    """{HF name: ["rope", heads]}: each `rope:FIELD` with the config's value, checked against the tensor's rows."""
    out = {}
    for name, (_, transform) in selected.items():
        if transform is None:
            continue
        field = transform.split(":", 1)[1]
        heads = config.get(field) or (config.get("num_attention_heads") if field == "num_key_value_heads" else None)
        rows = shapes[name][0] if shapes[name] else 0
        if not isinstance(heads, int) or heads <= 0 or len(shapes[name]) != 2 or rows % (2 * heads):
            raise CheckpointError(f"{where}: {name} (shape {list(shapes[name])}) cannot be permuted for rotary "
                                  f"embeddings with {field}={heads!r} from the config; check --config.")
        out[name] = ["rope", heads]
    return out


def rope_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Interleaved rotary pairs (Meta/torchtitan) -> HF's halves, per head (torchtitan's `_permute`)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rope_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `rope_to_hf` (torchtitan's `_reverse_permute`): for writing a merge in the run's names."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)
