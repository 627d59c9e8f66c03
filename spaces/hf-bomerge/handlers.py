"""The Space's event handlers as plain functions: list revisions, run a search, publish.

Each handler takes a `Context` (this Space's limits, cache folder, sign-in mode and output components) first;
`app.build_app` binds it, and gradio sees the rest of the signature (including the `gr.OAuthToken | None`
and `gr.Progress` parameters it fills in). Outputs are dicts keyed by component (`Context.out`), so a
handler names what it updates and leaves the rest alone. The search runs in a child process
(`space_worker.py`) that pushes every finished trial through a pipe (`hf_bomerge.search(on_trial=...)`).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.forkserver
import re
import shutil
import sys
import time
import types
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
from space_limits import REPO_ID, Limits, PlanError, PlanRefused, hub_id, plan_markdown, plan_run  # noqa: F401 - re-exported

from hf_bomerge.cli.options import DEFAULTS, SPEC_DEFAULTS  # noqa: F401 - the app's defaults, as the CLI's
from hf_bomerge.comparisons import comparisons, loss_part
from hf_bomerge.errors import BOMergeError
from hf_bomerge.searching.weight_spaces import SEARCHES
from hf_bomerge.sources import open_source
from hf_bomerge.sources.revisions import progress_key, sort_revisions
from hf_bomerge.specs import HeldOutSpec

# The search modes of the command line but `layered` (it needs --layer-groups, which this Space does not offer).
SEARCH_MODES = [mode for mode in SEARCHES if mode != "layered"]
POLL_S = 0.5  # how often the search process is listened to (and how soon Stop takes effect)
WORKERS: dict[str, multiprocessing.Process] = {}  # live search processes by run id (see `stop`)
TRIAL_COLUMNS = ["trial", "kind", "state", "loss", "weights"]


# ---- the handlers --------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What the handlers share: this Space's limits, its cache folder, whether users sign in with OAuth, and
    the output components by name (empty in unit tests: the outputs are then keyed by name)."""

    limits: Limits
    cache: Path
    oauth: bool = False
    ui: dict = field(default_factory=dict)

    def out(self, **values) -> dict:
        """Handler outputs keyed by component."""
        return {self.ui.get(name, name): value for name, value in values.items()}


def list_revisions(ctx: Context, model_id, token_text, oauth_token: gr.OAuthToken | None):
    """The model's checkpoint branches in training order (table and picker)."""
    model_id = (model_id or "").strip()
    if not hub_id(model_id):
        raise gr.Error(f"{model_id!r} is not a Hub model id; write it as ORG/NAME, e.g. EleutherAI/pythia-160m.")
    try:
        refs = open_source(model_id, token=token_for(token_text, oauth_token) or False, cache_dir=ctx.cache).refs()
    except BOMergeError as err:
        raise gr.Error(str(err)) from None
    ordered = sort_revisions(refs)
    others = sorted(n for n in refs if progress_key(n) is None)
    table = pd.DataFrame([[i + 1, n, refs[n][:12]] for i, n in enumerate(ordered)], columns=["#", "revision", "commit"])
    note = (f"**{len(ordered)} checkpoint branches** of `{model_id}` in training order"
            + (f" (not part of ranges: {', '.join(f'`{n}`' for n in others)})" if others else "")
            + ". Pick some below, or write a range such as "
            + (f"`{ordered[max(0, len(ordered) - 4)]}..{ordered[-1]}`" if ordered else "`A..B`") + " or `last:4`.")
    return ctx.out(refs_note=note, refs_table=table, picked=gr.update(choices=ordered, value=[]))


def picked_to_spec(picked):
    """The picked revisions as a spec, oldest first."""
    return ",".join(sort_revisions(picked)) if picked else gr.skip()


def run(ctx: Context, model_id, spec, dataset, dataset_config, split, text_column, eval_sets, search_mode, trials,
        token_text, previous, oauth_token: gr.OAuthToken | None, progress=gr.Progress()):
    """Check the plan, run the search in a child process and show each trial as it finishes, then the result."""
    token = token_for(token_text, oauth_token)
    trials = int(trials or 0)
    if not 1 <= trials <= ctx.limits.max_trials:
        raise gr.Error(f"Trials must be between 1 and {ctx.limits.max_trials} in this Space, got {trials}.")
    if search_mode not in SEARCH_MODES:
        raise gr.Error(f"Search mode must be one of {', '.join(SEARCH_MODES)}, got {search_mode!r}.")
    dataset = _hub_dataset(dataset, "Dataset")
    evals = [_hub_dataset(e, "Eval set") for e in _lines(eval_sets)]
    if len(evals) > ctx.limits.max_eval_sets:
        raise gr.Error(f"{len(evals)} generalization sets given; this Space evaluates at most "
                       f"{ctx.limits.max_eval_sets} (BOMERGE_SPACE_MAX_EVAL_SETS): keep the ones you need most.")
    forget(previous)  # one merged model per session on disk
    progress(0, desc="checking the plan")
    run_id, kind = uuid.uuid4().hex[:12], None
    run_dir = ctx.cache / "runs" / run_id  # this run's downloads, study and tokenized blocks
    run_dir.mkdir(parents=True)
    try:
        try:
            plan = plan_run(model_id, spec, token, ctx.limits, run_dir)
        except BOMergeError as err:
            raise gr.Error(str(err)) from None
        output = ctx.cache / "outputs" / run_id / f"{plan.source.split('/')[-1]}-bomerge"
        kwargs = dict(source=plan.source, revisions=",".join(plan.revisions), max_checkpoints=0, dataset=dataset,
                      dataset_config=(dataset_config or "").strip() or None, split=(split or "").strip() or None,
                      text_column=(text_column or "").strip() or DEFAULTS["text_column"], eval_datasets=evals,
                      search=search_mode,
                      trials=trials, storage=f"sqlite:///{run_dir / 'study.db'}", token=token or False,
                      cache_dir=str(run_dir), max_eval_tokens=ctx.limits.max_eval_tokens,
                      max_memory=int(ctx.limits.max_memory_gb * 1e9), progress=False)
        rows: list[dict] = []
        yield ctx.out(plan_md=plan_markdown(plan), status_md="Starting the search: downloading the revisions and "
                      "tokenizing the held-out set…", trials_df=trial_table(rows), loss_plot=None, summary_md="",
                      baselines_df=None, general_df=None, search_plot=None, card_md="", result_json=None,
                      result_state=None)
        started = time.monotonic()
        proc, receive = start(run_id, kwargs, output)
        try:
            for kind, payload in messages(proc, receive, ctx.limits, started):
                if kind is None:
                    yield gr.skip()  # a yield point every POLL_S, so that Stop is honoured at once
                elif kind == "trial":
                    rows.append(payload)
                    progress((payload["complete"], trials), desc="trials", unit="trials")
                    table = trial_table(rows)
                    yield ctx.out(status_md=trial_status(rows, trials), trials_df=table, loss_plot=loss_curve(table))
                else:
                    break
        finally:
            stop(run_id)
            receive.close()
    finally:  # however the run ends (done, error, Stop, time limit): its files go, all but a finished model
        shutil.rmtree(run_dir, ignore_errors=True)
        if kind != "ok":
            shutil.rmtree(ctx.cache / "outputs" / run_id, ignore_errors=True)
    if kind != "ok":
        raise gr.Error(payload)
    table = trial_table(rows)  # the last yield is an API client's result: every output, none skipped
    yield ctx.out(plan_md=plan_markdown(plan), status_md=f"Done in {time.monotonic() - started:.0f} s: "
                  f"{payload.trials} trials.", trials_df=table, loss_plot=loss_curve(table), **result_outputs(payload))


def publish(ctx: Context, result, repo_id, private, token_text, oauth_token: gr.OAuthToken | None):
    """Push the session's merged model with the user's token (signed in, or pasted when run locally)."""
    if result is None:
        raise gr.Error("Run a search first: there is no merged model to publish yet.")
    token = token_for(token_text, oauth_token)
    if not token:
        raise gr.Error("Sign in with Hugging Face to publish." if ctx.oauth else
                       "Paste a Hub token with write access in the token box to publish.")
    repo_id = (repo_id or "").strip()
    if "/" not in repo_id and repo_id:
        from huggingface_hub import whoami

        try:
            repo_id = f"{whoami(token=token)['name']}/{repo_id}"
        except Exception:
            raise gr.Error("Could not tell your user name from the token; write the repo as ORG/NAME.") from None
    if not REPO_ID.fullmatch(repo_id):
        raise gr.Error(f"{repo_id!r} is not a repo id; write NAME or ORG/NAME.")
    try:
        url = result.push_to_hub(repo_id, token=token, private=bool(private))
    except BOMergeError as err:
        raise gr.Error(str(err).replace(token, "***")) from None
    return ctx.out(push_md=f"Published to **{repo_id}** ({'private' if private else 'public'}): {url}",
                   card_md=card_preview(result.output), result_state=result)


def token_for(text: str | None, oauth: gr.OAuthToken | None) -> str | None:
    """The signed-in user's token, else the pasted one."""
    if oauth is not None and oauth.token:
        return oauth.token
    return (text or "").strip() or None


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip()]


def _hub_dataset(name: str | None, what: str) -> str | None:
    """`name` if the search will read it as a Hub dataset: checked on `HeldOutSpec.parse`, the search's own parse."""
    name = (name or "").strip() or None
    if name and not hub_id(HeldOutSpec.parse(name).dataset):
        raise gr.Error(f"{what} {name!r}: this Space reads Hub datasets only; write ORG/NAME[:CONFIG][@SPLIT], "
                       "e.g. Salesforce/wikitext:wikitext-2-raw-v1@validation.")
    return name


# ---- the search process ----------------------------------------------------------------------------------

# What the fork server imports once, so that a search does not spend its first seconds importing: the
# pipeline and what it imports lazily (model classes, datasets, the GP's scipy, the study's SQL storage).
# A name that does not import is skipped by multiprocessing.
PRELOAD = ["space_worker", "hf_bomerge.api", "hf_bomerge.searching.study", "hf_bomerge.publish.card",
           "hf_bomerge.publish.plot", "transformers.modeling_utils",
           "transformers.models.auto.modeling_auto", "transformers.models.gpt_neox.modeling_gpt_neox",
           "transformers.models.olmo.modeling_olmo", "transformers.models.llama.modeling_llama", "datasets",
           "scipy.optimize", "optuna.storages", "sqlalchemy.dialects.sqlite", "alembic", "matplotlib.pyplot"]


def _context():
    """A fork server that has imported the pipeline once (`PRELOAD`): each search forks from it in well
    under a second, from a process that runs no threads and no event loop."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def warm_up() -> None:
    """Start the fork server (and its imports) in the background, before the first search needs it."""
    import threading

    threading.Thread(target=lambda: _context() and multiprocessing.forkserver.ensure_running(),
                     name="bomerge-warm-up", daemon=True).start()


def start(run_id: str, kwargs: dict, output: Path):
    """Start the search process of `run_id`; returns it and the end of the pipe it reports on."""
    import space_worker

    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=space_worker.run, args=(kwargs, str(output), send), daemon=True,
                       name=f"bomerge-search-{run_id}")
    # multiprocessing re-runs a script __main__ in the child (as __mp_main__) so that pickled objects of
    # __main__ resolve. Nothing sent here comes from __main__, and re-running app.py would import gradio
    # again for every search: start the child with a bare __main__.
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = main
    send.close()
    WORKERS[run_id] = proc
    return proc, receive


def stop(run_id: str) -> None:
    """Terminate the search process of `run_id` (Stop, an error, or the end of the run)."""
    proc = WORKERS.pop(run_id, None)
    if proc is None:
        return
    if proc.is_alive():
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    proc.join(5)


def messages(proc, receive, limits: Limits, started: float):
    """What the search process says, as (kind, payload): ("trial", row) per finished trial, then ("ok",
    MergeResult) or ("error", message); (None, None) every POLL_S of silence. Its death or the time limit
    is a `gr.Error`."""
    while True:
        if receive.poll(POLL_S):
            try:
                kind, payload = receive.recv()
            except EOFError:  # the pipe closed without a result: the process died
                kind, payload = None, None
            else:
                yield kind, payload
                if kind != "trial":
                    return
                continue
        if not proc.is_alive() and not receive.poll(0.1):
            raise gr.Error(f"The search process ended unexpectedly (exit code {proc.exitcode}); the run "
                           "may have run out of memory. Try fewer revisions or a smaller model.")
        if time.monotonic() - started > limits.max_minutes * 60:
            raise gr.Error(f"The run took longer than this Space's {limits.max_minutes:g} minutes "
                           "(BOMERGE_SPACE_MAX_MINUTES) and was stopped; use fewer trials or revisions.")
        yield None, None


# ---- what is shown -------------------------------------------------------------------------------------------

def trial_table(rows: list[dict]) -> pd.DataFrame:
    """The finished trials (rows as `space_worker` sends them), in trial order: seeds first, then the GP's."""
    table = [{"trial": r["number"], "kind": r["seed"] or "GP", "state": "complete" if _finite(r["loss"]) else "fail",
              "loss": round(r["loss"], 5) if _finite(r["loss"]) else None,
              "weights": ", ".join(f"{w:.3f}" for w in r["weights"])} for r in sorted(rows, key=lambda r: r["number"])]
    return pd.DataFrame(table, columns=TRIAL_COLUMNS)


def trial_status(rows: list[dict], budget: int) -> str:
    done = rows[-1]["complete"] if rows else 0
    if done >= budget:
        return f"{done}/{budget} trials done: evaluating the remaining baselines, writing the merged model…"
    losses = [r["loss"] for r in rows if _finite(r["loss"])]
    return f"Trial {done + 1} of {budget} running" + (f"; best loss so far {min(losses):.5f}" if losses else "")


def loss_curve(table: pd.DataFrame) -> pd.DataFrame | None:
    done = table[table["state"] == "complete"].dropna(subset=["loss"]).sort_values("trial")
    if done.empty:  # None, not an empty frame: a colored plot that starts empty draws no lines (gradio 6.31)
        return None
    best = done["loss"].cummin()
    return pd.concat([pd.DataFrame({"trial": done["trial"], "loss": done["loss"], "series": "trial loss"}),
                      pd.DataFrame({"trial": done["trial"], "loss": best, "series": "best so far"})],
                     ignore_index=True)


def result_outputs(result) -> dict:
    """The result panel: summary, baselines, generalization, search plot, card, JSON, and the session's state."""
    return dict(summary_md=summary(result), baselines_df=baseline_table(result),
                general_df=generalization_table(result), search_plot=_plot_image(result.output),
                card_md=card_preview(result.output), result_json=result.summary(), result_state=result)


def baseline_table(result) -> pd.DataFrame:
    rows = [{"model": "this merge", "loss": result.loss}]
    rows += [{"model": k, "loss": v} for k, v in result.baselines.items()]
    for r in rows:
        r["perplexity"] = round(math.exp(min(r["loss"], 700)), 3)
        r["Δ loss vs merge"] = round(r["loss"] - result.loss, 5)
        r["loss"] = round(r["loss"], 5)
    return pd.DataFrame(rows, columns=["model", "loss", "perplexity", "Δ loss vs merge"])


def generalization_table(result) -> pd.DataFrame:
    cols = ["eval set", "this merge", "best single checkpoint", "uniform average", "best single revision"]
    rows = [[name, round(r["merged"], 5), round(r["best_single"], 5), round(r["uniform"], 5),
             r.get("best_single_revision", "")] for name, r in result.generalization.items()]
    return pd.DataFrame(rows, columns=cols)


def summary(result) -> str:
    """The merge's number, then every comparison said the same way whether the merge wins or loses (the CLI
    summary's and the card's sentences, `hf_bomerge.comparisons`)."""
    weights = " · ".join(f"`{n}` {w:.3f}" for n, w in zip(result.revisions, result.weights))
    text = (f"**Merged held-out loss {result.loss:.5f}** ({result.search} search, {result.trials} trials on "
            f"{result.dataset}, {loss_part(result)}).")
    said = " ".join(comparisons(result))
    return f"{text} {said}{confirm_summary(result)}\n\nWeights (oldest first): {weights}"


def confirm_summary(result) -> str:
    """What the confirm part changed: the baseline `--fallback` kept instead of the merge."""
    c = getattr(result, "confirm", None)
    if not c:
        return ""
    if c.exported != "merge":
        return f"\n\nThe output holds `{c.exported}` (fallback), not the searched merge."
    return ""


def card_preview(folder: str | Path) -> str:
    """The README.md that `save_pretrained` wrote, for gr.Markdown: its YAML header as a code block and
    the search-plot image (shown separately) left out."""
    text = (Path(folder) / "README.md").read_text()
    header = ""
    if text.startswith("---\n"):
        end = text.find("\n---\n", 4)
        if end > 0:
            header, text = text[4:end], text[end + 5:]
    text = re.sub(r"!\[[^\]]*\]\(bomerge_search\.png\)\n?", "", text)
    return (f"```yaml\n{header}\n```\n\n" if header else "") + text


def forget(result) -> None:
    """Delete a run's merged model: its session ended or expired, or it started another run."""
    output = Path(result.output) if getattr(result, "output", None) else None
    if output is not None and output.parent.parent.name == "outputs":  # <cache>/outputs/<run id>/<name>
        shutil.rmtree(output.parent, ignore_errors=True)


def _plot_image(folder: str | Path):
    from PIL import Image

    path = Path(folder) / "bomerge_search.png"
    if not path.is_file():
        return None
    with Image.open(path) as img:
        return img.copy()


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
