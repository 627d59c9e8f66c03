"""The objective of a weight vector: a loaded model, the N checkpoints beside it (or streamed), and the data.

`Evaluator` merges a weight vector into the model and asks the objective (`hf_bomerge.objectives`: the held-out
loss, an `evaluate` metric, or any registered `Objective`) to score the model as it stands.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from ..defaults import max_eval_tokens_for
from ..errors import BOMergeError
from ..merging.engine import DTYPES, dtype_name
from ..merging.mergers import ResidentMerger, StreamedMerger
from ..prepare import Prepared, has_bf16
from ..reading.checkpoints import CheckpointSet, check_remote_code, weight_layout
from ..specs import EvalSpec, SourceSpec
from . import Objective, objective_class, parallel
from .heldout import HeldOutSpec, heldout_documents, pack, tokenizer_fingerprint
from .loss import HeldOutLoss

logger = logging.getLogger("hf_bomerge")


CONFIRM = "confirm"  # `Evaluator(weights, CONFIRM)`: the per-unit outcomes of the confirm part


def choose_eval_dtype(name: str | None, device: str, ckpts: CheckpointSet) -> torch.dtype:
    if name:
        return DTYPES[name]
    if not device.startswith("cuda"):
        return torch.float32  # half-precision matmul on CPUs is ~100x slower
    ref = ckpts.reference.infos[ckpts.merged_names[0]].dtype
    if ref == torch.float16 or has_bf16():
        return ref if ref in (torch.float16, torch.bfloat16) else torch.bfloat16
    logger.warning("This GPU does not compute in bfloat16 (it emulates it, slowly): the search evaluates in float32. "
                   "--eval-dtype float16 is faster, for a model whose activations stay within float16's range.")
    return torch.float32  # a model trained in bfloat16 (or float32) may overflow float16


def saved_dtype(ckpts: CheckpointSet, store_dtype: torch.dtype | None) -> torch.dtype:
    """The most precise dtype the merge is saved in (mixed-dtype checkpoints keep each tensor's own)."""
    if store_dtype is not None:
        return store_dtype
    dtypes = {ckpts.infos[n].dtype for n in ckpts.merged_names}
    return max(dtypes, key=lambda d: (d.itemsize, d == torch.bfloat16))


def precise_enough(eval_dtype: torch.dtype, saved: torch.dtype) -> bool:
    """Whether numbers computed in `eval_dtype` are the saved model's (no precision lost on the way)."""
    return eval_dtype == saved or eval_dtype.itemsize > saved.itemsize


class Evaluator:
    """A resident model, the N checkpoints beside it, and the held-out data: weights in, objective out.

    >>> evaluator = Evaluator(prep, dataset=HeldOutSpec(), max_eval_tokens=16384)   # doctest: +SKIP
    >>> evaluator([0.3, 0.7])                                                     # doctest: +SKIP
    """

    def __init__(self, prep: Prepared, *, dataset: HeldOutSpec, max_eval_tokens: int | None,
                 block_size: int | None = None,
                 batch_size: int = 4, eval_dtype: str | None = None, device: str | None = None,
                 trust_remote_code: bool = False, cache_dir: Path, store_dtype: str | None = None,
                 device_map: str | dict | None = None, objective: str = "loss", confirm_fraction: float = 0.0,
                 spec: EvalSpec | None = None):
        from transformers import AutoTokenizer

        check_remote_code(prep.folders[-1], trust_remote_code)
        self.prep, self.trust_remote_code, self.spec = prep, trust_remote_code, spec  # spec: the objective's options
        self.device = device or parallel.device() or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_map and parallel.world()[1] > 1:
            raise BOMergeError("--device-map spreads one model over several devices; under `accelerate launch` "
                               "each process holds its own copy (data parallel). Use one or the other.")
        self.device_map = device_map
        self.store = DTYPES[store_dtype] if store_dtype else None
        self._load(choose_eval_dtype(eval_dtype, self.device, prep.ckpts), prep.mode)
        self.tokenizer = AutoTokenizer.from_pretrained(prep.tokenizer_folder, trust_remote_code=trust_remote_code)
        self.context = getattr(self.model.config, "max_position_embeddings", 2048) or 2048
        self.block_size = min(block_size or 2048, self.context)
        max_eval_tokens = max_eval_tokens_for(self.device, max_eval_tokens)  # the device's default when None
        self.batch_size, self.max_eval_tokens, self.cache_dir = batch_size, max_eval_tokens, cache_dir
        self.tokenizer_folder, self.token = prep.tokenizer_folder, prep.token  # data loads with the models' token
        self.objective: Objective = objective_class(objective).build(self, dataset, objective, confirm_fraction)
        self.eval_tokens, self.eval_questions = self.objective.tokens, self.objective.questions
        self.saved_dtype = saved_dtype(prep.ckpts, self.store)
        self.identity = {"eval_dtype": dtype_name(self.eval_dtype), "device": torch.device(self.device).type,
                         "text_column": dataset.text_column, "block_size": self.block_size,
                         "max_eval_tokens": max_eval_tokens, "tokenizer": tokenizer_fingerprint(prep.tokenizer_folder),
                         "data": self.objective.identity}
        self._texts: dict[HeldOutSpec, HeldOutLoss] = {}

    @classmethod
    def from_spec(cls, spec: EvalSpec, prep: Prepared, cache_dir: Path, source: SourceSpec) -> Evaluator:
        """The evaluator an `EvalSpec` describes, on the downloaded checkpoints `prep` of `source`."""
        return cls(prep, dataset=spec.data, max_eval_tokens=spec.max_eval_tokens, block_size=spec.block_size,
                   batch_size=spec.batch_size, eval_dtype=spec.eval_dtype, device=spec.device,
                   trust_remote_code=source.trust_remote_code, cache_dir=cache_dir, store_dtype=source.dtype,
                   device_map=spec.device_map, objective=spec.objective, confirm_fraction=spec.confirm_fraction,
                   spec=spec)

    def inputs(self) -> dict:
        """Everything about the evaluation that changes the objective's value (the exact tokens read included)."""
        spec = self.spec
        return {"dataset": spec.data.label, "objective": objective_class(spec.objective).key(spec.objective),
                **self.identity}

    def described(self) -> dict:
        """What the result, its card and `--json` say about the data and numerics (`MergeResult` fields)."""
        data = self.spec.data
        is_hub = not (self.objective.dataset or Path(data.dataset).expanduser().exists())
        return {"dataset": self.objective.dataset or data.label, "dataset_id": data.dataset if is_hub else None,
                "dataset_config": data.config if is_hub else None, "dataset_split": data.split if is_hub else None,
                "eval_tokens": self.eval_tokens, "eval_questions": self.eval_questions,
                "eval_dtype": str(self.eval_dtype).removeprefix("torch."), "objective": self.objective.name}

    def _load(self, dtype: torch.dtype, mode: str) -> None:
        """The latest revision's model in `dtype`, and the merger (of the plan's `mode`) that writes each trial
        into it."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # legacy Pythia buffers are "unexpected keys": expected here
        placement = self._placement(dtype, mode) if self.device_map else {}
        if has_weights(self.prep.folders[-1]):
            self.model = AutoModelForCausalLM.from_pretrained(
                self.prep.folders[-1], dtype=dtype, trust_remote_code=self.trust_remote_code, **placement)
        else:
            self.model = model_from_config(self.prep.folders[-1], self.prep.ckpts, dtype, self.trust_remote_code,
                                           placement)
        if not placement:
            self.model.to(self.device)
        _check_placement(self.model)
        self.model.eval()
        self.eval_dtype = dtype
        merger = StreamedMerger if mode == "streamed" else ResidentMerger
        self.merger = merger(self.model, self.prep.ckpts, self.store)  # also makes the model's parameters the rule

    def documents_for(self, spec: HeldOutSpec) -> list[list[int]]:
        return heldout_documents(spec, self.tokenizer, self.tokenizer_folder, self.block_size, self.max_eval_tokens,
                                 self.cache_dir, self.token)

    def blocks_for(self, spec: HeldOutSpec) -> torch.Tensor:
        """Every document of `spec` packed into full blocks (what `--eval-dataset` and a fixed merge score)."""
        return pack(self.documents_for(spec), self.block_size)

    @property
    def confirm_size(self) -> int:
        return self.objective.confirm_size

    def __call__(self, weights: Sequence[float], data: HeldOutSpec | str | None = None, saved_dtype: bool = False):
        """The objective of the merge `weights`; with `data`, the mean token NLL on that text set instead;
        with `saved_dtype`, computed in the dtype the merge is saved in (see `needs_rescore`)."""
        if saved_dtype and self.needs_rescore:
            self.rescore_in_saved_dtype()
        self.prep.ckpts.check_unchanged()  # a few stats: a file changed under the run is an error, not a number
        self.merger.apply(weights)
        if data == CONFIRM:
            return self.objective.confirm_scores(self.model)
        if data is None:
            return self.objective(self.model)
        if data not in self._texts:
            self._texts[data] = HeldOutLoss(self.blocks_for(data), self.batch_size)  # generalization: always the loss
        return self._texts[data](self.model)

    @property
    def needs_rescore(self) -> bool:
        """Whether the search's numbers were computed in a less precise dtype than the merge is saved in."""
        return not precise_enough(self.eval_dtype, self.saved_dtype)

    def rescore_in_saved_dtype(self) -> None:
        """Evaluate from now on in the dtype the merge is saved in: the model is loaded again in that dtype
        (its buffers too, as a fresh process loads them), not upcast from the cheaper one."""
        del self.model, self.merger
        gc.collect()  # the plan counts the first model and its checkpoints as gone before the second loads
        self._load(self.saved_dtype, self.prep.rescore_mode)

    def _placement(self, dtype: torch.dtype, mode: str) -> dict:
        """`from_pretrained` arguments that spread the model over the plan's devices with Accelerate, each device
        keeping room for its share of the N checkpoints (the merger puts them beside each parameter) and one
        batch's activations."""
        plan = self.prep.plan
        if plan is None:
            return {"device_map": self.device_map}
        share = plan.model_memory(plan.params * dtype.itemsize, mode)
        return {"device_map": self.device_map,
                "max_memory": {(int(d[5:]) if d.startswith("cuda:") else d): b for d, b in share.items()}}


def has_weights(folder: Path) -> bool:
    """Whether `folder` holds transformers weights (a distributed checkpoint's view holds only its config)."""
    return weight_layout({p.name for p in Path(folder).iterdir()}) is not None


def model_from_config(folder: Path, ckpts: CheckpointSet, dtype: torch.dtype, trust_remote_code: bool,
                      placement: dict) -> torch.nn.Module:
    """The model `folder`'s config builds, its state read tensor by tensor from the latest checkpoint (a
    distributed checkpoint has no transformers weights to `from_pretrained`). Non-persistent buffers (rotary
    `inv_freq`) are the config's, as `from_pretrained` makes them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if placement:
        raise BOMergeError("--device-map is not supported for distributed checkpoints yet; evaluate on one device.")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    state = model.state_dict()
    with torch.no_grad():
        for name in ckpts.infos:
            if name in state:
                state[name].copy_(ckpts.reference.get(name))
                ckpts.reference.release(name)
    return model


def _check_placement(model: torch.nn.Module) -> None:
    """The merger writes each trial's weights into the parameters: none may be offloaded (on `meta`)."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise BOMergeError(f"{len(offloaded)} parameters (e.g. {offloaded[0]}) did not fit on the devices and "
                           "were offloaded; the search keeps every weight resident. Raise --max-memory, use more "
                           "devices, or fewer checkpoints (--max-checkpoints).")
