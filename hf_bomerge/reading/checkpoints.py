"""A lazy, validated view over the N checkpoints of one training run.

Tensors are read one at a time, without copying: safetensors through a private memory map at the offsets of their
JSON header, `.bin` through `torch.load(weights_only=True, mmap=True)`, which never unpickles anything but
tensors. Either way the pages of a used tensor are handed back (`release`), so the resident set stays small. Names, shapes
and dtypes are checked across all checkpoints once, up front, from the headers alone where the format
allows it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import mmap
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ChangedFileError, CheckpointError
from .dcp import POINTER, DcpCheckpoint
from .formats import (  # noqa: F401 - re-exported
    ST_DTYPES,
    TensorInfo,
    describe_change,
    file_stamp,
    first_change,
    load_bin,
    map_file,
    read_safetensors_header,
)
from .layout import WEIGHT_LAYOUTS, find_weight_files, weight_layout  # noqa: F401 - re-exported

_log = logging.getLogger(__name__)

# Buffers that Pythia-era GPT-NeoX files carry and current models do not treat as parameters. They are
# copied from the reference checkpoint: averaging `masked_bias` (-1e9, i.e. -inf in fp16) gives NaN.
LEGACY_BUFFER_SUFFIXES = ("masked_bias", "inv_freq", "position_ids", "attention.bias", "attn.bias")


class Checkpoint:
    """One checkpoint's tensors, read lazily by name.

    Both formats are memory-mapped (safetensors at the offsets of its header, `.bin` through `torch.load`);
    `get` returns a view of the mapping, not a copy, and the pages are handed back once a tensor is used
    (`release`), so reading a whole checkpoint never holds more than a few tensors in memory. The mapping is
    private (copy-on-write): writing into a returned tensor never reaches the file.

    >>> ckpt = Checkpoint("run/step1000")           # doctest: +SKIP
    >>> ckpt.infos["embed_out.weight"].shape        # doctest: +SKIP
    (50304, 2048)
    """

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or self.folder.name
        self.files = find_weight_files(self.folder, self.label)
        self.stamps = {str(p): file_stamp(p) for p in self.files}  # what each file was when it was opened
        self.skipped: list[str] = []  # non-tensor entries of its .bin files (a `step` counter, a nested dict)
        self.infos: dict[str, TensorInfo] = {}
        self._where: dict[str, tuple[int, int]] = {}  # name -> (file index, byte offset; -1 for .bin)
        self._handles: dict[int, object] = {}
        for index, path in enumerate(self.files):
            for info, offset in self._read_header(index, path):
                self.infos[info.name] = info
                self._where[info.name] = (index, offset)

    def _read_header(self, index: int, path: Path) -> list[tuple[TensorInfo, int]]:
        if path.suffix == ".safetensors":
            return read_safetensors_header(path)
        state, _ = self._open(index)
        return [(TensorInfo(n, tuple(t.shape), t.dtype), -1) for n, t in state.items()]

    def _open(self, index: int):
        if index not in self._handles:
            path = self.files[index]
            if path.suffix == ".safetensors":
                self._handles[index] = map_file(path)
            else:
                tensors, mapped, skipped = load_bin(path)
                self._handles[index] = tensors, mapped
                self.skipped += skipped
        return self._handles[index]

    def changed(self) -> str | None:
        """How a weight file differs from when it was opened (rewritten, truncated, replaced), or None."""
        return first_change(self.stamps)

    def file_index(self, name: str) -> int:
        """Which of `files` holds the tensor `name`."""
        return self._where[name][0]

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name`, in its stored dtype, on CPU (a view of the file's private mapping)."""
        index, offset = self._where[name]
        handle = self._open(index)
        if offset < 0:
            return handle[0][name]
        info = self.infos[name]
        if not info.nbytes:
            return torch.empty(info.shape, dtype=info.dtype)
        if offset % info.dtype.itemsize:  # a writer that did not align the data: copy it out, aligned
            raw = torch.frombuffer(handle, dtype=torch.uint8, count=info.nbytes, offset=offset)
            return raw.clone().view(info.dtype).view(info.shape)
        return torch.frombuffer(handle, dtype=info.dtype, count=info.numel, offset=offset).view(info.shape)

    def release(self, name: str) -> None:
        """Hand back the memory-mapped pages of a tensor that has been used (a no-op for a non-mapped `.bin`)."""
        index, offset = self._where[name]
        if offset < 0:
            if self._handles[index][1]:
                _drop_pages(self._handles[index][0][name])
        elif self.infos[name].nbytes and index in self._handles:
            _drop_pages(torch.frombuffer(self._handles[index], dtype=torch.uint8, count=self.infos[name].nbytes,
                                         offset=offset))

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading tensor `name` from disk now (MADV_WILLNEED on a safetensors mapping),
        so a cold file is read while the previous tensor is summed. A no-op for `.bin` and empty tensors."""
        index, offset = self._where[name]
        info = self.infos[name]
        if offset < 0 or not info.nbytes or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = offset // _PAGE * _PAGE
        self._open(index).madvise(mmap.MADV_WILLNEED, start, offset + info.nbytes - start)

    def aliases(self) -> dict[str, str]:
        """Names whose tensor shares storage with an earlier name (tied weights in .bin files)."""
        seen: dict[tuple, str] = {}
        out: dict[str, str] = {}
        for index, path in enumerate(self.files):
            if path.suffix == ".safetensors":
                continue  # safetensors cannot store shared tensors
            for name, t in self._open(index)[0].items():
                if t.numel() == 0:
                    continue
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
                if key in seen:
                    out[name] = seen[key]
                else:
                    seen[key] = name
        return out


_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True) if sys.platform == "linux" else None


def _drop_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages under a tensor of a read-only (MAP_PRIVATE, never written)
    file mapping: they leave this process's resident set and are read again from the page cache if needed."""
    if _libc is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    first = -(-start // _PAGE) * _PAGE  # only pages wholly inside the tensor
    last = (start + tensor.numel() * tensor.element_size()) // _PAGE * _PAGE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4 = MADV_DONTNEED


# Architectures whose checkpoints hold only parameters and the buffers LEGACY_BUFFER_SUFFIXES names, so the
# name rule (`is_merged`) is exactly the rule of the loaded model's parameters (`engine.model_rule`) and a fixed
# merge need not import transformers to build the model class (6-9 s of CPU on a 2-core box).
# tests/test_rules.py checks every entry against the model transformers builds.
SUFFIX_RULE_ARCHITECTURES = frozenset({
    "GPTNeoXForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM",
})


def suffix_rule_suffices(folder: str | Path) -> bool:
    """Whether `folder`'s config names only architectures of `SUFFIX_RULE_ARCHITECTURES` (and no remote code)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    archs = config.get("architectures") or []
    return bool(archs) and "auto_map" not in config and set(archs) <= SUFFIX_RULE_ARCHITECTURES


def is_merged(info: TensorInfo) -> bool:
    """The rule when no model is at hand: a floating-point tensor that is not a legacy buffer is weighted.
    `CheckpointSet.follow_model` replaces it with the loaded model's own parameters."""
    return info.dtype.is_floating_point and not info.name.endswith(LEGACY_BUFFER_SUFFIXES)


def open_checkpoint(folder: str | Path, label: str | None = None) -> Checkpoint | DcpCheckpoint:
    """A transformers checkpoint folder, or the view a distributed-checkpoint source wrote (`dcp.POINTER`)."""
    folder = Path(folder)
    is_view = (folder / POINTER).is_file() and weight_layout({p.name for p in folder.iterdir()}) is None
    return DcpCheckpoint(folder, label) if is_view else Checkpoint(folder, label)


class CheckpointSet:
    """N checkpoints of one model, validated to share tensor names and shapes; the last is the reference.

    >>> ckpts = CheckpointSet(["run/step1000", "run/step2000"])   # doctest: +SKIP
    >>> [name for name in ckpts.merged_names][:1]                 # doctest: +SKIP
    ['gpt_neox.embed_in.weight']
    """

    def __init__(self, folders: Sequence[str | Path], labels: Sequence[str] | None = None,
                 copied: Sequence[str] | None = None):
        if not folders:
            raise CheckpointError("No checkpoints to merge.")
        labels = list(labels) if labels is not None else [Path(f).name for f in folders]
        self.checkpoints = [open_checkpoint(f, label) for f, label in zip(folders, labels)]
        self.reference = self.checkpoints[-1]
        self._validate()
        skipped = sorted({name for c in self.checkpoints for name in c.skipped})
        if skipped:
            _log.warning("The .bin files hold entries that are not tensors (%s); they are not weights and are left "
                         "out of the merge.", ", ".join(skipped[:8]) + (" and more" if len(skipped) > 8 else ""))
        self.aliases = self.reference.aliases()
        self.infos = self.reference.infos
        # The one rule of what is merged: floating-point tensors in `copied` are taken from the reference,
        # every other floating-point tensor is weighted (tied aliases once). Trials and export both read it.
        self.copied: frozenset[str] = frozenset(
            copied if copied is not None else (n for n, i in self.infos.items()
                                               if i.dtype.is_floating_point and not is_merged(i)))
        unknown = sorted(self.copied - set(self.infos))
        if unknown:
            raise CheckpointError(f"The recipe copies tensors the checkpoints do not have: {unknown[:3]}; it was "
                                  "written for other checkpoints.")

    def __len__(self) -> int:
        return len(self.checkpoints)

    def _validate(self) -> None:
        ref = self.reference
        for ckpt in self.checkpoints[:-1]:
            missing = sorted(set(ref.infos) - set(ckpt.infos))
            extra = sorted(set(ckpt.infos) - set(ref.infos))
            if missing or extra:
                what = f"lacks {missing[:3]}" if missing else f"has extra {extra[:3]}"
                raise CheckpointError(
                    f"Checkpoint {ckpt.label!r} {what} compared with {ref.label!r}"
                    f"{' (and more)' if len(missing) > 3 or len(extra) > 3 else ''}: the revisions are not "
                    "checkpoints of the same architecture. Choose revisions from one training run."
                )
            for name, info in ref.infos.items():
                other = ckpt.infos[name]
                if other.shape != info.shape:
                    raise CheckpointError(
                        f"Tensor {name!r} has shape {list(other.shape)} in {ckpt.label!r} but "
                        f"{list(info.shape)} in {ref.label!r}: these checkpoints cannot be averaged. "
                        "Choose revisions from one training run."
                    )
                if other.dtype.is_floating_point != info.dtype.is_floating_point:
                    raise CheckpointError(
                        f"Tensor {name!r} is {other.dtype} in {ckpt.label!r} but {info.dtype} in {ref.label!r}."
                    )

    def is_merged(self, name: str) -> bool:
        """Whether tensor `name` (or the tied weight it aliases) is weighted rather than copied."""
        name = self.aliases.get(name, name)
        return self.infos[name].dtype.is_floating_point and name not in self.copied

    @property
    def merged_names(self) -> list[str]:
        """Names that are weighted (aliases of tied weights excluded: they are merged once)."""
        return [n for n in self.infos if self.is_merged(n) and n not in self.aliases]

    def follow_model(self, stored: Sequence[str]) -> None:
        """Make the model's parameters the rule: `stored` are the checkpoint names of the loaded model's
        parameters; every other floating-point tensor (buffers, legacy keys) is copied from the reference."""
        weighted = {self.aliases.get(n, n) for n in stored}
        self.copied = frozenset(n for n, i in self.infos.items()
                                if i.dtype.is_floating_point and self.aliases.get(n, n) not in weighted)

    @property
    def stamps(self) -> dict[str, tuple]:
        """{weight file: (device, inode, size, mtime)} of every checkpoint as it was opened."""
        return {path: stamp for c in self.checkpoints for path, stamp in c.stamps.items()}

    def check_unchanged(self, since: dict[str, tuple] | None = None) -> None:
        """Raise `ChangedFileError` if a weight file was rewritten, truncated or replaced since it was opened
        (or since `since`, the `stamps` of an earlier run on the same folders): the numbers would no longer be
        those of the pinned checkpoints, and a truncated mapping would kill the process when read."""
        for ckpt in self.checkpoints:
            what = ckpt.changed()
            if what is None and since is not None:
                what = next((f"{p} {describe_change(since[p], s)}" for p, s in ckpt.stamps.items()
                             if p in since and tuple(since[p]) != s), None)
            if what:
                raise ChangedFileError(
                    f"Checkpoint {ckpt.label!r} changed while this run was using it: {what}. Its numbers would no "
                    "longer be the pinned checkpoint's, so nothing was reported or written. Leave the checkpoints "
                    "alone during a run (write new ones to new folders), then run again.")

    def tensors(self, name: str) -> list[torch.Tensor]:
        return [c.get(name) for c in self.checkpoints]

    def release(self, name: str) -> None:
        for c in self.checkpoints:
            c.release(name)



def tokenizer_vocabulary(folder: Path) -> bytes | None:
    """What makes token ids mean the same thing: the vocabulary, merges and added tokens (not metadata)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        data = json.loads((folder / "tokenizer.json").read_text())
        return json.dumps([data.get("model"), data.get("added_tokens")], sort_keys=True).encode()
    parts = [(folder / f).read_bytes() for f in ("vocab.json", "merges.txt", "tokenizer.model") if (folder / f).is_file()]
    return b"\0".join(parts) or None


def check_same_tokenizer(folders: Sequence[Path], labels: Sequence[str]) -> None:
    """Refuse revisions whose tokenizers map token ids differently (they are not one training run)."""
    seen = [(label, vocab) for label, f in zip(labels, folders) if (vocab := tokenizer_vocabulary(f)) is not None]
    for label, vocab in seen[:-1]:
        if vocab != seen[-1][1]:
            raise CheckpointError(
                f"Revisions {label!r} and {seen[-1][0]!r} have different tokenizer vocabularies, so the same "
                "weights mean different tokens: they are not checkpoints of one training run. Choose revisions "
                "from one run.")


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """A model whose config points at its own Python code runs only when the user asks for it."""
    config = Path(folder) / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map") if config.is_file() else None
    if auto_map and not trust_remote_code:
        raise CheckpointError(
            f"This model needs its own code ({', '.join(sorted(set(auto_map.values())))[:200]}) to load, and "
            "running a repository's code is off by default. Read that code, then pass --trust-remote-code "
            "(trust_remote_code=True in Python) if you trust it.")
