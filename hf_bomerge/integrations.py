"""`BOMergeCallback`: rolling merges of a `transformers.Trainer` run, computed beside it, reported in its logs.

Every `every`-th save starts, in a child process (`python -m hf_bomerge.cli.watch ... --latest checkpoint-N`),
the merge of the last `window` checkpoints: training never waits for it (one merge runs at a time; the
saves that come meanwhile queue). The child runs on CPU unless `device` names another one. Finished rounds
(the child's `watch.jsonl`) are logged, on the confirm part of the held-out set that the search never saw, as
`bomerge/loss`, `bomerge/gain_vs_latest` (the latest checkpoint's
loss minus the merge's: positive when the merge is better), `bomerge/latest_loss`, `bomerge/uniform_loss` and
`bomerge/checkpoint_step`; with `trainer=` they go through `trainer.log`, so TensorBoard and W&B show them.

>>> trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)  # doctest: +SKIP
>>> trainer.add_callback(BOMergeCallback(trainer, window=4, dataset="heldout.jsonl"))        # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from transformers import TrainerCallback

from .errors import WatchError
from .objectives import objective_class
from .searching.watch import LEDGER, read_ledger

logger = logging.getLogger("hf_bomerge")
# A child must not join the training's process group, nor (on CPU) touch its GPUs.
_LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")


class BOMergeCallback(TrainerCallback):
    """Merge the last `window` checkpoints at every `every`-th save, in a child process; log the results.

    `output_dir` (default `<TrainingArguments.output_dir>/bomerge`) receives what `hf-bomerge watch` writes:
    one merged model per round, `watch.jsonl`, `watch.png`, and the children's log `watch.log`. `options`
    are `hf-bomerge watch` options as keywords (`dataset="heldout.jsonl", max_eval_tokens=8192,
    push_to_hub="me/run-merges"`; `True` for a flag). `wait_at_end` waits for the queued merges when
    training ends, so the last rounds reach the logs.

    >>> BOMergeCallback(trainer, every=2, window=4, trials=12, device="cuda:1", dataset="heldout.jsonl")  # doctest: +SKIP
    """

    def __init__(self, trainer=None, *, output_dir: str | Path | None = None, every: int = 1, window: int = 4,
                 trials: int = 12, device: str = "cpu", wait_at_end: bool = True, **options):
        if every < 1 or window < 2:
            raise WatchError(f"BOMergeCallback needs every >= 1 and window >= 2 (got every={every}, window={window}).")
        self.trainer, self.every, self.window, self.trials, self.device = trainer, every, window, trials, device
        self.output_dir = Path(output_dir).resolve() if output_dir else None
        self.wait_at_end, self.options = wait_at_end, options
        self.failed: list[str] = []  # checkpoints whose merge failed (see watch.log)
        self._saves, self._queue, self._child, self._reported = 0, [], None, set()

    # -- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self.source = Path(args.output_dir).resolve()
        self.output_dir = self.output_dir or self.source / "bomerge"
        limit = args.save_total_limit
        if limit is not None and limit < self.window + 1:
            raise WatchError(f"save_total_limit={limit} would delete checkpoints of the window ({self.window}) "
                             f"while they are merged; set it to at least {self.window + 1} (more if merges are "
                             "slower than saves), or None.")
        self._reported |= {r["latest"] for r in read_ledger(self.output_dir)}  # a resumed run logged them

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._saves += 1
        if self._saves % self.every == 0:
            name = f"checkpoint-{state.global_step}"
            if len([p for p in self.source.glob("checkpoint-*") if p.is_dir()]) >= 2:
                self._queue.append(name)
        self._pump()

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._pump()
            self._report(state)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        while self.wait_at_end and (self._child is not None or self._queue):
            if self._child is not None:
                self._child.wait()
            self._pump()
        self._report(state)

    # -- children and reports ---------------------------------------------------------------------------
    def command(self, latest: str) -> list[str]:
        """The child's command line: one `hf-bomerge watch` round for the window ending at `latest`."""
        cmd = [sys.executable, "-m", "hf_bomerge.cli.watch", str(self.source), "--output", str(self.output_dir),
               "--latest", latest, "--window", str(self.window), "--trials", str(self.trials),
               "--device", self.device, "--quiet"]
        for key, value in self.options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                cmd.append(flag)
            elif value not in (None, False):
                cmd += [flag, str(value)]
        return cmd

    def _pump(self) -> None:
        if self._child is not None:
            if self._child.poll() is None:
                return
            if self._child.returncode != 0:
                self.failed.append(self._child_latest)
                logger.warning("hf-bomerge: the merge at %s failed (exit %d); see %s", self._child_latest,
                               self._child.returncode, self.output_dir / "watch.log")
            self._child = None
        if self._queue:
            self._start(self._queue.pop(0))

    def _start(self, latest: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / "watch.log", "ab") as log:
            self._child = subprocess.Popen(self.command(latest), stdout=log, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL)
        self._child_latest = latest

    def _report(self, state) -> None:
        if not (self.output_dir / LEDGER).is_file():
            return
        for record in read_ledger(self.output_dir):
            if record["latest"] in self._reported:
                continue
            self._reported.add(record["latest"])
            logs = round_logs(record)
            if self.trainer is not None:
                self.trainer.log(logs)
            else:  # no Trainer to log through: the history still gets it (reporters do not)
                state.log_history.append({**logs, "step": state.global_step})


def round_logs(record: dict) -> dict[str, float]:
    """The scalars a round adds to the training logs (see the module docstring).

    >>> round_logs({"latest": "checkpoint-20", "objective": "loss", "loss": 3.9,
    ...             "baselines": {"checkpoint-20": 4.0, "uniform": 3.95}})["bomerge/checkpoint_step"]
    20.0
    """
    key, latest = record.get("objective", "loss"), record["latest"]
    sign = 1 if objective_class(key).higher_is_better else -1
    scores = record.get("confirm") or record  # the confirm part's numbers (never seen by the search) when there
    single, merged = scores["baselines"].get(latest), scores["loss"]
    logs = {f"bomerge/{key}": merged}
    if single is not None:
        logs["bomerge/gain_vs_latest"] = sign * (merged - single)
        logs[f"bomerge/latest_{key}"] = single
    if "uniform" in scores["baselines"]:
        logs[f"bomerge/uniform_{key}"] = scores["baselines"]["uniform"]
    step = latest.rsplit("-", 1)[-1]
    if step.isdigit():
        logs["bomerge/checkpoint_step"] = float(step)
    return logs
