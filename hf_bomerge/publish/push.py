"""Publishing a merged model: create_repo + one upload commit, with retries, and refusals that say what to do.
Nothing of the token is ever printed: server messages are scrubbed of it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from huggingface_hub import HfApi

from ..errors import HubError
from ..sources import is_connection_error, status_of

_log = logging.getLogger(__name__)


PUSH_IGNORE = [".*", "*/.*", "*.partial", "*.partial/*"]  # dotfiles/dot-folders, unfinished writes
PUSH_RETRY_WAIT = 1.0  # seconds before the first retry; doubles each time


def push_folder(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, max_retries: int = 3) -> str:
    """Publish ``folder`` (a merged model) to the Hub repo ``repo_id`` in ONE commit; returns the commit URL.

    As transformers' ``push_to_hub``: ``create_repo(exist_ok=True)`` (``private`` only matters when the
    repo is created), ``create_branch(revision, exist_ok=True)`` when a branch other than main is named,
    then ``upload_folder`` (dotfiles and ``*.partial`` left out). Unchanged files are not re-uploaded and
    a push of an unchanged folder creates no commit. Server errors (5xx, 429) and connection errors are
    retried ``max_retries`` times with exponential backoff; other errors are raised at once as `HubError`.
    The token is the argument, else huggingface_hub's lookup (``HF_TOKEN``, then ``hf auth login``); it is
    never printed, logged or written, and never part of an error message.
    """
    from huggingface_hub import get_token

    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder; push the folder the merge wrote (--output).")
    token = token or get_token()
    if not token:
        raise HubError(f"Pushing to {repo_id} needs a Hub token with write access: pass --token, set HF_TOKEN "
                       "or run `hf auth login`.")
    api = HfApi(token=token)
    branch = revision if revision and revision != "main" else None
    message = commit_message or "Upload merged model with hf-bomerge"

    def attempt() -> str:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True, token=token)
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=branch, commit_message=message,
                                 ignore_patterns=list(PUSH_IGNORE), token=token)
        return str(info.commit_url)

    where = f"{repo_id}{' @ ' + branch if branch else ''}"
    for tries in range(max_retries + 1):
        try:
            return attempt()
        except Exception as err:
            status = status_of(err)
            transient = status is not None and (status >= 500 or status == 429) or (
                status is None and is_connection_error(err))
            if not transient and status is None:
                raise
            reason = _scrub(f"{type(err).__name__}: {err}".splitlines()[0] if status is None
                            else f"HTTP {status} ({_server_message(err)})", token)
            if not transient:
                raise HubError(_push_refusal(where, status, reason)) from err
            if tries == max_retries:
                raise HubError(
                    f"Pushing {folder} to {where} on {api.endpoint} failed {tries + 1} times; the last error was "
                    f"{reason}. The Hub or the network is having trouble: run the same command again later "
                    "(files already uploaded are not sent again, and an unchanged folder makes no commit)."
                ) from err
            wait = PUSH_RETRY_WAIT * 2 ** tries
            _log.warning("Push to %s failed with %s; retrying in %.0f s (%d/%d).", where, reason, wait,
                         tries + 1, max_retries)
            time.sleep(wait)
    raise AssertionError("unreachable")


def _push_refusal(where: str, status: int, reason: str) -> str:
    if status == 401:
        what = ("the token was refused: check that it is valid and has write access (pass --token, set "
                "HF_TOKEN or run `hf auth login`).")
    elif status == 403:
        what = ("the token may not write there: use a namespace you own or belong to with write rights, or a "
                "token with write access to it.")
    elif status == 404:
        what = "the repository or branch was not found: check the repo id and --hub-revision."
    else:
        what = "fix what the Hub reports and push again."
    return f"The Hub refused the push to {where} with {reason}; {what}"


def _server_message(err: BaseException) -> str:
    response = getattr(err, "response", None)
    try:
        text = response.json().get("error") if response is not None else None
    except Exception:
        text = None
    return str(text or getattr(response, "reason_phrase", "") or "no details").strip()


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text
