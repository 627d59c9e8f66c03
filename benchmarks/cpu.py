"""The CPU model a benchmark ran on, for its report (`lscpu`'s "Model name", else what `platform` knows)."""

from __future__ import annotations

import platform
import subprocess


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()
