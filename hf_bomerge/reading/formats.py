"""The two weight-file formats, read as untrusted input: a safetensors header validated by the safetensors
library's own rules before any offset in it is used, and a `.bin` unpickled with `weights_only=True` (nothing but
tensors and plain containers), its non-tensor entries set aside.

The safetensors rules (the library's `validate`): the header length at most 100 MB and inside the file, a JSON
object, a dtype the format defines, non-negative dims, `data_offsets` contiguous from 0 with no hole or overlap,
`end - begin = numel x itemsize`, and the last end equal to the data's length. A file that breaks one is a
`CorruptFileError` naming the file and the rule, never a traceback and never a tensor reading its neighbour's bytes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, CorruptFileError


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# Every safetensors dtype torch has a dtype for. The format also defines sub-byte and exotic float types (F4,
# F6_*, F8_E8M0, the FNUZ variants) that torch cannot view as tensors: those are refused by name (`st_dtype`).
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}


def _library_check(path: Path) -> None:
    """The safetensors library's own validation of the header against the file (it maps the file, reads no data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise CorruptFileError(f"{path} is not a valid safetensors file: {reason}. The file is truncated, "
                               "corrupt or crafted; delete it (a Hub download is fetched again) and do not merge "
                               "it as it is.") from err


def read_safetensors_header(path: Path) -> list[tuple[TensorInfo, int]]:
    """(tensor info, absolute byte offset of its data) for every tensor of the safetensors file `path`, after
    the library's validation; a dtype torch cannot hold is a `CheckpointError` naming it."""
    path = Path(path)
    try:
        _library_check(path)
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except OSError as err:
        raise CorruptFileError(f"Cannot read {path}: {err}. Check that the file exists and is readable.") from err
    header.pop("__metadata__", None)
    out = []
    for name, entry in header.items():
        dtype = ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} is stored as {entry['dtype']}, which torch has no dtype "
                                  f"for; hf-bomerge reads {', '.join(ST_DTYPES)}.")
        out.append((TensorInfo(name, tuple(entry["shape"]), dtype), 8 + size + entry["data_offsets"][0]))
    return out


def is_complete_safetensors(path: Path) -> bool:
    """Whether `path` is a whole, valid safetensors file (a file still being written is not)."""
    try:
        _library_check(Path(path))
        return True
    except CorruptFileError:
        return False


def load_bin(path: Path) -> tuple[dict[str, torch.Tensor], bool, list[str]]:
    """The tensors of a `.bin` file (never unpickling anything but tensors and plain containers), whether they
    are memory-mapped, and the names of its top-level entries that are not tensors (a `step` counter, a nested
    dict), which are not weights and are left out."""
    try:
        state, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as err:
        if "zip" not in str(err).lower() and "mmap" not in str(err).lower():
            raise CorruptFileError(f"Cannot read {path}: {err}. The file may be truncated or corrupt; "
                                   "delete it and download it again.") from err
        state, mapped = _load_legacy(path), False
    except Exception as err:  # UnpicklingError for non-tensor content, EOFError for truncation
        raise CheckpointError(f"Cannot read {path} as tensors only (weights_only=True): {err}. "
                              "hf-bomerge never unpickles arbitrary objects; convert the file to "
                              "safetensors or check that it is not truncated.") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict (a mapping of names to "
                              "tensors): it is not a transformers checkpoint.")
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    skipped = [str(k) for k in state if k not in tensors]
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors at its top level (it has {', '.join(skipped[:5])}): a "
                              "training checkpoint that nests its state dict. Save the model's state dict itself "
                              "(`model.state_dict()`), or point hf-bomerge at a transformers checkpoint.")
    return tensors, mapped, skipped


def _load_legacy(path: Path):
    """The legacy (pre-1.6, non-zip) format: no mmap, still weights_only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CorruptFileError(f"Cannot read {path} as tensors only: {err}. The file is truncated or corrupt, "
                               "or holds more than tensors; delete it and download it again.") from err


def map_file(path: Path) -> mmap.mmap:
    """A private (copy-on-write) read mapping of a whole file: tensors viewed from it are writable in torch's
    eyes, but a write only ever changes this process's copy of a page, never the file."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def file_stamp(path: Path) -> tuple:
    """What identifies a file's contents cheaply: (device, inode, size, mtime in ns); None fields if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return (None, None, None, None)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def first_change(stamps: dict[str, tuple]) -> str | None:
    """How the first file of `stamps` ({path: `file_stamp`}) differs from when it was stamped, or None."""
    for path, stamp in stamps.items():
        now = file_stamp(Path(path))
        if now != stamp:
            return f"{path} {describe_change(stamp, now)}"
    return None


def describe_change(before, after) -> str:
    before, after = tuple(before), tuple(after)
    if after[2] is None:
        return "was removed"
    if after[:2] != before[:2]:
        return "was replaced by another file"
    if after[2] < before[2]:
        return f"was truncated from {before[2]} to {after[2]} bytes"
    return "was rewritten in place"
