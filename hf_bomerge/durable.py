"""A big file written once, front to back, and on disk when it is closed: the merged model's shards.

Because the file is fsync'd before it is renamed into place (never half a model), every byte goes to the disk
before the command ends anyway; passing it through the page cache first only adds a copy and a fresh page per
4 KiB (on some virtual machines a fault to the host each: 2.8 s instead of 0.65 s for 0.87 GB,
benchmarks/README.md). So where the OS and filesystem allow it the file is opened with `O_DIRECT` and written
from a page-aligned buffer in whole blocks; the last block is padded and the file truncated to its size. A
filesystem that refuses direct I/O (at open or at the first write) gets ordinary buffered writes, the same
bytes. This is how DeepSpeed's FastPersist writes checkpoints.
"""

from __future__ import annotations

import errno
import mmap
import os

BLOCK = 4096  # a multiple of every logical block size in use (512 and 4096)
BUFFER = 16 << 20  # bytes per write: large enough for the disk's bandwidth, small beside a model's tensors


class DurableFile:
    """A write-only file: `write` any bytes, `close` pads, truncates, fsyncs and closes.

    >>> with DurableFile("/tmp/example.bin") as f:
    ...     f.write(b"hello")
    >>> open("/tmp/example.bin", "rb").read()
    b'hello'
    """

    def __init__(self, path, *, direct: bool = True, buffer_size: int = BUFFER):
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
        self.buffer = mmap.mmap(-1, buffer_size - buffer_size % BLOCK or BLOCK)  # page-aligned, as O_DIRECT needs
        self.view = memoryview(self.buffer)
        self.filled = 0  # bytes in the buffer
        self.size = 0  # bytes written by the caller

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        self.size += len(data)
        while len(data):
            n = min(len(data), len(self.buffer) - self.filled)
            self.view[self.filled:self.filled + n] = data[:n]
            self.filled += n
            data = data[n:]
            if self.filled == len(self.buffer):
                self._drain(self.filled)

    def _drain(self, end: int) -> None:
        """Write buffer[:end] (a whole number of blocks while direct) and empty the buffer."""
        done = 0
        while done < end:
            try:
                written = os.write(self.fd, self.view[done:end])
            except OSError as err:  # direct I/O refused at the first write (or an alignment this OS wants)
                if not (self.direct and err.errno == errno.EINVAL):
                    raise
                self._buffered()
                continue
            done += written
            if self.direct and written % BLOCK:  # a short write left the offset unaligned: finish buffered
                self._buffered()
        self.filled = 0

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def close(self) -> None:
        """Write what is buffered, and return only when the file is on disk."""
        if self.fd < 0:
            return
        try:
            end = self.filled
            if self.direct and end % BLOCK:
                end += BLOCK - end % BLOCK
                self.view[self.filled:end] = bytes(end - self.filled)
            self._drain(end)
            os.ftruncate(self.fd, self.size)  # the padding of the last block
            os.fsync(self.fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing the rest (after an error: the caller removes the file)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.view = self.buffer = None  # freed with the last reference (an error's traceback may hold a slice)

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(self, kind, *_) -> None:
        self.close() if kind is None else self.abandon()
