"""Plan before work: from the file listing and config.json alone (nothing downloaded yet), estimate what a
run downloads, holds in memory and writes, and refuse a plan that cannot fit, saying how to make it fit."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .defaults import max_eval_tokens_for
from .duplicates import Duplicates
from .errors import BOMergeError
from .estimate import estimate


def human(n: float) -> str:
    """Bytes as people read them: 1.23 GB, 45.6 MB."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


class PlanError(BOMergeError):
    """The run would not fit in memory or on disk."""


@dataclass
class Plan:
    """What a run of N checkpoints costs. Sizes in bytes.

    Two modes (`mode`): resident, when it fits (the N checkpoints stay in memory beside one model in the
    evaluation dtype, so a trial re-merges without any I/O), else streamed (only the model and one batch
    in memory; each trial re-reads the checkpoints tensor by tensor from the page cache or the disk). When the
    search evaluates in a less precise dtype than the merge is saved in, the reported numbers are scored again
    with the model loaded in the saved dtype: `rescore_mode` says how that fits. Spread over several devices
    (`device_memory`, --device-map), each device holds its share of the model, the same share of the
    checkpoints (each parameter's N sources sit on its device) and one batch's activations.
    """

    revisions: list[str]
    checkpoint_bytes: int  # one checkpoint's weight files
    params: int  # parameters, from the safetensors headers (a .bin's bytes at 2 per parameter)
    download_bytes: int  # weight files not in the cache yet
    model_bytes: int  # the model the trials evaluate, in the evaluation dtype
    activation_bytes: int  # one evaluation batch (logits dominate)
    device: str
    memory_available: int  # on `device`; over several devices, their sum
    disk_free: int
    evaluate: bool = True
    source: str = ""
    shas: list[str] | None = None
    note: str | None = None
    duplicates: dict | None = None  # `Duplicates.as_dict()`: revisions merged once, as they serve the same weights
    config: dict | None = field(default=None, repr=False)  # the latest revision's config.json
    estimate: object | None = None  # an `estimate.Estimate` of the trial time, when one was calibrated
    stored_bytes: int = 0  # the bytes `params` are stored in (their mean itemsize: stored_bytes / params)
    saved_itemsize: int = 0  # bytes per parameter of the dtype the merge is saved in (0: not known)
    device_memory: dict[str, int] | None = None  # per device, when the model is spread over several

    @property
    def devices(self) -> dict[str, int]:
        return self.device_memory or {self.device: self.memory_available}

    @property
    def resident_checkpoint_bytes(self) -> int:
        if len(self.revisions) == 2:  # θ₀ as stored + Δ = θ₁ − θ₀ in float32 (one axpy per trial)
            return self.checkpoint_bytes + 4 * self.params
        return len(self.revisions) * self.checkpoint_bytes

    @property
    def resident_bytes(self) -> int:
        if not self.evaluate:  # a fixed merge without evaluation streams tensor by tensor
            return 0
        return self.resident_checkpoint_bytes + self.model_bytes + self.activation_bytes

    @property
    def rescore_model_bytes(self) -> int:
        """The model in the saved dtype when that is more precise than the evaluation's (the reported numbers
        are scored again in it, after the search); 0 when nothing is re-scored."""
        saved = self.params * self.saved_itemsize
        return saved if self.evaluate and saved > self.model_bytes else 0

    @property
    def rescore_bytes(self) -> int:
        if not self.rescore_model_bytes:
            return 0
        checkpoints = self.resident_checkpoint_bytes if self.rescore_mode == "resident" else 0
        return checkpoints + self.rescore_model_bytes + self.activation_bytes

    @property
    def disk_bytes(self) -> int:
        return self.download_bytes + self.checkpoint_bytes  # downloads + the merged model

    @property
    def streamed_bytes(self) -> int:
        """Streamed mode: the model and activations on the device; the checkpoints are re-read per trial."""
        return self.model_bytes + self.activation_bytes if self.evaluate else 0

    def _room(self) -> int:
        """What the devices hold beside one batch's activations on each."""
        return sum(max(0, free - self.activation_bytes) for free in self.devices.values())

    def _mode(self, model_bytes: int) -> str:
        if model_bytes + self.resident_checkpoint_bytes <= self._room():
            return "resident"
        return "streamed" if model_bytes <= self._room() else "none"

    @property
    def mode(self) -> str:
        """`resident` (the N checkpoints beside the model: no I/O per trial) when it fits, else `streamed`
        (each trial re-reads them tensor by tensor: slower), else `none`."""
        return self._mode(self.model_bytes) if self.evaluate else "resident"

    @property
    def rescore_mode(self) -> str | None:
        """The mode of the re-score in the saved dtype (None: no re-score); streamed when only the model fits."""
        return self._mode(self.rescore_model_bytes) if self.rescore_model_bytes else None

    def model_memory(self, model_bytes: int, mode: str) -> dict[str, int]:
        """Per device, how much of the model (of `model_bytes`) Accelerate may place there (--device-map): the
        device's memory less one batch's activations and, resident, the room of that share's N checkpoints."""
        share = model_bytes / (model_bytes + (self.resident_checkpoint_bytes if mode == "resident" else 0))
        return {d: int(max(0, free - self.activation_bytes) * share) for d, free in self.devices.items()}

    def fitting_checkpoints(self) -> int:
        spare = self._room() - self.model_bytes
        return max(0, int(spare // max(self.checkpoint_bytes, 1)))

    @property
    def where(self) -> str:
        if len(self.devices) == 1:
            return next(iter(self.devices))
        return f"{len(self.devices)} devices ({', '.join(self.devices)}, each its share and one batch)"

    def check(self) -> None:
        """Raise `PlanError` (before anything is downloaded) when the plan cannot fit."""
        if self.mode == "none":
            raise PlanError(
                f"The evaluation needs at least {human(self.streamed_bytes)} on {self.where} (the model in the "
                f"evaluation dtype {human(self.model_bytes)}, activations {human(self.activation_bytes)}; "
                f"{human(self.resident_bytes)} to also keep the {len(self.revisions)} checkpoints of "
                f"{human(self.checkpoint_bytes)} resident) but {human(self.memory_available)} are available. To "
                "fit: a device with more memory (--device, --device-map auto over several GPUs, --max-memory), "
                "a smaller --batch-size or --block-size, or --eval-dtype bfloat16; or merge with fixed weights "
                "(--weights/--method with --no-eval), which streams and needs little memory.")
        if self.rescore_mode == "none":
            raise PlanError(
                f"The search fits, but the numbers it reports are scored again in the dtype the merge is saved in "
                f"({self.saved_itemsize} bytes per parameter, more precise than the evaluation's), and that model "
                f"({human(self.rescore_model_bytes)}) with activations ({human(self.activation_bytes)}) does not fit "
                f"in the {human(self.memory_available)} available on {self.where}. To fit: save the merge in the "
                "evaluation dtype (--dtype bfloat16 or float16: nothing is re-scored), a device with more memory "
                "(--device, --device-map auto over several GPUs, --max-memory), or a smaller --batch-size or "
                "--block-size.")
        if self.disk_bytes > self.disk_free:
            raise PlanError(
                f"The run downloads {human(self.download_bytes)} and writes {human(self.checkpoint_bytes)}, "
                f"but only {human(self.disk_free)} are free. Free some space, choose another --cache-dir "
                "or --output, or fewer revisions.")

    def describe(self) -> str:
        lines = [f"plan: {len(self.revisions)} revisions, {human(self.checkpoint_bytes)} each",
                 f"  download  {human(self.download_bytes)} (not cached yet)",
                 f"  disk      {human(self.disk_bytes)} needed, {human(self.disk_free)} free"]
        if self.evaluate and self.mode == "streamed":
            k = self.fitting_checkpoints()
            lines.append(f"  memory    {human(self.streamed_bytes)} on {self.where} (STREAMED mode: the "
                         f"{len(self.revisions)} checkpoints ({human(self.resident_bytes)} with the model) do not "
                         f"fit in {human(self.memory_available)}, so every trial re-reads them from disk or the "
                         "page cache: slower" + (f"; --max-checkpoints {k} would be resident)" if k >= 2 else ")"))
        elif self.evaluate:
            lines.append(f"  memory    {human(self.resident_bytes)} on {self.where} (resident mode: "
                         f"{len(self.revisions)} checkpoints + model + activations), "
                         f"{human(self.memory_available)} available")
        if self.rescore_mode in ("resident", "streamed"):
            lines.append(f"  re-score  {human(self.rescore_bytes)} after the search ({self.rescore_mode} mode: the "
                         f"model again in the saved dtype, {self.saved_itemsize} bytes per parameter, for the "
                         "reported numbers" + (", re-reading the checkpoints: slower)" if self.rescore_mode ==
                                              "streamed" else ")"))
        if self.estimate is not None:
            lines.append(self.estimate.describe())
        if self.duplicates:
            lines += [f"  duplicate {s}" for s in Duplicates.from_dict(self.duplicates).sentences()]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {**asdict(self), "resident_bytes": self.resident_bytes, "streamed_bytes": self.streamed_bytes,
               "disk_bytes": self.disk_bytes, "mode": self.mode, "rescore_bytes": self.rescore_bytes,
               "rescore_mode": self.rescore_mode}
        out.pop("config")
        return out

    def estimate_time(self, *, trials: int, max_eval_tokens: int | None, batch_size: int, block_size: int | None,
                      eval_dtype: str | None, confirm_fraction: float = 0.25) -> None:
        """Calibrate the time of a trial on this plan's device (`estimate.estimate`, a few seconds; nothing is
        downloaded) and keep it in `self.estimate` (shown by `describe`, in `as_dict` under "estimate")."""
        if not self.evaluate or not self.config or self.device == "cuda:*":
            return
        stored = max(1, round(self.stored_bytes / max(self.params, 1)))
        self.estimate = estimate(self.config, self.params, n_checkpoints=len(self.revisions), device=self.device,
                                 eval_dtype=eval_dtype, stored_itemsize=stored, batch_size=batch_size,
                                 block_size=block_size, trials=trials,
                                 max_eval_tokens=max_eval_tokens_for(self.device, max_eval_tokens),
                                 confirm_fraction=confirm_fraction)


def free_space(path: Path) -> int:
    """Free bytes on the file system that will hold `path`, which need not exist yet (a fresh HOME has no
    ~/.cache): measured at its nearest existing ancestor.

    >>> free_space(Path("/no/such/folder")) > 0
    True
    """
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def memory_available(device: str) -> int:
    """Free memory on `device` now (host RAM for cpu, free device memory for cuda)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def make_plan(sizes: Sequence[dict[str, int]], cached: Sequence[bool], config: dict, revisions: Sequence[str], *,
              device: str, eval_itemsize: int, batch_size: int, block_size: int | None, evaluate: bool,
              paths: Sequence[Path], max_memory: int | None = None, params: int, stored_bytes: int,
              saved_itemsize: int | None = None, devices: Sequence[str] | None = None) -> Plan:
    """`sizes`: per revision, {weight file: bytes}; `cached`: per revision, whether it is local already;
    `params` and `stored_bytes`: the latest revision's parameters as its headers declare them, and their bytes;
    `saved_itemsize`: of the dtype the merge is saved in (default: as stored); `devices`: those the model is
    spread over (`max_memory` then caps each one)."""
    per_checkpoint = max((sum(s.values()) for s in sizes), default=0)
    context = config.get("max_position_embeddings") or 2048
    tokens = batch_size * min(block_size or 2048, context)
    activations = 2 * tokens * int(config.get("vocab_size") or 50_000) * 4
    free_disk = min(free_space(p) for p in paths)
    budgets = {d: max_memory or memory_available(d) for d in (devices or [device])}
    return Plan(list(revisions), per_checkpoint, params, sum(sum(s.values()) for s, c in zip(sizes, cached) if not c),
                params * eval_itemsize, activations, device, sum(budgets.values()), free_disk, evaluate,
                config=config, stored_bytes=stored_bytes,
                saved_itemsize=saved_itemsize or max(1, round(stored_bytes / max(params, 1))),
                device_memory=budgets if devices else None)
