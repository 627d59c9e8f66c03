"""hf-bomerge as a Gradio Space: list a model's checkpoint branches, search merge weights, publish the merge.

A thin shell over the Python API (`hf_bomerge.search`, `MergeResult.save_pretrained/push_to_hub`); this file is
the layout and the wiring, the handlers are plain functions in handlers.py:

1. "List revisions" (light, never queued behind a search) shows the branches in training order.
2. "Run" checks the plan (`hf_bomerge.plan`: file listings and config.json only) against this Space's
   limits BEFORE downloading anything, then runs the search in a child process
   (`space_worker.py`) one at a time (`concurrency_limit=1`; gradio shows the queue position), which pushes
   every finished trial (`search(on_trial=...)`): a progress bar, a trial table, a loss plot. "Stop"
   terminates the child process.
3. The result: baselines, generalization, the model card that `save_pretrained` wrote, and "Publish",
   which pushes with the signed-in user's OAuth token (in a Space with `hf_oauth: true`) or, run
   locally, with a token pasted in a password box. Tokens are never shown, logged or written.

Limits (environment variables; defaults fit a free CPU Space): BOMERGE_SPACE_MAX_PARAMS (1.5e9),
BOMERGE_SPACE_MAX_REVISIONS (8), BOMERGE_SPACE_MAX_TRIALS (40), BOMERGE_SPACE_MAX_MEMORY_GB (14),
BOMERGE_SPACE_MAX_DISK_GB (40), BOMERGE_SPACE_MAX_MINUTES (60), BOMERGE_SPACE_MAX_EVAL_TOKENS (16384),
BOMERGE_SPACE_MAX_EVAL_SETS (3), BOMERGE_SPACE_MAX_QUEUE (20), BOMERGE_SPACE_KEEP_HOURS (6: a session's merged
model is deleted after that, when the session ends, or when it starts another run). Each run downloads into
its own folder BOMERGE_SPACE_CACHE/runs/<run>/, deleted when the run ends however it ends; merged models go to
BOMERGE_SPACE_CACHE/outputs/ (default: a new temporary folder).
"""

import os
import sys
import tempfile
import types
from pathlib import Path

import gradio as gr

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # handlers and the worker module must be importable (also by the fork server)
    sys.path.insert(0, str(HERE))

import handlers as H  # noqa: E402
from handlers import WORKERS, Context, Limits, PlanError, PlanRefused, plan_run, token_for  # noqa: E402,F401

EXAMPLES = ["EleutherAI/pythia-160m", "EleutherAI/pythia-410m", "EleutherAI/pythia-1b"]


def build_app(limits: Limits | None = None, cache_dir: str | Path | None = None,
              oauth: bool | None = None) -> gr.Blocks:
    """The Space. `limits` default to `Limits.from_env()`, `cache_dir` to BOMERGE_SPACE_CACHE (else a new
    temporary folder), `oauth` to whether the Space has OAuth (OAUTH_CLIENT_ID set by `hf_oauth: true`):
    with it, "Sign in with Hugging Face"; without, a token box (local use)."""
    limits = limits or Limits.from_env()
    cache = Path(cache_dir or os.environ.get("BOMERGE_SPACE_CACHE") or tempfile.mkdtemp(prefix="bomerge-space-"))
    cache.mkdir(parents=True, exist_ok=True)
    oauth = bool(os.environ.get("OAUTH_CLIENT_ID")) if oauth is None else oauth
    ctx = Context(limits, cache, oauth)

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
            spec = gr.Textbox(label="Revisions", value=H.DEFAULTS["revisions"], scale=2, elem_id="spec",
                              info="A..B (training order, ends inclusive) · R1,R2,… · last:N")
            picked = gr.Dropdown(label="…or pick revisions", multiselect=True, choices=[], scale=3,
                                 info="Fills the Revisions box.")
        with gr.Row():
            dataset = gr.Textbox(label="Held-out dataset", value=H.SPEC_DEFAULTS["dataset"], elem_id="dataset")
            dataset_config = gr.Textbox(label="Config", value=H.SPEC_DEFAULTS["dataset_config"], elem_id="dataset-config")
            split = gr.Textbox(label="Split", value=H.SPEC_DEFAULTS["split"], elem_id="split")
            text_column = gr.Textbox(label="Text column", value=H.DEFAULTS["text_column"])
        eval_sets = gr.Textbox(label="Generalization sets (optional, not used by the search)", lines=2,
                               elem_id="eval-sets",
                               placeholder="ORG/NAME[:CONFIG][@SPLIT], one per line")
        with gr.Row():
            search_mode = gr.Radio(H.SEARCH_MODES, value=H.DEFAULTS["search"], label="Search",
                                   info="auto: pairwise for 2 revisions, simplex up to 8, schedule beyond")
            trials = gr.Slider(1, limits.max_trials, value=min(H.DEFAULTS["trials"], limits.max_trials), step=1,
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
        result_state = gr.State(None, time_to_live=limits.keep_hours * 3600, delete_callback=H.forget)
        gr.Markdown("## 4. Publish")
        with gr.Row():
            repo_box = gr.Textbox(label="Repo name", placeholder="NAME (in your namespace) or ORG/NAME", scale=3,
                                  elem_id="repo")
            private_box = gr.Checkbox(label="Private", value=True, scale=1)
            push_btn = gr.Button("Publish to the Hub", scale=1)
        push_md = gr.Markdown()

        ctx.ui.update(refs_note=refs_note, refs_table=refs_table, picked=picked, plan_md=plan_md, status_md=status_md,
                      trials_df=trials_df, loss_plot=loss_plot, summary_md=summary_md, baselines_df=baselines_df,
                      general_df=general_df, search_plot=search_plot, card_md=card_md, result_json=result_json,
                      result_state=result_state, push_md=push_md)
        # Bound methods, not closures or partials: gradio reads the OAuthToken/Progress parameters from the
        # signature, and the handlers stay plain module-level functions of (ctx, ...).
        list_revisions, run, publish = (types.MethodType(f, ctx) for f in (H.list_revisions, H.run, H.publish))
        refs = [refs_note, refs_table, picked]
        list_btn.click(list_revisions, [model_id, token_box], refs, api_name="list_revisions", concurrency_limit=None,
                       concurrency_id="light")
        model_id.submit(list_revisions, [model_id, token_box], refs, api_visibility="private", concurrency_limit=None,
                        concurrency_id="light")
        picked.change(H.picked_to_spec, [picked], [spec], api_visibility="private", concurrency_limit=None,
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
    H.warm_up()
    return demo


if __name__ == "__main__":
    build_app().launch(theme=gr.themes.Soft())
