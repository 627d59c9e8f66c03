"""A big file written once, front to back, and on disk when it is closed: the merged model's shards.

Because the file is fsync'd before it is renamed into place (never half a model), every byte goes to the disk
before the command ends anyway; passing it through the page cache first only adds a copy and a fresh page per
4 KiB (on some virtual machines a fault to the host each: 0.87 GB took 3.2-3.4 s buffered + fsync, 0.63-0.68 s
direct; benchmarks/README.md). So where the OS and filesystem allow it the file is opened with `O_DIRECT` and written
from page-aligned buffers in whole blocks; the last block is padded and the file truncated to its size. A
filesystem that refuses direct I/O (at open or at a write) gets ordinary buffered writes, the same bytes. This
is how DeepSpeed's FastPersist writes checkpoints.

Two buffers: the caller fills one (`reserve` hands out its memory, so a merge can be summed straight into the
file's buffer) while a background thread writes the other (the write releases the GIL).
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor

BLOCK = 4096  # a multiple of every logical block size in use (512 and 4096)
BUFFER = 16 << 20  # bytes per buffer (two of them): large writes for the disk, small beside a model's tensors


class DurableFile:
    """A write-only file: `write` bytes or `reserve` and fill memory; `close` returns once it is on disk.

    >>> with DurableFile("/tmp/example.bin") as f:
    ...     f.write(b"hello ")
    ...     f.reserve(5)[:] = b"world"
    >>> open("/tmp/example.bin", "rb").read()
    b'hello world'
    """

    def __init__(self, path, *, direct: bool = True, buffer_size: int | None = None):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
            except OSError as err:  # a filesystem without direct I/O
                if err.errno != errno.EINVAL:
                    raise
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        size = buffer_size or BUFFER
        size = max(2 * BLOCK, size - size % BLOCK)
        self.buffers = [memoryview(mmap.mmap(-1, size)) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self.filled = 0  # bytes in buffers[0], the one being filled
        self.size = 0  # bytes of the file
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bomerge-write")
        self.pending: Future | None = None  # the write of buffers[1]

    @property
    def largest_reserve(self) -> int:
        return len(self.buffers[0]) - BLOCK

    def reserve(self, n: int) -> memoryview:
        """The next `n` bytes of the file, as writable memory to fill before the next `reserve`, `write` or
        `close` (`n` ≤ `largest_reserve`)."""
        if n > self.largest_reserve:
            raise ValueError(f"reserve({n}): at most {self.largest_reserve} bytes at a time")
        if self.filled + n > len(self.buffers[0]):
            self._hand_over()
        view = self.buffers[0][self.filled:self.filled + n]
        self.filled += n
        self.size += n
        return view

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        for start in range(0, len(data), self.largest_reserve):
            piece = data[start:start + self.largest_reserve]
            self.reserve(len(piece))[:] = piece

    def _hand_over(self, last: bool = False) -> None:
        """Give the filled buffer to the writer thread (whole blocks while direct; the rest, under a block, moves
        to the front of the other buffer) once it has finished the previous one."""
        end = self.filled
        if self.direct and last and end % BLOCK:
            pad = BLOCK - end % BLOCK
            self.buffers[0][end:end + pad] = bytes(pad)
            end += pad
        elif self.direct:
            end -= end % BLOCK
        self._wait()
        full, self.buffers = self.buffers[0], self.buffers[::-1]
        tail = max(0, self.filled - end)  # under a block while direct; none after padding
        self.buffers[0][:tail] = full[end:end + tail]
        self.filled = tail
        self.pending = self.writer.submit(self._write, full, end)

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write is raised here, in the caller's thread

    def _write(self, buffer: memoryview, end: int) -> None:
        done = 0
        while done < end:
            try:
                written = os.write(self.fd, buffer[done:end])
            except OSError as err:  # direct I/O refused at a write (or an alignment this OS wants)
                if not (self.direct and err.errno == errno.EINVAL):
                    raise
                self._buffered()
                continue
            done += written
            if self.direct and written % BLOCK:  # a short write left the offset unaligned: finish buffered
                self._buffered()

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Write what is buffered, and return only when the file is on disk."""
        if self.fd < 0:
            return
        try:
            self._hand_over(last=True)
            self._wait()
            os.ftruncate(self.fd, self.size)  # the padding of the last block
            os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing the rest (after an error: the caller removes the file)."""
        if self.fd < 0:
            return
        self.writer.shutdown(wait=True)  # the write in flight, if any, ends before its file descriptor closes
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close() if kind is None else self.abandon()
