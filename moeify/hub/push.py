"""`moeify.push_to_hub(model, repo_id, monitors=...)`: weights, card and diagnostics in ONE commit.

Everything is staged in a temporary directory first (`stage_folder`): the `save_pretrained`
files, README.md (the model card) and, with monitors, `diagnostics/` (history.jsonl,
events.jsonl, summary.json and the routing plots the card embeds). Then the repo is created
(`exist_ok=True`) and the folder goes up as one `create_commit`, so the card and its plots
never disagree: a commit lands whole or not at all. `create_commit` rather than `upload_folder`:
with `hf_xet` installed (huggingface_hub >= 2), `upload_folder` streams a folder in several
commits (a new one every ~250 files, 100 MB of small files or 5 minutes), so a long upload of
large shards could publish the weights and the card apart, and a failure half of them.

The user's files are only read: the model, a run directory passed as `monitors` (copied), and
no local directory is written except the temporary one, removed on the way out.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from moeify.atomic import write_text
from moeify.hub.card import DIAGNOSTICS, as_run, model_card
from moeify.hub.companions import Saveable, check_savers
from moeify.hub.save import save_pretrained

README = "README.md"
RUN_FILES = ("history.jsonl", "events.jsonl", "summary.json")


class PushError(RuntimeError):
    """A push to the Hub failed; the message says which step, why, and what to do. Nothing was
    committed and no local file was changed."""


def write_run(run: Any, directory: Path) -> dict[str, Any]:
    """Copy (a run directory) or write (a runner / read_run dict) the run files; returns the run."""
    from moeify.sinks.jsonl import JsonlSink

    data = as_run(run)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(run, (str, os.PathLike)):
        for name in RUN_FILES:
            if (Path(run) / name).is_file():
                shutil.copyfile(Path(run) / name, directory / name)
        return data
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)  # JsonlSink appends
    sink = JsonlSink(directory, main_process_only=False)
    for record in data["history"]:
        sink.write(record)
    sink.close(data["summary"])
    return data


def write_plots(run: dict[str, Any], directory: Path) -> list[str]:
    """The routing plots of the run in `directory`; their file names (none without matplotlib)."""
    from moeify.hub.plots import routing_plots

    try:
        return [path.name for path in routing_plots(run, directory)]
    except ImportError as error:  # matplotlib is optional: the card then has no plots
        warnings.warn(f"moeify: routing plots skipped ({error})", stacklevel=3)
        return []


def write_card(
    model: nn.Module,
    run_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
) -> list[str]:
    """The card of `model` with the run of `run_dir` at `output`, and beside it diagnostics/ with
    the run files and the plots the card links to (`moeify card`). Returns the plots' names."""
    output = Path(output)
    diagnostics = output.parent / DIAGNOSTICS
    if diagnostics.resolve() == Path(run_dir).resolve():
        run = as_run(run_dir)  # the run is already where the card links to
    else:
        run = write_run(run_dir, diagnostics)
    plots = write_plots(run, diagnostics) if run["history"] else []
    card = model_card(model, run=run, base_model=base_model, repo_id=repo_id, plots=plots)
    write_text(output, str(card))  # crash-safe: an earlier card stays whole until this one is
    return plots


def stage_folder(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    monitors: Any = None,
    base_model: str | None = None,
    repo_id: str | None = None,
    tokenizer: Saveable | None = None,
    processor: Saveable | None = None,
) -> list[str]:
    """Write what `push_to_hub` uploads into `directory`: the checkpoint (with its tokenizer /
    processor files), README.md and (with `monitors`: a MonitorRunner, a run directory or a
    read_run dict) diagnostics/. Returns the files written, relative to `directory`, in upload
    order (README.md last)."""
    directory = Path(directory)
    save_pretrained(model, directory, tokenizer=tokenizer, processor=processor)
    run, plots = None, None
    if monitors is not None:
        run = write_run(monitors, directory / DIAGNOSTICS)
        plots = write_plots(run, directory / DIAGNOSTICS) if run["history"] else []
    card = model_card(model, run=run, base_model=base_model, repo_id=repo_id, plots=plots)
    card.save(directory / README)
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [f for f in files if f != README] + [README]


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _advice(error: BaseException, endpoint: str) -> str:
    """Why a Hub call failed and what to do, in one sentence."""
    status = _status(error)
    detail = " ".join(str(error).split())[:300]
    # By class name: huggingface_hub's transport is httpx2 (2.x), httpx or requests (older).
    classes = {cls.__name__ for cls in type(error).__mro__}
    if "OfflineModeIsEnabled" in classes:
        return f"huggingface_hub is in offline mode (HF_HUB_OFFLINE=1): unset it to push ({detail})"
    if status in (401, 403):
        return (
            f"the Hub refused the credentials (HTTP {status}: {detail}); pass token= a write token, "
            "or log in with `hf auth login`, and check that it may write to this namespace"
        )
    if status == 404:
        return f"the repo was not found or is not writable with this token (HTTP 404: {detail})"
    if status is not None and status >= 500:
        return f"the Hub had a server error (HTTP {status}: {detail}); try again later"
    if status is not None:
        return f"the Hub answered HTTP {status}: {detail}"
    if classes & {"TransportError", "OSError"}:
        return f"could not reach {endpoint} ({type(error).__name__}: {detail}); check the network and HF_ENDPOINT"
    return f"{type(error).__name__}: {detail}"


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    monitors: Any = None,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    tokenizer: Saveable | None = None,
    processor: Saveable | None = None,
):  # -> huggingface_hub.CommitInfo
    """Upload a moeify-converted model to the Hub in one commit; returns the `CommitInfo` (a
    str: the commit URL; `.oid` is the commit hash).

    The commit holds the `save_pretrained` files (with the tokenizer / chat template / processor
    files: `tokenizer` / `processor` if given, else those found beside the model's source, as
    `moeify.save_pretrained` does), README.md (`moeify.model_card`) and, when
    `monitors` is given (a `MonitorRunner`, a `JsonlSink` run directory or a `read_run` dict),
    diagnostics/ with history.jsonl, events.jsonl, summary.json and the routing plots the card
    shows. `token`: a write token (default: the saved login / HF_TOKEN); `endpoint`: another Hub
    (default: HF_ENDPOINT). Pull it back with `moeify.from_pretrained(repo_id)`. A failed push
    raises `PushError`: nothing was committed and no local file was changed.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"moeify.push_to_hub: {repo_id!r} is not a Hub repo id (like 'user/name'): {error}") from None
    check_savers("moeify.push_to_hub", tokenizer=tokenizer, processor=processor)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="moeify-push-") as tmp:
        files = stage_folder(
            model,
            tmp,
            monitors=monitors,
            base_model=base_model,
            repo_id=repo_id,
            tokenizer=tokenizer,
            processor=processor,
        )
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True)
        except Exception as error:
            raise PushError(
                f"moeify.push_to_hub: creating the repo {repo_id} on {api.endpoint} failed: "
                f"{_advice(error, api.endpoint)}. Nothing was uploaded and no local file was changed."
            ) from error
        operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=os.path.join(tmp, f)) for f in files]
        message = commit_message or f"Upload moeify MoE model ({len(files)} files)"
        try:
            return api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
        except Exception as error:
            raise PushError(
                f"moeify.push_to_hub: committing {len(files)} files to {url} failed: {_advice(error, api.endpoint)}. "
                "Nothing was committed (a commit lands whole or not at all) and no local file was changed; "
                "push again once the cause is fixed."
            ) from error


__all__ = ["PushError", "push_to_hub", "stage_folder", "write_card", "write_plots", "write_run"]
