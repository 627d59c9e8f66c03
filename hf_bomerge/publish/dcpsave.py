"""`--save-dcp`: the merge also as a distributed checkpoint in the run's own tensor names, so training can resume
from it (model state only: there is no merged optimizer state; start the optimizer afresh or keep the run's).

The names and the q/k layout come from the view the source wrote for the latest revision (`reading.dcp.POINTER`):
each saved tensor is mapped back to its run key, a `rope` permutation undone, and the whole state saved with
`torch.distributed.checkpoint.save` in one process (`.metadata` and one `__0_0.distcp`), which any number of ranks
can load with `dcp.load` (a sharded load reads only each rank's part).

The files: merged/dcp/.metadata and merged/dcp/__0_0.distcp, beside the HF model.

>>> result.save_pretrained("merged", save_dcp=True)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from ..errors import OptionError
from ..reading.dcp import POINTER
from ..reading.keymap import rope_from_hf

DCP_FOLDER = "dcp"


def check_dcp_source(view: Path) -> None:
    """Refuse `--save-dcp` for a source that is not a folder of distributed checkpoints (before any work)."""
    if not (Path(view) / POINTER).is_file():
        raise OptionError("--save-dcp writes the merge in the training run's own tensor names, which only a folder "
                          "of distributed checkpoints (DCP) has; this source's checkpoints are transformers "
                          "folders already. Drop --save-dcp.")


def write_dcp(model_folder: Path, view: Path, out: Path) -> None:
    """The safetensors of the merge written to `model_folder`, saved to `out` as DCP in the run's names."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open

    check_dcp_source(view)
    spec = json.loads((Path(view) / POINTER).read_text())
    tensors = {}
    for file in sorted(Path(model_folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    state = {}
    for name, key in spec["keys"].items():
        tensor = tensors[name]
        if name in spec.get("transforms", {}):
            tensor = rope_from_hf(tensor, spec["transforms"][name][1]).contiguous()
        state[key] = tensor
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(out), single_file_per_rank=True), no_dist=True)
