"""hf-bomerge as a Gradio Space: list a model's checkpoint branches, search merge weights, publish the merge.

A thin shell over the Python API (`hf_bomerge.search`, `MergeResult.save_pretrained/push_to_hub`):

1. "List revisions" (light, never queued behind a search) shows the branches in training order.
2. "Run" checks the plan (`hf_bomerge.plan`: file listings and config.json only) against this Space's
   limits BEFORE downloading anything, then runs the search in a child process
   (`space_worker.py`) one at a time (`concurrency_limit=1`; gradio shows the queue position), reading
   the trials live from the study's SQLite storage: a progress bar, a trial table, a loss plot. "Stop"
   terminates the child process.
3. The result: baselines, generalization, the model card that `save_pretrained` wrote, and "Publish",
   which pushes with the signed-in user's OAuth token (in a Space with `hf_oauth: true`) or, run
   locally, with a token pasted in a password box. Tokens are never shown, logged or written.

Limits (environment variables; defaults fit a free CPU Space): BOMERGE_SPACE_MAX_PARAMS (1.5e9),
BOMERGE_SPACE_MAX_REVISIONS (8), BOMERGE_SPACE_MAX_TRIALS (40), BOMERGE_SPACE_MAX_MEMORY_GB (14),
BOMERGE_SPACE_MAX_DISK_GB (40), BOMERGE_SPACE_MAX_MINUTES (60), BOMERGE_SPACE_MAX_EVAL_TOKENS (16384),
BOMERGE_SPACE_MAX_QUEUE (20), BOMERGE_SPACE_KEEP_HOURS (6: a session's merged model is deleted after
that, when the session ends, or when it starts another run). Downloads, studies and outputs go to
BOMERGE_SPACE_CACHE (default: a new temporary folder).
"""

import math
import multiprocessing
import multiprocessing.forkserver
import os
import re
import shutil
import sys
import tempfile
import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the worker module must be importable by the fork server
    sys.path.insert(0, str(HERE))

from hf_bomerge.api import plan as plan_merge  # noqa: E402
from hf_bomerge.errors import BOMergeError  # noqa: E402
from hf_bomerge.hub import open_source  # noqa: E402
from hf_bomerge.plan import Plan, PlanError, human, memory_available  # noqa: E402
from hf_bomerge.revisions import progress_key, sort_revisions  # noqa: E402

SEARCH_MODES = ["auto", "pairwise", "simplex", "family"]
EXAMPLES = ["EleutherAI/pythia-160m", "EleutherAI/pythia-410m", "EleutherAI/pythia-1b"]
POLL_S = 0.5  # how often a running search is read back (and how soon Stop takes effect)
RUN_OUTPUTS = 11  # plan, status, trials, plot, summary, baselines, generalization, image, card, json, state
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WORKERS: dict[str, multiprocessing.Process] = {}  # live search processes by run id (see `_stop`)


# ---- limits and the plan -------------------------------------------------------------------------------

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
    max_queue: int = 20
    keep_hours: float = 6.0  # a session's merged model is deleted after this long (or when it ends)

    @classmethod
    def from_env(cls) -> "Limits":
        def get(name: str, kind, default):
            text = os.environ.get(f"BOMERGE_SPACE_{name}")
            return kind(float(text)) if text else default

        d = cls()
        return cls(get("MAX_PARAMS", float, d.max_params), get("MAX_REVISIONS", int, d.max_revisions),
                   get("MAX_TRIALS", int, d.max_trials), get("MAX_MEMORY_GB", float, d.max_memory_gb),
                   get("MAX_DISK_GB", float, d.max_disk_gb), get("MAX_MINUTES", float, d.max_minutes),
                   get("MAX_EVAL_TOKENS", int, d.max_eval_tokens), get("MAX_QUEUE", int, d.max_queue),
                   get("KEEP_HOURS", float, d.keep_hours))

    def markdown(self) -> str:
        return (f"**Limits of this Space:** models up to {_count(self.max_params)} parameters · at most "
                f"{self.max_revisions} revisions per merge (a longer range is thinned evenly, both ends kept) · "
                f"at most {self.max_trials} trials · {self.max_memory_gb:g} GB of memory and "
                f"{self.max_disk_gb:g} GB of disk per run · {self.max_minutes:g} minutes per run · held-out "
                f"loss on {self.max_eval_tokens} tokens. One search runs at a time; the others wait in the "
                "queue (your position is shown). A plan that does not fit is refused before anything is "
                "downloaded. For more, run `hf-bomerge` on your own machine.")


class PlanRefused(BOMergeError):
    """The plan does not fit this Space's limits (nothing was downloaded)."""


def plan_run(model_id: str, spec: str, token: str | None, limits: Limits, cache_dir: str | Path) -> Plan:
    """`hf_bomerge.plan` (branch list, the revisions' file listings and config.json: never a weight file)
    checked against this Space's limits; `PlanRefused` / `PlanError` say which limit and what would fit."""
    model_id = (model_id or "").strip()
    if not _REPO_ID.fullmatch(model_id) or Path(model_id).expanduser().exists():
        raise PlanRefused(f"{model_id!r} is not a Hub model id; write it as ORG/NAME, e.g. EleutherAI/pythia-160m.")
    memory = int(min(limits.max_memory_gb * 1e9, memory_available("cpu")))
    plan = plan_merge(model_id, (spec or "").strip(), max_checkpoints=limits.max_revisions, token=token or False,
                      cache_dir=cache_dir, max_memory=memory)
    refuse = "Refused before downloading anything:"
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


# ---- the search process --------------------------------------------------------------------------------

# What the fork server imports once, so that a search does not spend its first seconds importing: the
# pipeline and what it imports lazily (model classes, datasets, the GP's scipy, the study's SQL storage).
# A name that does not import is skipped by multiprocessing.
PRELOAD = ["space_worker", "hf_bomerge.api", "hf_bomerge.card", "hf_bomerge.plot", "transformers.modeling_utils",
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


def _start(run_id: str, kwargs: dict, output: Path):
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


def _stop(run_id: str) -> None:
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


def _read_trials(rdb) -> list | None:
    """The study's trials (FrozenTrial) as stored so far; None while the storage is busy."""
    try:
        studies = rdb.get_all_studies()
        if not studies:
            return []
        return rdb.get_all_trials(rdb.get_study_id_from_name(studies[0].study_name), deepcopy=False)
    except Exception:  # noqa: BLE001 - locked by the writer, or being created: read again next tick
        return None


def _trial_rows(trials) -> pd.DataFrame:
    rows = []
    for t in trials:
        state = t.state.name.lower()
        if state == "waiting":
            continue
        weights = t.user_attrs.get("weights")
        rows.append({"trial": t.number, "kind": t.user_attrs.get("seed") or "GP", "state": state,
                     "loss": round(t.value, 5) if t.value is not None and math.isfinite(t.value) else None,
                     "weights": ", ".join(f"{w:.3f}" for w in weights) if weights else ""})
    return pd.DataFrame(rows, columns=["trial", "kind", "state", "loss", "weights"])


def _loss_curve(table: pd.DataFrame) -> pd.DataFrame | None:
    done = table[table["state"] == "complete"].dropna(subset=["loss"]).sort_values("trial")
    if done.empty:  # None, not an empty frame: a colored plot that starts empty draws no lines (gradio 6.31)
        return None
    best = done["loss"].cummin()
    return pd.concat([pd.DataFrame({"trial": done["trial"], "loss": done["loss"], "series": "trial loss"}),
                      pd.DataFrame({"trial": done["trial"], "loss": best, "series": "best so far"})],
                     ignore_index=True)


# ---- results ----------------------------------------------------------------------------------------------

def _baseline_table(result) -> pd.DataFrame:
    rows = [{"model": "this merge", "loss": result.loss}]
    rows += [{"model": k, "loss": v} for k, v in result.baselines.items()]
    for r in rows:
        r["perplexity"] = round(math.exp(min(r["loss"], 700)), 3)
        r["Δ loss vs merge"] = round(r["loss"] - result.loss, 5)
        r["loss"] = round(r["loss"], 5)
    return pd.DataFrame(rows, columns=["model", "loss", "perplexity", "Δ loss vs merge"])


def _generalization_table(result) -> pd.DataFrame:
    cols = ["eval set", "this merge", "best single checkpoint", "uniform average", "best single revision"]
    rows = [[name, round(r["merged"], 5), round(r["best_single"], 5), round(r["uniform"], 5),
             r.get("best_single_revision", "")] for name, r in result.generalization.items()]
    return pd.DataFrame(rows, columns=cols)


def _summary(result) -> str:
    singles = {k: v for k, v in result.baselines.items() if k in result.revisions}
    weights = " · ".join(f"`{n}` {w:.3f}" for n, w in zip(result.revisions, result.weights))
    text = (f"**Merged held-out loss {result.loss:.5f}** ({result.search} search, {result.trials} trials on "
            f"{result.dataset}).")
    if singles:
        best = min(singles, key=singles.get)
        text += f" Best single checkpoint: `{best}` {singles[best]:.5f} (Δ {result.loss - singles[best]:+.5f})."
    return f"{text}\n\nWeights (oldest first): {weights}"


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


def _forget(result) -> None:
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


# ---- the app -------------------------------------------------------------------------------------------------

def _token(text: str | None, oauth: gr.OAuthToken | None) -> str | None:
    if oauth is not None and oauth.token:
        return oauth.token
    return (text or "").strip() or None


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").replace(",", "\n").splitlines() if line.strip()]


def _hub_dataset(name: str | None, what: str) -> str | None:
    name = (name or "").strip() or None
    if name and Path(name.split("@")[0].split(":")[0]).expanduser().exists():
        raise gr.Error(f"{what} {name!r}: this Space reads Hub datasets only (ORG/NAME[:CONFIG][@SPLIT]).")
    return name


def build_app(limits: Limits | None = None, cache_dir: str | Path | None = None,
              oauth: bool | None = None) -> gr.Blocks:
    """The Space. `limits` default to `Limits.from_env()`, `cache_dir` to BOMERGE_SPACE_CACHE (else a new
    temporary folder), `oauth` to whether the Space has OAuth (OAUTH_CLIENT_ID set by `hf_oauth: true`):
    with it, "Sign in with Hugging Face"; without, a token box (local use)."""
    limits = limits or Limits.from_env()
    cache = Path(cache_dir or os.environ.get("BOMERGE_SPACE_CACHE") or tempfile.mkdtemp(prefix="bomerge-space-"))
    cache.mkdir(parents=True, exist_ok=True)
    oauth = bool(os.environ.get("OAUTH_CLIENT_ID")) if oauth is None else oauth

    def list_revisions(model_id, token_text, oauth_token: gr.OAuthToken | None):
        model_id = (model_id or "").strip()
        if not _REPO_ID.fullmatch(model_id) or Path(model_id).expanduser().exists():
            raise gr.Error(f"{model_id!r} is not a Hub model id; write it as ORG/NAME, e.g. EleutherAI/pythia-160m.")
        try:
            refs = open_source(model_id, token=_token(token_text, oauth_token) or False, cache_dir=cache).refs()
        except BOMergeError as err:
            raise gr.Error(str(err)) from None
        ordered = sort_revisions(refs)
        others = sorted(n for n in refs if progress_key(n) is None)
        table = pd.DataFrame([[i + 1, n, refs[n][:12]] for i, n in enumerate(ordered)],
                             columns=["#", "revision", "commit"])
        note = (f"**{len(ordered)} checkpoint branches** of `{model_id}` in training order"
                + (f" (not part of ranges: {', '.join(f'`{n}`' for n in others)})" if others else "")
                + ". Pick some below, or write a range such as "
                + (f"`{ordered[max(0, len(ordered) - 4)]}..{ordered[-1]}`" if ordered else "`A..B`")
                + " or `last:4`.")
        return note, table, gr.update(choices=ordered, value=[])

    def picked_to_spec(picked):
        return ",".join(sort_revisions(picked)) if picked else gr.skip()

    def run(model_id, spec, dataset, dataset_config, split, text_column, eval_sets, search_mode, trials,
            token_text, previous, oauth_token: gr.OAuthToken | None, progress=gr.Progress()):
        token = _token(token_text, oauth_token)
        trials = int(trials or 0)
        if not 1 <= trials <= limits.max_trials:
            raise gr.Error(f"Trials must be between 1 and {limits.max_trials} in this Space, got {trials}.")
        if search_mode not in SEARCH_MODES:
            raise gr.Error(f"Search mode must be one of {', '.join(SEARCH_MODES)}, got {search_mode!r}.")
        dataset = _hub_dataset(dataset, "Dataset")
        evals = [_hub_dataset(e, "Eval set") for e in _lines(eval_sets)]
        _forget(previous)  # one merged model per session on disk
        progress(0, desc="checking the plan")
        try:
            plan = plan_run(model_id, spec, token, limits, cache)
        except BOMergeError as err:
            raise gr.Error(str(err)) from None
        run_id = uuid.uuid4().hex[:12]
        run_dir = cache / "runs" / run_id
        run_dir.mkdir(parents=True)
        storage = f"sqlite:///{run_dir / 'study.db'}"
        output = cache / "outputs" / run_id / f"{plan.source.split('/')[-1]}-bomerge"
        kwargs = dict(source=plan.source, revisions=",".join(plan.revisions), max_checkpoints=0, dataset=dataset,
                      dataset_config=(dataset_config or "").strip() or None, split=(split or "").strip() or None,
                      text_column=(text_column or "").strip() or "text", eval_datasets=evals, search=search_mode,
                      trials=trials, storage=storage, token=token or False, cache_dir=str(cache),
                      max_eval_tokens=limits.max_eval_tokens, max_memory=int(limits.max_memory_gb * 1e9),
                      progress=False)
        import optuna

        rdb = optuna.storages.RDBStorage(storage)  # the schema exists before the worker opens it
        empty = _trial_rows([])
        yield (plan_markdown(plan), "Starting the search: downloading the revisions and tokenizing the held-out set…",
               empty, _loss_curve(empty), "", None, None, None, "", None, None)
        proc, receive = _start(run_id, kwargs, output)
        started, last, message = time.monotonic(), None, None
        unchanged = tuple(gr.skip() for _ in range(RUN_OUTPUTS))
        try:
            while message is None:
                if receive.poll(POLL_S):
                    message = receive.recv()
                    break
                if not proc.is_alive():
                    if receive.poll(0.1):
                        continue
                    raise gr.Error(f"The search process ended unexpectedly (exit code {proc.exitcode}); the run "
                                   "may have run out of memory. Try fewer revisions or a smaller model.")
                if time.monotonic() - started > limits.max_minutes * 60:
                    raise gr.Error(f"The run took longer than this Space's {limits.max_minutes:g} minutes "
                                   "(BOMERGE_SPACE_MAX_MINUTES) and was stopped; use fewer trials or revisions.")
                trials_now = _read_trials(rdb)
                if trials_now is None:
                    yield unchanged
                    continue
                table = _trial_rows(trials_now)
                done = int((table["state"] == "complete").sum())
                if done >= trials:
                    status = (f"{done}/{trials} trials done: evaluating the remaining baselines, writing the "
                              "merged model…")
                elif len(table):
                    best = table["loss"].min()
                    status = f"Trial {min(done + 1, trials)} of {trials} running" + (
                        f"; best loss so far {best:.5f}" if pd.notna(best) else "")
                else:
                    status = "Downloading the revisions and tokenizing the held-out set…"
                progress((done, trials), desc="trials", unit="trials")
                key = (status, table.to_json())
                if key == last:
                    yield unchanged  # a yield point every POLL_S, so that Stop is honoured at once
                    continue
                last = key
                yield (gr.skip(), status, table, _loss_curve(table), *unchanged[4:])
        finally:
            _stop(run_id)
            receive.close()
        kind, payload = message
        if kind != "ok":
            raise gr.Error(payload)
        result = payload
        table = _trial_rows(_read_trials(rdb) or [])
        yield (plan_markdown(plan), f"Done in {time.monotonic() - started:.0f} s: {result.trials} trials.", table,
               _loss_curve(table), _summary(result), _baseline_table(result), _generalization_table(result),
               _plot_image(result.output), card_preview(result.output), result.summary(), result)

    def publish(result, repo_id, private, token_text, oauth_token: gr.OAuthToken | None):
        if result is None:
            raise gr.Error("Run a search first: there is no merged model to publish yet.")
        token = _token(token_text, oauth_token)
        if not token:
            raise gr.Error("Sign in with Hugging Face to publish." if oauth else
                           "Paste a Hub token with write access in the token box to publish.")
        repo_id = (repo_id or "").strip()
        if "/" not in repo_id and repo_id:
            from huggingface_hub import whoami

            try:
                repo_id = f"{whoami(token=token)['name']}/{repo_id}"
            except Exception:  # noqa: BLE001 - the message may name the token's owner at most
                raise gr.Error("Could not tell your user name from the token; write the repo as ORG/NAME.") from None
        if not _REPO_ID.fullmatch(repo_id):
            raise gr.Error(f"{repo_id!r} is not a repo id; write NAME or ORG/NAME.")
        try:
            url = result.push_to_hub(repo_id, token=token, private=bool(private))
        except BOMergeError as err:
            raise gr.Error(str(err).replace(token, "***")) from None
        return (f"Published to **{repo_id}** ({'private' if private else 'public'}): {url}",
                card_preview(result.output), result)

    with gr.Blocks(title="hf-bomerge: merge pretraining checkpoints") as demo:
        gr.Markdown("# hf-bomerge\nMerge the intermediate checkpoints of one pretraining run (the Hub branches "
                    "`step100000` … `step143000` of Pythia) into one model, with the weights found by "
                    "Gaussian-process Bayesian optimization (Optuna `GPSampler`) on a held-out split. "
                    "The same pipeline as the `hf-bomerge` command and Python API.")
        gr.Markdown(limits.markdown())
        with gr.Row():
            if oauth:
                gr.LoginButton(scale=0)
            token_box = gr.Textbox(label="Hub token (write access, for private sources and to publish)",
                                   type="password", visible=not oauth, placeholder="hf_…",
                                   info="Used for this session only; never shown, logged or stored.")
        gr.Markdown("## 1. Model")
        with gr.Row():
            model_id = gr.Textbox(label="Model repo on the Hub", placeholder="EleutherAI/pythia-160m", scale=4,
                                  elem_id="model-id")
            list_btn = gr.Button("List revisions", scale=1)
        gr.Examples(examples=[[e] for e in EXAMPLES], inputs=[model_id], label="Examples")
        refs_note = gr.Markdown()
        refs_table = gr.Dataframe(label="Checkpoint branches (training order)", interactive=False, max_height=260)
        gr.Markdown("## 2. Revisions, held-out data, search")
        with gr.Row():
            spec = gr.Textbox(label="Revisions", value="last:2", scale=2, elem_id="spec",
                              info="A..B (training order, ends inclusive) · R1,R2,… · last:N")
            picked = gr.Dropdown(label="…or pick revisions", multiselect=True, choices=[], scale=3,
                                 info="Fills the Revisions box.")
        with gr.Row():
            dataset = gr.Textbox(label="Held-out dataset", value="Salesforce/wikitext", elem_id="dataset")
            dataset_config = gr.Textbox(label="Config", value="wikitext-2-raw-v1", elem_id="dataset-config")
            split = gr.Textbox(label="Split", value="validation", elem_id="split")
            text_column = gr.Textbox(label="Text column", value="text")
        eval_sets = gr.Textbox(label="Generalization sets (optional, not used by the search)", lines=2,
                               elem_id="eval-sets",
                               placeholder="ORG/NAME[:CONFIG][@SPLIT], one per line")
        with gr.Row():
            search_mode = gr.Radio(SEARCH_MODES, value="auto", label="Search",
                                   info="auto: pairwise for 2 revisions, simplex up to 8, family beyond")
            trials = gr.Slider(1, limits.max_trials, value=min(20, limits.max_trials), step=1,
                               label="Trials (baselines included)", elem_id="trials")
        with gr.Row():
            run_btn = gr.Button("Run", variant="primary")
            stop_btn = gr.Button("Stop", variant="stop")
        plan_md = gr.Markdown()
        status_md = gr.Markdown(elem_id="status")
        with gr.Row():
            trials_df = gr.Dataframe(label="Trials", interactive=False, max_height=360, scale=3, elem_id="trials-table")
            loss_plot = gr.LinePlot(x="trial", y="loss", color="series", title="Held-out loss per trial",
                                    height=320, scale=2)
        gr.Markdown("## 3. Result")
        summary_md = gr.Markdown(elem_id="summary")
        baselines_df = gr.Dataframe(label="Against the baselines (held-out loss)", interactive=False,
                                    elem_id="baselines")
        general_df = gr.Dataframe(label="Generalization (sets not used by the search)", interactive=False)
        search_plot = gr.Image(label="Search trace", type="pil", interactive=False, height=360)
        with gr.Accordion("Model card (README.md)", open=False):
            card_md = gr.Markdown()
        with gr.Accordion("Result as JSON (the `hf-bomerge --json` object)", open=False):
            result_json = gr.JSON(show_label=False)
        result_state = gr.State(None, time_to_live=limits.keep_hours * 3600, delete_callback=_forget)
        gr.Markdown("## 4. Publish")
        with gr.Row():
            repo_box = gr.Textbox(label="Repo name", placeholder="NAME (in your namespace) or ORG/NAME", scale=3,
                                  elem_id="repo")
            private_box = gr.Checkbox(label="Private", value=True, scale=1)
            push_btn = gr.Button("Publish to the Hub", scale=1)
        push_md = gr.Markdown()

        list_btn.click(list_revisions, [model_id, token_box], [refs_note, refs_table, picked],
                       api_name="list_revisions", concurrency_limit=None, concurrency_id="light")
        model_id.submit(list_revisions, [model_id, token_box], [refs_note, refs_table, picked],
                        api_visibility="private", concurrency_limit=None, concurrency_id="light")
        picked.change(picked_to_spec, [picked], [spec], api_visibility="private", concurrency_limit=None,
                      concurrency_id="light", show_progress="hidden")
        run_event = run_btn.click(
            run, [model_id, spec, dataset, dataset_config, split, text_column, eval_sets, search_mode, trials,
                  token_box, result_state],
            [plan_md, status_md, trials_df, loss_plot, summary_md, baselines_df, general_df, search_plot, card_md,
             result_json, result_state],
            api_name="run", concurrency_limit=1, concurrency_id="search", show_progress_on=[status_md])
        stop_btn.click(None, None, None, cancels=[run_event], api_visibility="private")
        push_btn.click(publish, [result_state, repo_box, private_box, token_box], [push_md, card_md, result_state],
                       api_name="publish", concurrency_limit=2, concurrency_id="publish")
    demo.queue(max_size=limits.max_queue, default_concurrency_limit=1)
    warm_up()
    return demo


if __name__ == "__main__":
    build_app().launch(theme=gr.themes.Soft())
