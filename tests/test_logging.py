"""The command line prints each warning once: its own and those of libraries with their own handler."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `hf-bomerge show` with its `run` replaced by one warning from hf_bomerge's logger and one from
# huggingface_hub's (the logger its Hub retries go to, which has a stream handler of its own).
SCRIPT = """
import logging, sys
from huggingface_hub.utils import logging as hub_logging
from hf_bomerge import cli
from hf_bomerge.cli import show

def run(args):
    logging.getLogger("hf_bomerge.publish.push").warning("bomerge-warning-marker")
    hub_logging.get_logger("huggingface_hub.utils._http").warning("hub-retry-marker")
    return 0

show.run = run
sys.exit(cli.main(["show"]))
"""


@pytest.mark.e2e
def test_each_warning_is_printed_once(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_VERBOSITY", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("bomerge-warning-marker") == 1, proc.stderr
    assert proc.stderr.count("hub-retry-marker") == 1, proc.stderr
