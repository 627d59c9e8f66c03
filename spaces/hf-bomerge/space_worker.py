"""The Space's heavy work, in a child process: `hf_bomerge.search(...)` then `save_pretrained(...)`.

A child process (not a thread) so that Stop really stops: the app terminates the process, which frees its
memory and CPU at once, and the next queued run starts on an idle machine. Progress is pushed to the app through
the same pipe: `("trial", row)` after every trial (`search(on_trial=...)`). Deliberately free of gradio imports:
the app's fork server preloads this module and `hf_bomerge.api` (torch, transformers, optuna) once.
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any


def run(kwargs: dict[str, Any], output: str, conn) -> None:
    """Search, sending `("trial", row)` after each trial; save the merged model to `output`; send
    `("ok", MergeResult)` or `("error", message)`."""
    import os

    # A user's request runs with the user's token or none, never with the Space's own HF_TOKEN secret: the
    # API passes the token explicitly everywhere, and this process does not even hold the secret.
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        os.environ.pop(name, None)
    try:
        conn.send(_search(kwargs, output, lambda trial, complete, budget: conn.send(("trial", trial_row(
            trial, complete, budget)))))
    finally:
        conn.close()


def trial_row(trial, complete: int, budget: int) -> dict[str, Any]:
    """A finished `hf_bomerge.searching.study.Trial` as plain data (`loss` is NaN for a failed trial).

    >>> from hf_bomerge.searching.study import Trial
    >>> trial_row(Trial(3, [0.25, 0.75], 2.5, None), 4, 10)
    {'number': 3, 'weights': [0.25, 0.75], 'loss': 2.5, 'seed': None, 'complete': 4, 'budget': 10}
    """
    return {"number": trial.number, "weights": list(trial.weights), "loss": float(trial.loss), "seed": trial.seed,
            "complete": complete, "budget": budget}


def _search(kwargs: dict[str, Any], output: str, on_trial) -> tuple[str, Any]:
    try:
        import hf_bomerge
        from hf_bomerge.errors import BOMergeError

        try:
            result = hf_bomerge.search(**kwargs, on_trial=on_trial)
            folder = result.save_pretrained(output, progress=False)
            return "ok", dataclasses.replace(result, output=str(folder))
        except BOMergeError as err:  # a user's mistake: its message says what to do
            message = str(err)
    except BaseException as err:
        traceback.print_exc()
        message = f"{type(err).__name__}: {err}"
    token = kwargs.get("token")
    return "error", message.replace(token, "***") if isinstance(token, str) and token else message
