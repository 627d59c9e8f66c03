"""A real PostgreSQL server for the tests, on 127.0.0.1, from Debian's `postgresql` package.

`.ci/run` installs the package when it is missing. The server runs as the `postgres` user when the tests run
as root (initdb refuses root), in a fresh data folder, with fsync off (a test database).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testhub import free_port


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} was not found: install Debian's postgresql package "
                           "(.ci/run does: apt-get install postgresql).")
    return found


class PostgresServer:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bomerge-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.as_root = os.geteuid() == 0
        self.root.chmod(0o755)
        if self.as_root:
            shutil.chown(self.root, "postgres")
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "start")
        self._run(_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q",
                  "-c", "CREATE DATABASE bomerge")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/bomerge"

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self.as_root else []
        proc = subprocess.run([*prefix, *cmd], capture_output=True, text=True, cwd=self.root)
        if proc.returncode != 0:
            log = (self.root / "log").read_text()[-2000:] if (self.root / "log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}\n{log}")

    def stop(self) -> None:
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
