"""Rolling merges while a run trains: for each new revision, merge the last K with a warm-started search.

`watch(...)` follows a Hub repo's branches or a local training output (`checkpoint-N` folders appearing
while it watches); `watch_once(...)` does one round (the newest revision, or the one named), e.g. from a
plain Accelerate loop after each save. Every round writes `OUTPUT/<latest>/` (a complete merged model with
its card, renamed into place when complete), appends one JSON object to `OUTPUT/watch.jsonl` (the `--json`
fields plus `"latest"`; the ledger: a re-run resumes after its last line) and redraws `OUTPUT/watch.png`
(held-out loss over training: the latest single checkpoint, the merge, the uniform average).

>>> from hf_bomerge import watch_once
>>> watch_once("./trainer-output", "./merges", window=4, trials=12)["loss"]     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..cli.options import OPTIONS, search_specs
from ..defaults import DEFAULT_MAX_SHARD_SIZE
from ..errors import WatchError
from ..publish.watchplot import plot_watch

LEDGER, PLOT, LOCK = "watch.jsonl", "watch.png", ".watch.lock"
TRIALS = 12  # per round: a round is one window's study, warm-started (`hf-bomerge watch --trials`)
WARM_LABEL = "previous round"  # the seed each round gets from the previous round's best weights
logger = logging.getLogger("hf_bomerge")


def read_ledger(output: str | Path) -> list[dict]:
    """The finished rounds, oldest first. A last line cut short by a crash is not a round."""
    path = Path(output) / LEDGER
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            rounds.append(json.loads(line))
    return rounds


def _append_ledger(output: Path, record: dict) -> None:
    path = output / LEDGER
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():  # drop a line a crash cut short, so the new one starts on its own line
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = path.read_bytes()
                f.truncate(data.rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def shifted(weights: Sequence[float], n: int) -> list[float]:
    """The previous round's weights moved one revision on: each age keeps its weight (the newest revision
    gets what the previous newest had), ages the previous window lacked get 0, renormalized.

    >>> shifted([0.25, 0.25, 0.5], 3)
    [0.25, 0.25, 0.5]
    >>> shifted([0.5, 0.5], 3)
    [0.0, 0.5, 0.5]
    """
    by_age = list(reversed(weights))[:n] + [0.0] * max(0, n - len(weights))
    total = sum(by_age)
    if total <= 0:
        return [1.0 / n] * n
    return [w / total for w in reversed(by_age)]


@contextmanager
def _claim(output: Path):
    """One writer per output folder; leftovers of a killed round's export are removed."""
    import fcntl

    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WatchError(f"Another hf-bomerge watch is writing {output}; stop it first, or give this one "
                             "another --output.") from None
        for partial in output.glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        yield


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"hf-bomerge watch: {message}", file=sys.stderr, flush=True)


def _round(source: str, output: Path, names: list[str], previous: dict | None, *, window: int, trials: int,
           push_to_hub: str | None, private: bool | None, token, max_shard_size, quiet: bool,
           search_kwargs: dict, save_dcp: bool = False) -> dict:
    from .. import api  # the pipeline (torch): only when a round runs

    chosen, latest = names[-window:], names[-1]
    seeds = [(WARM_LABEL, shifted(previous["weights"], len(chosen)))] if previous else []
    _say(f"round {latest}: merging {', '.join(chosen)}" + (f" (warm start from {previous['latest']})"
                                                            if previous else ""), quiet)
    result = api.search(source, ",".join(chosen), max_checkpoints=0, trials=trials, extra_seeds=seeds,
                        token=token, progress=not quiet, **search_kwargs)
    folder = result.save_pretrained(output / latest, max_shard_size=max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                                    progress=not quiet, save_dcp=save_dcp)
    result = dataclasses.replace(result, output=str(folder))
    if push_to_hub:
        url = result.push_to_hub(push_to_hub, token=token, private=private, revision=f"{latest}-bomerge",
                                 commit_message=f"Merge of the last {len(chosen)} checkpoints at {latest} "
                                                "(hf-bomerge watch)")
        _say(f"pushed {latest} to {url}", quiet)
    record = {**result.summary(), "latest": latest}
    _append_ledger(output, record)  # after the folder (and push): a line means the round is complete
    plot_watch(read_ledger(output), output / PLOT)
    _say(f"round {latest}: merged loss {result.loss:.5f}, latest alone {result.baselines.get(latest, float('nan')):.5f}",
         quiet)
    return record


def watch_once(source: str, output: str | Path, *, latest: str | None = None, window: int = 4, trials: int = TRIALS,
               push_to_hub: str | None = None, private: bool | None = None, token: str | bool | None = None,
               settle: float = 2.0, wait: float = 600.0, poll: float = 2.0, max_shard_size=None,
               quiet: bool = True, save_dcp: bool = False, **search_kwargs) -> dict:
    """One round: merge the `window` revisions ending at `latest` (default: the newest complete one) and
    record it in `output`; returns the ledger record (the `--json` fields plus `"latest"`). A round already
    in the ledger is not done again. `latest` still being written is waited for, up to `wait` seconds.
    `search_kwargs` are `hf_bomerge.search`'s (dataset, max_eval_tokens, device, objective, storage, ...).

    >>> watch_once("./out", "./out-merges", latest="checkpoint-3000", dataset="heldout.jsonl")  # doctest: +SKIP
    """
    from ..sources import arrivals  # the sources package (torch): only when a watch runs, not for --help

    output = Path(output).expanduser().resolve()
    _check(window, trials, search_kwargs)
    with _claim(output):
        ledger = read_ledger(output)
        done = {r["latest"]: r for r in ledger}
        if latest in done:
            return done[latest]
        deadline = time.monotonic() + wait
        while True:
            seen = arrivals(source, settle=settle, exclude=output, token=token)
            names = [a.name for a in seen]
            target = latest or next((a.name for a in reversed(seen) if a.ready), None)
            if target in names:
                upto = seen[: names.index(target) + 1][-window:]
                if all(a.ready for a in upto):
                    break
                why = next(f"{a.name}: {a.why}" for a in upto if not a.ready)
            else:
                why = f"{latest} does not exist yet" if latest else "no complete revision yet"
            if time.monotonic() > deadline:
                raise WatchError(f"Gave up waiting for {source} after {wait:g} s ({why}).")
            time.sleep(poll)
        if target in done:
            return done[target]
        if len(upto) < 2:
            raise WatchError(f"{target} is the first revision of {source}: a merge needs at least 2.")
        return _round(source, output, [a.name for a in upto], ledger[-1] if ledger else None, window=window,
                      trials=trials, push_to_hub=push_to_hub, private=private, token=token,
                      max_shard_size=max_shard_size, quiet=quiet, search_kwargs=search_kwargs, save_dcp=save_dcp)


def watch(source: str, output: str | Path, *, window: int = 4, trials: int = TRIALS, poll: float = 60.0,
          stop_after: int | None = None, push_to_hub: str | None = None, private: bool | None = None,
          token: str | bool | None = None, settle: float = 2.0, max_shard_size=None, quiet: bool = False,
          on_round: Callable[[dict], None] | None = None, save_dcp: bool = False, **search_kwargs) -> list[dict]:
    """Merge each new revision's window until stopped (Ctrl-C) or after `stop_after` rounds; returns the
    rounds this call did. Resumes after the ledger's last round: every revision after it gets its round,
    in training order; one still being written is waited for (and the ones after it with it).

    >>> watch("EleutherAI/pythia-160m", "pythia-watch", window=4, poll=600)         # doctest: +SKIP
    """
    from ..sources import arrivals  # the sources package (torch): only when a watch runs, not for --help
    from ..sources.revisions import progress_key  # the sources package (torch): only when a watch runs, not for --help

    output = Path(output).expanduser().resolve()
    _check(window, trials, search_kwargs)
    done: list[dict] = []
    hub_cache: dict = {}
    with _claim(output):
        ledger = read_ledger(output)
        if ledger:
            plot_watch(ledger, output / PLOT)
            _say(f"resuming after {ledger[-1]['latest']} ({len(ledger)} rounds in {output / LEDGER})", quiet)
        waiting = None
        while stop_after is None or len(done) < stop_after:
            seen = arrivals(source, settle=settle, exclude=output, token=token, cache=hub_cache)
            last = progress_key(ledger[-1]["latest"]) if ledger else None
            for i, arrival in enumerate(seen):
                if i == 0 or (last is not None and progress_key(arrival.name) <= last):
                    continue
                if not all(a.ready for a in seen[max(0, i + 1 - window): i + 1]):
                    if waiting != (arrival.name, arrival.why):
                        _say(f"waiting for {arrival.name} ({arrival.why or 'an older revision is incomplete'})", quiet)
                        waiting = (arrival.name, arrival.why)
                    break
                record = _round(source, output, [a.name for a in seen[: i + 1]], ledger[-1] if ledger else None,
                                window=window, trials=trials, push_to_hub=push_to_hub, private=private, token=token,
                                max_shard_size=max_shard_size, quiet=quiet, search_kwargs=search_kwargs,
                                save_dcp=save_dcp)
                ledger.append(record)
                done.append(record)
                if on_round is not None:
                    on_round(record)
                if stop_after is not None and len(done) >= stop_after:
                    return done
                last = progress_key(arrival.name)
            time.sleep(poll)
    return done


def _check(window: int, trials: int, search_kwargs: dict) -> None:
    """Refuse a window or search option no round can use, before anything is read."""
    if window < 2:
        raise WatchError(f"--window must be at least 2 (a merge needs two revisions), got {window}.")
    search_specs("watch", trials=trials, **{k: v for k, v in search_kwargs.items() if k in OPTIONS})
