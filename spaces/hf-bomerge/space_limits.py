"""What this Space accepts (`Limits`, from BOMERGE_SPACE_* environment variables) and the plan of a run checked
against them before anything is downloaded (`plan_run`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hf_bomerge.api import plan as plan_merge
from hf_bomerge.errors import BOMergeError
from hf_bomerge.plan import Plan, PlanError, human, memory_available
from hf_bomerge.sources.revisions import listed

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Limits:
    """What this Space accepts; every field can be set by an environment variable (see `from_env`)."""

    max_params: float = 1.5e9
    max_revisions: int = 8
    max_trials: int = 40
    max_memory_gb: float = 14.0
    max_disk_gb: float = 40.0
    max_minutes: float = 60.0
    max_eval_tokens: int = 16384
    max_eval_sets: int = 3
    max_queue: int = 20
    keep_hours: float = 6.0  # a session's merged model is deleted after this long (or when it ends)

    @classmethod
    def from_env(cls) -> Limits:
        def get(name: str, kind, default):
            text = os.environ.get(f"BOMERGE_SPACE_{name}")
            return kind(float(text)) if text else default

        d = cls()
        return cls(get("MAX_PARAMS", float, d.max_params), get("MAX_REVISIONS", int, d.max_revisions),
                   get("MAX_TRIALS", int, d.max_trials), get("MAX_MEMORY_GB", float, d.max_memory_gb),
                   get("MAX_DISK_GB", float, d.max_disk_gb), get("MAX_MINUTES", float, d.max_minutes),
                   get("MAX_EVAL_TOKENS", int, d.max_eval_tokens), get("MAX_EVAL_SETS", int, d.max_eval_sets),
                   get("MAX_QUEUE", int, d.max_queue),
                   get("KEEP_HOURS", float, d.keep_hours))

    def markdown(self) -> str:
        return (f"**Limits of this Space:** models up to {_count(self.max_params)} parameters · at most "
                f"{self.max_revisions} revisions per merge (a longer range is thinned evenly, both ends kept) · "
                f"at most {self.max_trials} trials · {self.max_memory_gb:g} GB of memory and "
                f"{self.max_disk_gb:g} GB of disk per run · {self.max_minutes:g} minutes per run · held-out "
                f"loss on {self.max_eval_tokens} tokens · at most {self.max_eval_sets} generalization sets · "
                "Hub models and datasets only; a run's downloads are deleted when it ends. One search runs at a "
                "time; the others wait in the queue (your position is shown). A plan that does not fit is refused "
                "before anything is downloaded. For more, run `hf-bomerge` on your own machine.")


class PlanRefused(BOMergeError):
    """The plan does not fit this Space's limits (nothing was downloaded)."""


def hub_id(text: str) -> bool:
    """Whether `text` is a Hub repo id ORG/NAME that names nothing on this machine (no path, `~`, `..`, URL).

    >>> [hub_id(t) for t in ("EleutherAI/pythia-160m", "a/..", "/etc/x", "~/x", "file:/x", "a/b/c", "a--/b")]
    [True, False, False, False, False, False, False]
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return bool(REPO_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def plan_run(model_id: str, spec: str, token: str | None, limits: Limits, cache_dir: str | Path) -> Plan:
    """`hf_bomerge.plan` (branch list, the revisions' file listings and config.json: never a weight file)
    checked against this Space's limits; `PlanRefused` / `PlanError` say which limit and what would fit."""
    model_id, spec = (model_id or "").strip(), (spec or "").strip()
    if not hub_id(model_id):
        raise PlanRefused(f"{model_id!r} is not a Hub model id; write it as ORG/NAME, e.g. EleutherAI/pythia-160m.")
    refuse = "Refused before downloading anything:"
    named = listed(spec)  # an explicit list is never thinned: it is refused before its listings are fetched
    if named is not None and len(named) > limits.max_revisions:
        raise PlanRefused(_too_many(refuse, spec, len(named), limits))
    memory = int(min(limits.max_memory_gb * 1e9, memory_available("cpu")))
    plan = plan_merge(model_id, spec, max_checkpoints=limits.max_revisions, token=token or False,
                      cache_dir=cache_dir, max_memory=memory)
    if len(plan.revisions) > limits.max_revisions:  # whatever the spec's form
        raise PlanRefused(_too_many(refuse, spec, len(plan.revisions), limits))
    if len(plan.revisions) < 2:
        raise PlanRefused(f"{refuse} a merge needs at least 2 revisions; {spec!r} selects {plan.revisions}. "
                          "Widen the range or use last:N with N ≥ 2.")
    if plan.params > limits.max_params:
        raise PlanRefused(f"{refuse} {model_id} has about {_count(plan.params)} parameters; this Space merges "
                          f"models up to {_count(limits.max_params)} (BOMERGE_SPACE_MAX_PARAMS). Run hf-bomerge "
                          f"on your own machine: `hf-bomerge {model_id} --revisions {spec}`.")
    if plan.disk_bytes > limits.max_disk_gb * 1e9:
        raise PlanRefused(f"{refuse} {len(plan.revisions)} revisions of {model_id} need about "
                          f"{human(plan.disk_bytes)} of disk; this Space allows {limits.max_disk_gb:g} GB "
                          "(BOMERGE_SPACE_MAX_DISK_GB): select fewer revisions.")
    try:
        plan.check()  # memory (the Space's limit, or less if less is free) and free disk
    except PlanError as err:
        raise PlanError(f"{refuse} {err}") from None
    return plan


def _too_many(refuse: str, spec: str, count: int, limits: Limits) -> str:
    return (f"{refuse} {spec!r} selects {count} revisions; this Space merges at most {limits.max_revisions} "
            f"(BOMERGE_SPACE_MAX_REVISIONS). Name at most {limits.max_revisions}, or write a range A..B or last:N, "
            "which the Space thins evenly (both ends kept).")


def plan_markdown(plan: Plan) -> str:
    revs = ", ".join(f"`{n}`" for n in plan.revisions)
    note = f"\n\n{plan.note}" if plan.note else ""
    return (f"**Plan:** {len(plan.revisions)} revisions of `{plan.source}` (oldest first): {revs}.{note}\n\n"
            f"About {_count(plan.params)} parameters, {human(plan.checkpoint_bytes)} per revision; downloads "
            f"{human(plan.download_bytes)}, needs about {human(plan.resident_bytes)} of memory and "
            f"{human(plan.disk_bytes)} of disk.")


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"
