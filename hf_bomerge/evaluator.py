"""The objective: a loaded model, the N checkpoints beside it (or streamed), and the held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import parallel
from .checkpoints import CheckpointSet, check_remote_code
from .engine import DTYPES, ResidentMerger, StreamedMerger, parse_size
from .errors import BOMergeError
from .heldout import HeldOutSpec, heldout_blocks, nll_sums
from .prepare import Prepared
from .tasks import Metric, choice_set, predict


def choose_eval_dtype(name: str | None, device: str, ckpts: CheckpointSet) -> torch.dtype:
    if name:
        return DTYPES[name]
    if device.startswith("cuda"):
        ref = ckpts.reference.infos[ckpts.merged_names[0]].dtype
        return ref if ref in (torch.float16, torch.bfloat16) else torch.bfloat16
    return torch.float32  # half-precision matmul on CPUs is ~100x slower


class Evaluator:
    """A resident model, the N checkpoints beside it, and the held-out data: weights in, objective out
    (the mean NLL of the held-out blocks, or the `metric` of the multiple-choice predictions).

    Under `accelerate launch` each process scores its share of the loss batches and the sums are reduced
    (`hf_bomerge.parallel`), so every process returns the same loss. (A metric is computed whole on each.)
    """

    def __init__(self, prep: Prepared, ckpts: CheckpointSet, *, dataset: HeldOutSpec, block_size: int | None,
                 max_eval_tokens: int, batch_size: int, eval_dtype: str | None, device: str | None,
                 trust_remote_code: bool, cache_dir: Path, store_dtype: str | None = None,
                 device_map: str | dict | None = None, max_memory: str | int | None = None,
                 metric: Metric | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        check_remote_code(prep.folders[-1], trust_remote_code)
        self.device = device or parallel.device() or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = choose_eval_dtype(eval_dtype, self.device, ckpts)
        hf_logging.set_verbosity_error()  # legacy Pythia buffers are "unexpected keys": expected here
        placement = _placement(device_map, max_memory) if device_map else {}
        self.model = AutoModelForCausalLM.from_pretrained(
            prep.folders[-1], dtype=dtype, trust_remote_code=trust_remote_code, **placement)
        if not device_map:
            self.model.to(self.device)
        _check_placement(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(prep.tokenizer_folder, trust_remote_code=trust_remote_code)
        context = getattr(self.model.config, "max_position_embeddings", 2048) or 2048
        self.block_size = min(block_size or 2048, context)
        self.batch_size, self.max_eval_tokens, self.cache_dir = batch_size, max_eval_tokens, cache_dir
        self.tokenizer_folder, self.token = prep.tokenizer_folder, prep.token  # data loads with the models' token
        self.shard, self.metric = parallel.world(), metric
        if metric is None:
            self.blocks = self.blocks_for(dataset)
            self._blocks = {None: self.blocks}
            self.eval_tokens, self.eval_questions = int(self.blocks.numel()), 0
        else:
            self._blocks = {}
            self.pairs = choice_set(dataset, self.tokenizer, self.tokenizer_folder, context, max_eval_tokens, cache_dir,
                                    prep.token)
            self.eval_tokens, self.eval_questions = int(self.pairs["lengths"].sum()), len(self.pairs["answers"])
        merger = StreamedMerger if prep.mode == "streamed" else ResidentMerger
        self.merger = merger(self.model, ckpts, DTYPES[store_dtype] if store_dtype else None)

    def blocks_for(self, spec: HeldOutSpec) -> torch.Tensor:
        return heldout_blocks(spec, self.tokenizer, self.tokenizer_folder, self.block_size, self.max_eval_tokens,
                              self.cache_dir, self.token)

    def __call__(self, weights: Sequence[float], data: HeldOutSpec | None = None) -> float:
        """The objective of the merge `weights`; with `data`, the mean token NLL on that text set instead."""
        self.merger.apply(weights)
        if self.metric is not None and data is None:
            predictions = predict(self.model, self.pairs, self.batch_size * self.block_size)
            return self.metric(predictions, self.pairs["answers"].tolist())
        if data not in self._blocks:
            self._blocks[data] = self.blocks_for(data)
        total, count = parallel.reduce_sums(*nll_sums(self.model, self._blocks[data], self.batch_size, *self.shard))
        return total / count


def _placement(device_map: str | dict, max_memory: str | int | None) -> dict:
    """`from_pretrained` arguments that spread the model over the visible devices with Accelerate."""
    if parallel.world()[1] > 1:
        raise BOMergeError("--device-map spreads one model over several devices; under `accelerate launch` each "
                           "process holds its own copy (data parallel). Use one or the other.")
    placement: dict = {"device_map": device_map}
    if max_memory:
        budget = parse_size(max_memory)
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        placement["max_memory"] = {(int(d[5:]) if d.startswith("cuda:") else d): budget for d in devices}
    return placement


def _check_placement(model: torch.nn.Module) -> None:
    """The merger writes each trial's weights into the parameters: none may be offloaded (on `meta`)."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise BOMergeError(f"{len(offloaded)} parameters (e.g. {offloaded[0]}) did not fit on the devices and "
                           "were offloaded; the search keeps every weight resident. Raise --max-memory, use more "
                           "devices, or fewer checkpoints (--max-checkpoints).")
