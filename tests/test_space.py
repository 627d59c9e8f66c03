"""The Gradio Space (spaces/hf-bomerge/app.py), launched on 127.0.0.1 against the offline test Hub and driven
with gradio_client (listing, a full run, publishing, the queue, Stop) and with Chromium through Playwright.

Nothing here is skipped: without gradio, gradio_client, playwright or Debian's chromium the tests fail and
say what to install (CI installs them: `pip install -e ".[test]"`, `apt-get install chromium`).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, snapshot_download
from testhub import free_port

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "spaces" / "hf-bomerge"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "hf_test_space_token"
PUSH_REPO = "bomerge-tester/space-merge"


def _need(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} is not installed ({err}); install it: {install}", pytrace=False)


def _app_module():
    _need("gradio", 'pip install "gradio==6.31.0" (or pip install -e ".[test]")')
    _need("gradio_client", 'pip install gradio_client (comes with gradio; or pip install -e ".[test]")')
    if str(SPACE) not in sys.path:
        sys.path.insert(0, str(SPACE))
    return importlib.import_module("app")


class Running:
    """A launched Space: the app module, the Blocks, its URL and its cache folder."""

    def __init__(self, module, cache: Path, limits=None):
        self.module, self.cache = module, cache
        self.demo = module.build_app(limits=limits, cache_dir=cache, oauth=False)
        self.demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                         ssr_mode=False)
        self.url = self.demo.local_url

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=False)

    def close(self) -> None:
        self.demo.close()


@pytest.fixture(scope="module")
def space(test_hub, tmp_path_factory):
    module = _app_module()
    running = Running(module, tmp_path_factory.mktemp("space-cache"),
                      limits=module.Limits(max_eval_tokens=4096))
    try:
        yield running
    finally:
        running.close()


def _run_args(test_hub, trials: int = 5, spec: str = "last:2", eval_sets: str = ""):
    return (test_hub.repo_id, spec, test_hub.dataset_id, "", "validation", "text", eval_sets, "auto", trials, "")


def _rows(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


@pytest.mark.e2e
def test_list_run_and_publish(space, test_hub, tmp_path):
    from transformers import AutoModelForCausalLM

    client = space.client()
    note, table, picked = client.predict(test_hub.repo_id, "", api_name="/list_revisions")
    assert [row[1] for row in _rows(table)] == test_hub.step_branches  # training order
    assert "`main`" in note and f"{len(test_hub.step_branches)} checkpoint branches" in note

    job = client.submit(*_run_args(test_hub, eval_sets=f"{test_hub.dataset_id}@ood"), api_name="/run")
    plan, status, trials, curve, summary, baselines, general, plot, card, result = job.result()
    # Every status message the server sent, in order (gradio_client queues each one; polling job.status() sees
    # only the latest, and a trial's progress message is followed within milliseconds by its output message).
    progress = []
    while not job.communicator.updates.empty():
        update = job.communicator.updates.get_nowait()
        progress += [(p.index, p.length, p.unit) for p in getattr(update, "progress_data", None) or []]
    assert "2 revisions" in plan and test_hub.step_branches[-1] in plan
    assert status.startswith("Done") and "5 trials" in status
    assert [r[1] for r in _rows(trials)][:4] == [test_hub.step_branches[-1], test_hub.step_branches[-2],
                                                  "uniform", "ema"]  # the seeds first, then the GP
    assert sum(r[2] == "complete" for r in _rows(trials)) == 5
    assert any(length == 5 and unit == "trials" for _, length, unit in progress), progress
    live = [o for o in job.outputs() if isinstance(o, (list, tuple)) and len(o) == 10 and isinstance(o[2], dict)]
    assert len(live) >= 2  # the trial table was updated while the search ran
    assert result["revisions"] == test_hub.step_branches[-2:] and result["trials"] == 5
    # The Space reports what the CLI does, the confirm part included (the numbers themselves are checked
    # against independent measurements in test_cli.py and test_reported_numbers.py).
    assert result["eval_dtype"] == "float32" and result["confirm"]["units"] >= 2
    models = [r[0] for r in _rows(baselines)]
    assert models == ["this merge", *test_hub.step_branches[-2:], "uniform", "ema"]
    assert _rows(general)[0][0] == f"{test_hub.dataset_id}@ood"
    assert "Merged held-out loss" in summary and "Merged revisions and weights" in card
    assert all(sha in card for sha in result["shas"])

    out = Path(result["output"])
    assert out.is_relative_to(space.cache) and (out / "model.safetensors").is_file()
    # The run's downloads and study are gone; only the merged model stays (for publishing, until it expires).
    assert not _leftovers(space.cache) and not list(space.cache.rglob("pytorch_model.bin"))

    pushed_md, pushed_card = client.predict(PUSH_REPO, True, TOKEN, api_name="/publish")
    assert PUSH_REPO in pushed_md and "private" in pushed_md and TOKEN not in pushed_md
    assert f'from_pretrained("{PUSH_REPO}")' in pushed_card
    sha = HfApi().list_repo_refs(PUSH_REPO).branches[0].target_commit
    folder = Path(snapshot_download(PUSH_REPO, revision=sha, token=TOKEN, cache_dir=tmp_path / "hf"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    local = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), local.parameters()))
    assert test_hub.writer.private.get(f"model/{PUSH_REPO}") is True
    for path in [*folder.rglob("*"), *space.cache.rglob("*")]:
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.e2e
def test_runs_wait_in_the_queue_and_stop_ends_the_search(space, test_hub):
    from gradio_client.utils import Status

    first, second = space.client(), space.client()  # two users
    a = first.submit(*_run_args(test_hub, trials=4), api_name="/run")
    deadline = time.monotonic() + 60
    while a.status().code not in (Status.PROCESSING, Status.ITERATING, Status.PROGRESS):
        assert not a.done() and time.monotonic() < deadline, a.status()
        time.sleep(0.02)
    b = second.submit(*_run_args(test_hub, trials=4), api_name="/run")
    workers = space.module.WORKERS  # the app's live search processes, by run id
    queued, order, most = [], [], 0
    while not (a.done() and b.done()):
        s = b.status()
        if s.code == Status.IN_QUEUE and s.rank is not None and not order[1:]:
            queued.append((s.rank, s.queue_size))
        live = list(workers)
        most = max(most, len(live))
        order += [r for r in live if r not in order]
        time.sleep(0.01)
    assert queued and queued[0][0] == 0, queued  # first in line, behind the running search
    assert most == 1 and len(order) == 2, (most, order)  # one search process at a time: A's, then B's
    assert a.result()[1].startswith("Done") and b.result()[1].startswith("Done")

    # Stop: a long search is cancelled mid-way, and its process is gone.
    c = first.submit(*_run_args(test_hub, trials=40, spec="last:4"), api_name="/run")
    deadline = time.monotonic() + 90
    while not space.module.WORKERS:
        assert not c.done() and time.monotonic() < deadline, c.status()
        time.sleep(0.05)
    ((run_id, proc),) = space.module.WORKERS.items()
    assert not Path(a.result()[-1]["output"]).exists()  # a session keeps one merged model: its latest
    time.sleep(1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c.cancel()  # gradio_client triggers the event that cancels /run: the Stop button's
    assert not [w for w in caught if "will not stop the server" in str(w.message)]
    deadline = time.monotonic() + 20
    while proc.is_alive() or space.module.WORKERS:
        assert time.monotonic() < deadline, "Stop did not end the search process"
        time.sleep(0.1)
    while _leftovers(space.cache) or (space.cache / "outputs" / run_id).exists():  # its files go too
        assert time.monotonic() < deadline, _leftovers(space.cache)
        time.sleep(0.1)


@pytest.mark.e2e
def test_an_error_in_the_search_reaches_the_user(space, test_hub):
    from gradio_client.exceptions import AppError

    args = list(_run_args(test_hub, trials=2))
    args[2] = "bomerge-test/no-such-dataset"  # fails in the search process, after the plan
    with pytest.raises(AppError, match="no-such-dataset"):
        space.client().predict(*args, api_name="/run")
    assert not space.module.WORKERS and not _leftovers(space.cache)


@pytest.mark.e2e
def test_a_plan_too_large_is_refused_before_downloading(test_hub, tmp_path, monkeypatch):
    from gradio_client.exceptions import AppError

    module = _app_module()
    monkeypatch.setenv("BOMERGE_SPACE_MAX_PARAMS", "1000")
    cache = tmp_path / "cache"

    def weight_files() -> set[Path]:  # other tests share HF_HOME: compare before and after
        return {p for p in [*cache.rglob("*"), *Path(os.environ["HF_HOME"]).rglob("*")]
                if p.suffix in (".bin", ".safetensors")}

    before = weight_files()
    running = Running(module, cache)  # limits from the environment
    try:
        assert running.demo is not None and "1 K parameters" in module.Limits.from_env().markdown()
        with pytest.raises(AppError, match=r"Refused before downloading anything: .*BOMERGE_SPACE_MAX_PARAMS"):
            running.client().predict(*_run_args(test_hub), api_name="/run")
    finally:
        running.close()
    # The memory check (hf_bomerge.plan against the Space's limit), on the same metadata.
    with pytest.raises(module.PlanError, match=r"Refused before downloading anything: .* available"):
        module.plan_run(test_hub.repo_id, "last:8", None, module.Limits(max_memory_gb=0.001), cache)
    plan = module.plan_run(test_hub.repo_id, "last:8", None, module.Limits(), cache)
    size = (test_hub.trajectory / test_hub.step_branches[-1] / "pytorch_model.bin").stat().st_size
    assert plan.revisions == test_hub.step_branches and plan.checkpoint_bytes == size and plan.params == size // 2
    assert weight_files() == before  # config.json only: not one weight file was downloaded


def _leftovers(cache: Path) -> list[Path]:
    """What the runs of a Space left in its cache: run folders (downloads, studies) and unfinished outputs."""
    return [*(cache / "runs").glob("*"), *(p for p in cache.rglob("*") if ".partial" in p.name)]


@pytest.fixture(scope="module")
def strict(test_hub, tmp_path_factory):
    """A Space with tight limits: 3 revisions, 2 generalization sets, 0.6 seconds per run (a 40-trial search of the
    tiny model took under 6 s on a quiet machine: the time limit must land before any run could finish)."""
    module = _app_module()
    limits = module.Limits(max_revisions=3, max_eval_sets=2, max_eval_tokens=4096, max_minutes=0.01)
    running = Running(module, tmp_path_factory.mktemp("strict-cache"), limits=limits)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.e2e
def test_a_visitor_who_reads_the_code_cannot_lift_the_limits(strict, test_hub, tmp_path):
    from gradio_client.exceptions import AppError

    client, steps = strict.client(), test_hub.step_branches
    args = list(_run_args(test_hub, trials=2))
    for spec in (",".join(steps[:4]), ",".join(steps)):  # an explicit list is never thinned: refused
        args[1] = spec
        with pytest.raises(AppError, match=r"Refused before downloading anything: .* selects \d revisions; this "
                                           r"Space merges at most 3 \(BOMERGE_SPACE_MAX_REVISIONS\)"):
            client.predict(*args, api_name="/run")
    for spec in (f"{steps[0]}..{steps[-1]}", "last:8", f"{steps[0]}.."):  # ranges and last:N are thinned to 3
        plan = strict.module.plan_run(test_hub.repo_id, spec, None, strict.module.Limits(max_revisions=3),
                                      tmp_path / "plans")
        assert len(plan.revisions) == 3 and plan.revisions[-1] == steps[-1], (spec, plan.revisions)
    args[1] = "last:2"
    notes = tmp_path / "notes:v1.jsonl"  # HeldOutSpec.parse reads the whole string as a path
    notes.write_text('{"text": "a file on the Space\'s machine, not on the Hub"}\n' * 50)
    for field, value in ((2, str(notes)), (6, str(notes)), (2, "nowhere/.."), (6, f"{test_hub.dataset_id}\n~/x")):
        hostile = list(args)
        hostile[field] = value
        with pytest.raises(AppError, match="reads Hub datasets only"):
            client.predict(*hostile, api_name="/run")
    args[6] = "\n".join(f"{test_hub.dataset_id}@ood" for _ in range(3))
    with pytest.raises(AppError, match=r"3 generalization sets .* at most 2 \(BOMERGE_SPACE_MAX_EVAL_SETS\)"):
        client.predict(*args, api_name="/run")
    assert not _leftovers(strict.cache) and not list(strict.cache.rglob("*.bin"))


@pytest.mark.e2e
def test_a_run_stopped_by_the_time_limit_leaves_no_files(strict, test_hub):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="longer than this Space's 0.01 minutes"):
        strict.client().predict(*_run_args(test_hub, trials=40, spec="last:3"), api_name="/run")
    assert not strict.module.WORKERS
    assert not _leftovers(strict.cache) and not list((strict.cache / "outputs").glob("*"))
    assert not [p for p in strict.cache.rglob("*") if p.suffix in (".bin", ".safetensors", ".db")]


@pytest.mark.e2e
def test_a_hub_dataset_is_read_only_as_far_as_the_token_cap(space, test_hub):
    """A large sharded dataset (as big Hub datasets are): the search streams it and stops at the Space's token
    cap; nothing of it is written to disk. The test Hub answers Range requests as the Hub does (hubwrite.py)."""
    import json

    rows = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 40}) for i in range(24_000)]
    shards = {f"data/validation-{k:02d}.jsonl": "\n".join(rows[k::8]) + "\n" for k in range(8)}
    card = ("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: validation\n"
            "    path: data/validation-*.jsonl\n---\n")
    test_hub.add_dataset_repo("bomerge-test/large-heldout", {"main": {"README.md": card, **shards}})
    total = sum(len(t.encode()) for t in shards.values())
    home = Path(os.environ["HF_HOME"])

    def big_files() -> set[Path]:
        return {p for p in [*home.rglob("*"), *space.cache.rglob("*")]
                if p.is_file() and p.stat().st_size > 2e6 and "outputs" not in p.parts}  # not merged models

    before, served = big_files(), dict(test_hub.writer.served)
    args = list(_run_args(test_hub, trials=2))
    args[2] = "bomerge-test/large-heldout"
    result = space.client().predict(*args, api_name="/run")[-1]
    read = sum(n - served.get(path, 0) for path, n in test_hub.writer.served.items() if "large-heldout" in path
               and "/data/validation-" in path)
    assert result["trials"] == 2 and total > 30e6
    assert read < total / 4, (read, total)  # old code: every shard, whole
    assert big_files() == before  # nothing of it on disk (old code: the shards and their Arrow files)


def test_in_a_space_sign_in_replaces_the_token_box(tmp_path, monkeypatch):
    """With OAuth (a Space with `hf_oauth: true`): a LoginButton, no token box, and the events take the
    signed-in user's token (gradio injects `gr.OAuthToken | None` parameters)."""
    import gradio as gr
    import gradio.oauth
    from gradio.utils import oauth_token_requirement

    module = _app_module()
    # Outside a Space gradio mocks the login with the machine's own Hub login, which the tests do not have.
    monkeypatch.setattr(gradio.oauth, "_get_mocked_oauth_info", lambda: {"access_token": "unused"})
    demo = module.build_app(cache_dir=tmp_path, oauth=True)
    assert demo.expects_oauth
    boxes = [b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.type == "password"]
    assert len(boxes) == 1 and boxes[0].visible is False
    fns = {f.api_name: f.fn for f in demo.fns.values() if f.api_name}
    assert {name: oauth_token_requirement(fns[name]) for name in ("list_revisions", "run", "publish")} == {
        "list_revisions": "optional", "run": "optional", "publish": "optional"}
    signed_in = gr.OAuthToken(token="hf_oauth_user", scope="openid profile write-repos manage-repos", expires_at=0)
    assert module.token_for("", signed_in) == "hf_oauth_user" and module.token_for(" hf_box ", None) == "hf_box"
    assert module.token_for("", None) is None


@pytest.mark.e2e
def test_browser_lists_runs_and_shows_the_result(space, test_hub, tmp_path):
    sync_api = _need("playwright.sync_api", 'pip install playwright (no `playwright install`: the test uses '
                                            'Debian\'s chromium)')
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing; install Debian's chromium: apt-get install -y chromium", pytrace=False)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 2000})
            page.goto(space.url)
            page.locator("#model-id textarea").fill(test_hub.repo_id)
            page.get_by_role("button", name="List revisions").click()
            page.get_by_text(f"{len(test_hub.step_branches)} checkpoint branches").wait_for(timeout=30_000)
            page.locator("#spec textarea").fill("last:3")
            page.locator("#dataset textarea").fill(test_hub.dataset_id)
            page.locator("#dataset-config textarea").fill("")
            page.locator("#eval-sets textarea").fill(f"{test_hub.dataset_id}@ood")
            trials = page.locator("#trials input[type=number]")
            trials.fill("6")
            trials.press("Enter")
            page.get_by_role("button", name="Run", exact=True).click()
            page.locator("#summary").get_by_text("Merged held-out loss").wait_for(timeout=120_000)
            page.locator("#baselines").get_by_text("this merge").last.wait_for(timeout=10_000)
            assert page.locator("#status").get_by_text("Done in").count() == 1
            assert page.locator("#trials-table").get_by_text("uniform").count() >= 1
            shot = page.screenshot(full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print("screenshot of the failure:", tmp_path / "failure.png")
            raise
        finally:
            browser.close()
    (tmp_path / "screenshot.png").write_bytes(shot)
    if os.environ.get("BOMERGE_UPDATE_SCREENSHOT"):  # refresh the README's picture on purpose only
        (SPACE / "screenshot.png").write_bytes(shot)


@pytest.mark.e2e
def test_build_space_assembles_a_self_contained_folder(tmp_path):
    from huggingface_hub import SpaceCard

    gradio = _need("gradio", 'pip install "gradio==6.31.0" (or pip install -e ".[test]")')
    sys.path.insert(0, str(ROOT / "spaces"))
    try:
        build_space = importlib.import_module("build_space")
    finally:
        sys.path.remove(str(ROOT / "spaces"))
    out = build_space.build(tmp_path / "space")  # verifies the folder imports its own hf_bomerge + template
    assert {"app.py", "space_worker.py", "README.md", "requirements.txt", "screenshot.png"} <= {
        p.name for p in out.iterdir()}
    assert (out / "hf_bomerge" / "model_cards" / "__init__.py").is_file()
    template = (ROOT / "model_cards" / "bomerge.md").read_text()
    assert (out / "hf_bomerge" / "model_cards" / "bomerge.md").read_text() == template
    assert not list(out.rglob("__pycache__"))
    card = SpaceCard.load(out / "README.md").data
    assert (card.sdk, card.sdk_version, card.app_file) == ("gradio", gradio.__version__, "app.py")
    assert card.hf_oauth is True and set(card.hf_oauth_scopes) == {"write-repos", "manage-repos"}
    assert card.title and card.emoji and card.colorFrom and card.colorTo and card.pinned is False
    with pytest.raises(build_space.BuildError, match="not empty"):
        build_space.build(out)
    short = tmp_path / "requirements.txt"
    short.write_text("torch\n")
    with pytest.raises(build_space.BuildError, match="lacks .*transformers"):
        build_space.check_requirements(short)
