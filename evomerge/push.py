"""``evomerge push``: publish a checkpoint evomerge wrote (or a search's winner) to the Hugging Face Hub.

A model directory is uploaded as it is (weights, config, tokenizer, ``README.md`` card,
``mergekit_config.yml``). A search's run directory uploads its ``merged/`` checkpoint at the
repository's root (so ``from_pretrained(repo_id)`` loads it) and, under ``search/``, the report,
the summaries, ``trials.csv``, the plots and the run config; never the study storage, lock or
temporary files. The upload is one commit through ``huggingface_hub`` (``create_repo``, then
``create_commit`` with the planned files: the primitive ``upload_folder`` is built on, here given
files from two folders). Offline (``HF_HUB_OFFLINE``) or without a token (``HF_TOKEN`` or ``hf auth
login``), it stops with a clear error before reading anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from evomerge.card import USAGE_PLACEHOLDER

RUN_FILES = ("report.html", "summary.md", "summary.json", "trials.csv", "best_recipe.yaml", "run_config.yaml")
RUN_FOLDERS = ("plots",)


class PushError(Exception):
    """A push that cannot go ahead; the message says why and what to do."""


@dataclass(frozen=True)
class Upload:
    """One file of the upload: where it goes in the repository and where it comes from."""

    path_in_repo: str
    local: Path


def offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no network (huggingface_hub's truthy values)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def require_hub_access() -> str:
    """The user's Hub token; a ``PushError`` when offline or logged out. Reads no run or model file."""
    from huggingface_hub import get_token

    if offline():
        raise PushError("HF_HUB_OFFLINE is set: pushing needs the network; unset it (HF_HUB_OFFLINE=0) to push")
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def check_repo_id(repo_id: str) -> None:
    """A ``PushError`` unless ``repo_id`` is a valid Hub model id ("org/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"--repo-id {repo_id!r}: {e}") from None
    if "/" not in repo_id:
        raise PushError(f"--repo-id {repo_id!r}: give the owner too, as ORG/NAME or USER/NAME")


def _files_under(folder: Path, prefix: str = "") -> list[Upload]:
    """Every file under ``folder`` except hidden ones (temporary files, locks, caches), sorted."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append(Upload(prefix + rel.as_posix(), p))
    return out


def _check_checkpoint(model_dir: Path, what: str) -> None:
    missing = [f for f in ("config.json", "README.md") if not (model_dir / f).is_file()]
    if not any(model_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PushError(f"{what}: not a complete checkpoint (missing {', '.join(missing)})")


def plan_upload(path: str | Path) -> list[Upload]:
    """The files ``evomerge push`` uploads from a model directory or a search's run directory."""
    path = Path(path)
    if not path.is_dir():
        raise PushError(f"{path}: no such directory")
    if (path / "run_config.yaml").is_file():  # a search's run directory: its winner and its report
        merged = path / "merged"
        if not merged.is_dir():
            raise PushError(f"{path}: the search wrote no checkpoint (merged/); it ran with export_checkpoint: "
                            "false or has not finalized yet; `evomerge export RUN_DIR OUT_DIR` writes one")
        _check_checkpoint(merged, str(merged))
        plan = _files_under(merged)
        plan += [Upload(f"search/{f}", path / f) for f in RUN_FILES if (path / f).is_file()]
        for folder in RUN_FOLDERS:
            if (path / folder).is_dir():
                plan += _files_under(path / folder, f"search/{folder}/")
        return plan
    _check_checkpoint(path, str(path))
    return _files_under(path)


def push(path: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None) -> str:
    """Create the repository (if needed) and upload the plan in one commit; returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    token = token or require_hub_access()
    check_repo_id(repo_id)
    plan = plan_upload(path)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    ops = [CommitOperationAdd(path_in_repo=u.path_in_repo, path_or_fileobj=upload_content(u, repo_id)) for u in plan]
    info = api.create_commit(repo_id, operations=ops, revision=revision,
                             commit_message=f"Upload {Path(path).name} with evomerge push")
    return info.commit_url


def upload_content(upload: Upload, repo_id: str) -> str | bytes:
    """What to upload for a planned file: the card with the repository id in its usage snippet, else the file."""
    if upload.path_in_repo == "README.md":
        return upload.local.read_text().replace(USAGE_PLACEHOLDER, repo_id).encode()
    return str(upload.local)
