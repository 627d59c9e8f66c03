"""Distributed checkpoints (`torch.distributed.checkpoint`, DCP) read as untrusted input, tensor by tensor.

A DCP folder holds `.metadata` (written last) and storage files (`__RANK_K.distcp`). `.metadata` is a pickle, and
torch's `FileSystemReader.read_metadata` unpickles it with the plain `pickle.load`: a crafted file would run any
code. Here it is read by `_MetadataUnpickler`, whose `find_class` allows only the DCP metadata classes and the
few torch and standard-library names they pickle as (`torch.Size`, dtypes, `_get_layout`, a `PosixPath`); every
other global is refused before it is looked up. Then every name, offset and size it gives is checked before a
byte is read: storage files are plain file names inside the folder, each chunk's bytes lie inside its file, the
chunks tile their tensor exactly, dtypes are known. Each chunk is a `torch.save` archive, read with
`weights_only=True` and checked to hold a tensor of the chunk's declared shape and dtype.

Only the tensors a key map selects are ever read (an optimizer's state, a dataloader's, anything else in the
files is not touched), and one tensor at a time, chunk by chunk: no consolidated copy is written anywhere.

>>> sorted(read_metadata("run/step-100"))[:1]        # doctest: +SKIP
['layers.0.attention.wq.weight']
"""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, CorruptFileError, UnsafeFileError
from .formats import ST_DTYPES, TensorInfo, file_stamp, first_change
from .keymap import rope_to_hf
from .layout import unsafe_reason

METADATA = ".metadata"
POINTER = ".bomerge-dcp.json"  # a DCP source's view of one revision: its DCP folder and key map (`DcpCheckpoint`)
MAX_METADATA_BYTES = 1 << 31
_DCP = "torch.distributed.checkpoint"
_ALLOWED = {
    *((f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                        "TensorProperties", "BytesStorageMetadata", "StorageMeta",
                                        "MetadataIndex", "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
    ("collections", "OrderedDict"),
}
_KNOWN_DTYPES = frozenset(ST_DTYPES.values())


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what DCP metadata is made of; anything else (os.system, builtins.eval, ...) is refused."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeFileError(f"{self.path} asks to load {module}.{name}, which is not part of a distributed "
                              "checkpoint's metadata; unpickling it could run code. hf-bomerge refused the file: "
                              "do not merge this checkpoint.")


def is_dcp_folder(folder: Path) -> bool:
    """Whether `folder` holds a DCP checkpoint, complete (`.metadata`) or still being written (`.distcp` files)."""
    try:
        return (folder / METADATA).is_file() or any(p.suffix == ".distcp" for p in folder.iterdir())
    except OSError:
        return False


def read_metadata(folder: str | Path):
    """The `state_dict_metadata` ({key: TensorStorageMetadata | BytesStorageMetadata}) and `storage_data` of the
    DCP folder, unpickled safely and checked to be of the metadata's types."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(folder) / METADATA
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise CorruptFileError(f"{path} is {size} bytes, more than DCP metadata can be; it is not a checkpoint.")
        meta = _MetadataUnpickler(path.read_bytes(), path).load()
    except OSError as err:
        raise CorruptFileError(f"Cannot read {path}: {err}. Check that the checkpoint is complete.") from err
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as err:
        raise CorruptFileError(f"{path} is not valid DCP metadata ({type(err).__name__}: {err}): the checkpoint "
                               "is truncated, still being written, or crafted.") from err
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict) or not isinstance(
            meta.storage_data, dict):
        raise CorruptFileError(f"{path} holds a {type(meta).__name__}, not DCP metadata with its storage table.")
    return meta.state_dict_metadata, meta.storage_data


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a tensor: where its bytes are and which box of the tensor they fill."""

    file: str
    offset: int
    length: int
    start: tuple[int, ...]
    sizes: tuple[int, ...]


def _ints(value, where: str, path: Path) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptFileError(f"{path}: {where} is not a list of non-negative integers ({value!r}).")
    return tuple(value)


def tensor_chunks(folder: Path, key: str, entry, storage: dict) -> tuple[TensorInfo, list[Chunk]]:
    """The validated shape, dtype and chunks of the tensor `key` (its metadata `entry`): every file a plain file in
    `folder`, every byte range inside it, the chunks tiling the tensor exactly."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

    path = folder / METADATA
    if not isinstance(entry, TensorStorageMetadata):
        raise CheckpointError(f"{path}: {key!r} is not a tensor ({type(entry).__name__}); the key map selects only "
                              "model parameters.")
    shape = _ints(entry.size, f"the size of {key!r}", path)
    dtype = getattr(entry.properties, "dtype", None)
    if dtype not in _KNOWN_DTYPES:
        raise CorruptFileError(f"{path}: tensor {key!r} has dtype {dtype!r}, which hf-bomerge does not read.")
    by_offset = {tuple(k.offset): v for k, v in storage.items()
                 if isinstance(k, MetadataIndex) and k.fqn == key and isinstance(k.offset, tuple)}
    chunks, sizes = [], {}
    for c in entry.chunks if isinstance(entry.chunks, list) else ():
        if not isinstance(c, ChunkStorageMetadata):
            raise CorruptFileError(f"{path}: a chunk of {key!r} is a {type(c).__name__}, not chunk metadata.")
        start = _ints(c.offsets, f"a chunk offset of {key!r}", path)
        box = _ints(c.sizes, f"a chunk size of {key!r}", path)
        if len(start) != len(shape) or len(box) != len(shape) or any(s + b > n for s, b, n in zip(start, box, shape)):
            raise CorruptFileError(f"{path}: a chunk of {key!r} (offsets {list(start)}, sizes {list(box)}) lies "
                                   f"outside the tensor's shape {list(shape)}: the metadata is corrupt or crafted.")
        info = by_offset.get(start)
        if not isinstance(info, _StorageInfo):
            raise CorruptFileError(f"{path}: the chunk of {key!r} at {list(start)} has no storage entry.")
        file, offset, length = info.relative_path, info.offset, info.length
        why = unsafe_reason(file)
        if why:
            raise UnsafeFileError(f"{path} names the storage file {file!r} for {key!r}, which is not a file inside "
                                  f"the checkpoint folder ({why}); this metadata is crafted: do not merge it.")
        if file not in sizes:
            target = folder / file
            if not target.is_file():
                raise CorruptFileError(f"{path} names the storage file {file}, which {folder} lacks or is not a "
                                       "plain file: the checkpoint is incomplete.")
            sizes[file] = target.stat().st_size
        if type(offset) is not int or type(length) is not int or offset < 0 or length < 0 or (
                offset + length > sizes[file]):
            raise CorruptFileError(f"{path}: the chunk of {key!r} at {list(start)} is bytes {offset}..{offset}+"
                                   f"{length} of {file}, which has {sizes[file]}: past its end (a truncated or "
                                   "crafted checkpoint).")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: {key!r} is stored with transforms {info.transform_descriptors} "
                                  "(compression, encryption), which hf-bomerge does not read.")
        chunks.append(Chunk(file, offset, length, start, box))
    tensor = TensorInfo(key, shape, dtype)
    _check_tiling(tensor, chunks, path)
    return tensor, chunks


def _check_tiling(tensor: TensorInfo, chunks: list[Chunk], path: Path) -> None:
    """The chunks cover the tensor exactly once: their volumes add up and no two boxes overlap (a sweep along the
    first dimension: a `Shard(0)` layout compares each chunk with its neighbour only)."""
    volume = sum(_numel(c.sizes) for c in chunks)
    ordered = sorted((c for c in chunks if _numel(c.sizes)), key=lambda c: c.start)
    overlap = False
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            if a.start and b.start[0] >= a.start[0] + a.sizes[0]:
                break
            overlap = overlap or all(bs < s + n and s < bs + bn
                                     for s, n, bs, bn in zip(a.start, a.sizes, b.start, b.sizes))
    if volume != tensor.numel or overlap:
        raise CorruptFileError(f"{path}: the chunks of {tensor.name!r} do not tile its shape {list(tensor.shape)} "
                               f"exactly ({'two overlap' if overlap else f'{volume} of {tensor.numel} elements'}): "
                               "the metadata is corrupt or crafted.")


def _numel(sizes) -> int:
    n = 1
    for s in sizes:
        n *= s
    return n


def read_chunk(folder: Path, chunk: Chunk, dtype: torch.dtype, key: str) -> torch.Tensor:
    """One chunk's tensor: its bytes read from the file, unpickled as tensors only, checked against the metadata."""
    with open(folder / chunk.file, "rb") as f:
        data = os.pread(f.fileno(), chunk.length, chunk.offset)
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors; a damaged archive raises too
        raise CorruptFileError(f"{folder / chunk.file}: the chunk of {key!r} at byte {chunk.offset} is not a tensor "
                               f"archive ({err}). The checkpoint is corrupt or crafted.") from err
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != chunk.sizes or tensor.dtype != dtype:
        what = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise CorruptFileError(f"{folder / chunk.file}: the chunk of {key!r} at byte {chunk.offset} holds {what}, "
                               f"not the {chunk.sizes} {dtype} the metadata declares: corrupt or crafted.")
    return tensor


def read_tensor(folder: Path, tensor: TensorInfo, chunks: list[Chunk]) -> torch.Tensor:
    """The whole tensor, assembled chunk by chunk (one chunk in memory beside it)."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    for chunk in chunks:
        box = tuple(slice(s, s + n) for s, n in zip(chunk.start, chunk.sizes))
        out[box] = read_chunk(folder, chunk, tensor.dtype, tensor.name)
    return out


def advise(folder: Path, chunks: list[Chunk]) -> None:
    """Ask the kernel to start reading the chunks' bytes now (the previous tensor is summed meanwhile)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for chunk in chunks:
        try:
            fd = os.open(folder / chunk.file, os.O_RDONLY)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, chunk.offset, chunk.length, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class DcpCheckpoint:
    """One DCP checkpoint through a key map: the tensors it selects, under the HF config's names, read lazily.

    `folder` is the view a DCP source writes (`POINTER`: {"dcp": the DCP folder, "keys": {HF name: run key},
    "transforms": {HF name: ["rope", heads]}}) beside the config and tokenizer. The same interface as
    `checkpoints.Checkpoint`: `infos`, `get` (a whole tensor, assembled from its chunks and kept until `release`),
    `release`, `prefetch`, `aliases`, `file_index`, `changed`, `stamps`.
    """

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or self.folder.name
        view = json.loads((self.folder / POINTER).read_text())
        self.dcp = Path(view["dcp"])
        entries, storage = read_metadata(self.dcp)
        self.infos: dict[str, TensorInfo] = {}
        self._chunks: dict[str, list[Chunk]] = {}
        for name, key in view["keys"].items():
            if key not in entries:
                raise CheckpointError(f"Checkpoint {self.label!r} ({self.dcp}) has no tensor {key!r} (for {name}): "
                                      "the revisions are not checkpoints of one model. Choose revisions of one run.")
            info, self._chunks[name] = tensor_chunks(self.dcp, key, entries[key], storage)
            self.infos[name] = TensorInfo(name, info.shape, info.dtype)
        self._transforms = {name: tuple(t) for name, t in view.get("transforms", {}).items()}
        used = sorted({c.file for chunks in self._chunks.values() for c in chunks})
        self.files = [self.dcp / METADATA, *(self.dcp / f for f in used)]
        self.stamps = {str(p): file_stamp(p) for p in self.files}
        self.skipped: list[str] = []
        self._kept: dict[str, torch.Tensor] = {}

    def changed(self) -> str | None:
        return first_change(self.stamps)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._kept:
            tensor = read_tensor(self.dcp, self.infos[name], self._chunks[name])
            if name in self._transforms:
                tensor = rope_to_hf(tensor, self._transforms[name][1]).contiguous()
            self._kept[name] = tensor
        return self._kept[name]

    def release(self, name: str) -> None:
        self._kept.pop(name, None)

    def prefetch(self, name: str) -> None:
        advise(self.dcp, self._chunks[name])

    def file_index(self, name: str) -> int:
        """The index in `files` of the storage file holding the tensor's first chunk (a tensor spans the ranks')."""
        chunks = self._chunks[name]
        return self.files.index(self.dcp / chunks[0].file) if chunks else 0

    def aliases(self) -> dict[str, str]:
        return {}  # DCP metadata does not say which keys share storage; the source leaves tied copies out
