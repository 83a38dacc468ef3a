"""Model ids as well as directories: `--model Qwen/Qwen3-0.6B` resolves through the Hugging Face cache.

Why one function: every command that takes a model (generate, chat, serve, eval, the trainers' --init,
merge) and `Model.from_pretrained` pass the string through `resolve_model_dir`, so the rule is the same
everywhere. An existing directory always wins; a string shaped like `owner/name` (optionally
`@revision`) that is not a directory is a hub id, downloaded once into huggingface_hub's cache (only the
files a model directory needs) and read from there afterwards; with HF_HUB_OFFLINE set only the cache is
looked at. Anything else comes back unchanged, so the caller's own "does not exist" error speaks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tinychat.errors import UserError

HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?", re.ASCII)
# config, weights (single or sharded), generation defaults, tokenizer and chat template; a LoRA adapter's files
MODEL_FILES = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "adapter_config.json",
]


def hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `name` is shaped like `owner/name[@revision]`, else None."""
    m = HUB_ID.fullmatch(name)
    return (m["repo"], m["revision"]) if m else None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, with huggingface_hub's notion of true."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local directory for a model directory or a Hugging Face model id (downloaded if need be)."""
    p = Path(name_or_path)
    parsed = None if p.is_dir() else hub_id(str(name_or_path))
    if parsed is None:
        return p
    return Path(download(*parsed))


def download(repo: str, revision: str | None = None) -> str:
    """snapshot_download of a model's files into the HF cache; one UserError sentence when that fails."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    name = repo + (f"@{revision}" if revision else "")
    offline = hub_offline()
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=offline)
    except (RepositoryNotFoundError, HFValidationError):
        raise UserError(
            f"{name} is neither a directory nor a model on the Hugging Face Hub (a private or gated one needs "
            "`hf auth login`)."
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        fix = "connect, unset HF_HUB_OFFLINE and run again" if offline else "connect to the internet and run again"
        raise UserError(
            f"model {name} is not in the Hugging Face cache and {why}: {fix}, or pass a model directory."
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"downloading {name} from the Hugging Face Hub failed: {str(e).splitlines()[0]}.") from None


def model_name(path: Path) -> str:
    """`owner/name` for a snapshot in the HF cache (models--owner--name/snapshots/COMMIT), else the folder name."""
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return path.name
