"""Models named by hub id: ``model.path = "Qwen/Qwen2.5-0.5B-Instruct"``, as TRL's
``model_name_or_path`` takes them.

A model value is a local folder when it exists, starts with ``.``, ``~`` or ``/``, or is not
shaped like a hub id (``namespace/name``); anything else is a hub model id. A hub model is
fetched with ``huggingface_hub.snapshot_download`` into the user's hub cache (``HF_HOME`` /
``HF_HUB_CACHE``; ``HF_TOKEN`` for gated models; with ``HF_HUB_OFFLINE=1`` the cache alone is
read) and its snapshot folder is used like a local one. Only what sdpo reads or copies into its
checkpoints is fetched: the top-level JSON files (config, tokenizer, generation config,
safetensors index), the safetensors weights, a chat template file, the named templates of
``additional_chat_templates/`` and, without weights, the subfolders of a processor's other
tokenizers (``qformer_tokenizer/``, ...: ``sdpo.runner.processor_tokenizer_folders``). Other
weight formats (``*.bin``, ``*.pth``) and other subfolders (``original/``, ``onnx/``) are
skipped.

``revision`` (``model.revision``, TRL's ``model_revision``) is a branch, tag or commit of the
hub model; the folder's name in the cache is the commit it resolved to, which the run logs and
writes where a file names the model for other machines (a LoRA adapter's base model).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "HUB_FETCHES",
    "HubModelError",
    "MODEL_FILE_PATTERNS",
    "hub_snapshot",
    "is_hub_model_id",
    "resolve_model_folder",
]

# namespace/name, as the hub spells repository ids (letters, digits, "-", "_", ".")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# The files a model folder needs here (engine.checkpoint, engine.tokenize), at the top level.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "*.jinja")
# What each snapshot_download call fetches, as (allow_patterns, ignore_patterns): the top-level
# files (no original/*.pth, no onnx/), then the subfolders "*/*" would also exclude: the named
# chat templates (additional_chat_templates/tool_use.jinja, ...) and a processor's other
# tokenizers, each in a folder named after it (qformer_tokenizer/, ...), without weights
HUB_FETCHES: tuple[tuple[list[str], list[str] | None], ...] = (
    (list(MODEL_FILE_PATTERNS), ["*/*"]),
    (["additional_chat_templates/*.jinja"], None),
    (
        ["*tokenizer*/*"],
        ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.onnx"],
    ),
)


class HubModelError(ValueError):
    """A model value that is neither a local folder nor a hub model that could be fetched."""


def is_hub_model_id(value: str) -> bool:
    """True when ``value`` is shaped like a hub model id (``namespace/name``) and not like a path
    (no leading ``.``, ``~`` or ``/``, no ``..``). Existence on disk is the caller's test."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


def resolve_model_folder(
    value: str | Path,
    *,
    revision: str | None = None,
    key: str = "model.path",
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of a model value: the value itself when it is a folder or not shaped like
    a hub id (a missing folder is left for the checkpoint checks to report), else the hub
    snapshot of that model at ``revision``, fetched if needed. ``cache_dir`` and
    ``local_files_only`` are ``snapshot_download``'s (default: the user's hub cache, online
    unless ``HF_HUB_OFFLINE`` is set). Raises :class:`HubModelError` naming ``key``, the value and
    what to do."""
    text = str(value)
    path = Path(text).expanduser()
    if path.exists() or not is_hub_model_id(text):
        if revision is not None:
            raise HubModelError(
                f"{key} = {text!r} is a local folder, and a revision ({revision!r}) applies to "
                "hub models only: remove the revision, or name the hub model (namespace/name)"
            )
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise HubModelError(
            f"{key} = {text!r} is not a local folder, and reading it as a hub model needs the "
            "huggingface_hub package: install it, or give the path of a local model folder"
        ) from e
    try:
        folder = None
        for allow, ignore in HUB_FETCHES:
            folder = snapshot_download(
                repo_id=text,
                # the later fetches read the commit the first one resolved
                revision=revision if folder is None else Path(folder).name,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=allow,
                ignore_patterns=ignore,
            )
    except Exception as e:  # the hub client's errors: not found, gated, offline, HTTP, disk
        at = f" at revision {revision!r}" if revision is not None else ""
        raise HubModelError(
            f"{key} = {text!r} is not an existing folder, and fetching it as a hub "
            f"model{at} failed ({type(e).__name__}: {e}). Give the path of a local model "
            "folder, or a hub model id this machine can reach (HF_TOKEN for gated models; with "
            "HF_HUB_OFFLINE=1 only models already in the hub cache are found)"
        ) from e
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise HubModelError(
            f"{key} = {text!r}: the hub model{'' if revision is None else f' at {revision!r}'} "
            f"has no safetensors weights at its top level ({folder}); sdpo reads safetensors "
            "only. Convert the weights (transformers' save_pretrained writes safetensors) and "
            "give the converted folder"
        )
    return folder


def hub_snapshot(value: str | Path, folder: Path) -> tuple[str, str] | None:
    """(hub model id, commit) where ``folder`` is the hub snapshot ``resolve_model_folder`` gave
    for the model value ``value`` (a snapshot folder is named by its commit); None where it is
    the local folder ``value`` names. What names the model on any machine, where the snapshot's
    path names it only in this one's hub cache."""
    if folder == Path(str(value)).expanduser():
        return None
    return str(value), folder.name
