"""Sharing a run's model: ``final/`` (a Hugging Face model directory with its model card) to
a hub repository through ``huggingface_hub``.

Everything that can be checked here is checked before the first request: the directory is a
model, the hub is not switched off (``HF_HUB_OFFLINE``), a token is there. The upload is one
commit (:meth:`huggingface_hub.HfApi.create_commit`) of the files chosen here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

ADAPTER_DIR = "adapter"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # how huggingface_hub reads a boolean variable


class PushError(ValueError):
    """Nothing was sent: the message says what to fix, in one line."""


@dataclass(frozen=True)
class Upload:
    """What a push sends: each file's path in the repository and on disk, and the card."""

    files: dict[str, Path]
    card: str  # README.md's text


def model_directory(run_dir: str | os.PathLike) -> Path:
    """``RUN_DIR/final`` (or RUN_DIR itself when it is the model directory)."""
    path = Path(run_dir)
    final = path / "final" if (path / "final").is_dir() else path
    if not (final / "config.json").is_file() or not any(final.glob("*.safetensors")):
        raise PushError(f"{path}: no model to push (expected final/ with config.json and "
                        "*.safetensors: a run that has finished)")
    return final


def adapter_card(card: str) -> str:
    """The merged model's card made the adapter's: ``library_name: peft`` and a ``lora`` tag,
    and a first line saying what the repository holds."""
    head, body = "", card
    if card.startswith("---\n") and "\n---\n" in card[4:]:
        head, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(head) or {}
    meta["library_name"] = "peft"
    meta["tags"] = [*(meta.get("tags") or []), "lora"]
    note = ("This repository holds the LoRA adapter of the run (load it on `base_model` with "
            "`peft.PeftModel.from_pretrained`); the merged model is pushed without "
            "`--adapter`.\n\n")
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{note}{body.lstrip()}"


def plan_upload(run_dir: str | os.PathLike, adapter: bool = False) -> Upload:
    """The files of ``final/`` (LoRA: the merged model; ``adapter``: the adapter alone, from
    ``final/adapter``), each under its path in the repository, with the model card."""
    final = model_directory(run_dir)
    source = final / ADAPTER_DIR if adapter else final
    if adapter and not (source / "adapter_config.json").is_file():
        raise PushError(f"{final}: no {ADAPTER_DIR}/ (--adapter is for a LoRA run)")
    files = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    if not adapter:
        files = {k: v for k, v in files.items() if not k.startswith(f"{ADAPTER_DIR}/")}
    card_path = final / "README.md"
    card = card_path.read_text(encoding="utf-8") if card_path.is_file() else ""
    if adapter and card:
        card = adapter_card(card)
    files.pop("README.md", None)  # sent as ``card``
    return Upload(files, card)


def hub_ready(token: str | None = None) -> str:
    """The token to push with; PushError if the hub is switched off or there is no token."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES:
        raise PushError("the hub is switched off (HF_HUB_OFFLINE is set): unset it to push")
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    return token


def push(run_dir: str | os.PathLike, repo_id: str, adapter: bool = False,
         private: bool = False, revision: str | None = None, token: str | None = None,
         commit_message: str | None = None) -> str:
    """Push a run's model to ``repo_id`` (created if missing) as one commit; returns the
    commit's URL. Every local check runs before the first request."""
    from huggingface_hub import CommitOperationAdd, HfApi

    try:  # huggingface_hub 1.x speaks httpx; its HTTP errors derive from httpx's
        from httpx import HTTPError as NetworkError
    except ImportError:  # older ones requests, whose errors are OSErrors
        NetworkError = OSError

    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise PushError(f"{repo_id!r}: expected a repository id, e.g. user/my-model")
    upload = plan_upload(run_dir, adapter)
    token = hub_ready(token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                  for name, path in upload.files.items()]
    if upload.card:
        operations.append(CommitOperationAdd(path_in_repo="README.md",
                                             path_or_fileobj=upload.card.encode()))
    api = HfApi(token=token)
    what = "LoRA adapter" if adapter else "model"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload {what} (nftune)")
    except (NetworkError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PushError(f"{repo_id}: the hub refused or could not be reached ({first})"
                        ) from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo_id}")
