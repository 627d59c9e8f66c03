"""The shards' writer: whatever the pieces, the file holds exactly the bytes written, direct I/O or not."""

from __future__ import annotations

import errno
import os
import random

import pytest

from hf_bomerge.merging import durable
from hf_bomerge.merging.durable import BLOCK, DurableFile


def pieces(seed: int, total: int) -> list[bytes]:
    """Random pieces of random sizes (empty ones, odd ones, ones longer than the buffer)."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < total:
        n = rng.choice([0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 3, rng.randrange(1, 5 * BLOCK), rng.randrange(1, 40_000)])
        out.append(rng.randbytes(n))
        size += n
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("buffer_size", [BLOCK, 3 * BLOCK, 1 << 20])
def test_the_file_holds_exactly_what_was_written(tmp_path, direct, buffer_size):
    data = pieces(buffer_size, 200_000)
    path = tmp_path / "shard.safetensors"
    with DurableFile(path, direct=direct, buffer_size=buffer_size) as f:
        for piece in data:
            f.write(piece)
    assert path.read_bytes() == b"".join(data)  # no padding left, nothing lost at a buffer or block boundary


@pytest.mark.parametrize("direct", [True, False])
def test_reserved_memory_filled_in_place_lands_in_order(tmp_path, direct):
    """The export sums straight into `reserve`d memory: pieces of any size up to `largest_reserve`, filled after
    the call, across buffer hand-overs (a tail under a block carried to the other buffer)."""
    rng = random.Random(7)
    path, expected = tmp_path / "shard.bin", []
    with DurableFile(path, direct=direct, buffer_size=3 * BLOCK) as f:
        f.write(b"header")
        expected.append(b"header")
        for _ in range(300):
            piece = rng.randbytes(rng.randrange(0, f.largest_reserve + 1))
            f.reserve(len(piece))[:] = piece
            expected.append(piece)
        with pytest.raises(ValueError, match="at most"):
            f.reserve(f.largest_reserve + 1)
    assert path.read_bytes() == b"".join(expected)


def test_sizes_on_and_off_a_block_boundary(tmp_path):
    for size in (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK):
        path = tmp_path / f"{size}.bin"
        with DurableFile(path, buffer_size=2 * BLOCK) as f:
            f.write(b"\x5a" * size)
        assert path.stat().st_size == size and path.read_bytes() == b"\x5a" * size


def test_a_filesystem_that_refuses_direct_io_at_the_first_write_gets_buffered_writes(tmp_path, monkeypatch):
    # No filesystem here refuses O_DIRECT at write time (ext4 and tmpfs accept it at open and honour it), so the
    # refusal such a filesystem answers (EINVAL) is simulated for the first write only.
    real_write, refused = os.write, []

    def write(fd, data):
        if not refused:
            refused.append(True)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(durable.os, "write", write)
    data = pieces(1, 50_000)
    path = tmp_path / "shard.bin"
    with DurableFile(path, buffer_size=2 * BLOCK) as f:
        for piece in data:
            f.write(piece)
        assert not f.direct
    assert refused and path.read_bytes() == b"".join(data)


def test_an_error_while_writing_closes_the_file_without_finishing_it(tmp_path):
    path = tmp_path / "shard.bin"
    with pytest.raises(RuntimeError):
        with DurableFile(path, buffer_size=2 * BLOCK) as f:
            f.write(b"x" * (3 * BLOCK))
            raise RuntimeError("merge failed")
    assert f.fd == -1  # closed; the export removes its staging folder, so the partial file never survives
    assert path.stat().st_size <= 3 * BLOCK


def test_other_os_errors_are_raised(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(durable.os, "write", full)
    with pytest.raises(OSError, match="No space"):
        with DurableFile(tmp_path / "shard.bin", buffer_size=BLOCK) as f:
            f.write(b"x" * BLOCK)
