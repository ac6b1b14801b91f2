"""Whether a hub id can be loaded here: from the local Hugging Face cache, or from a hub that
answers. Checked before loading, because an unreachable hub otherwise costs many seconds of
retries and ends in a raw OSError."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any
from urllib.parse import urlparse

from ..core.errors import ModelSourceError

_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set, read now: huggingface_hub reads them
    once, at import."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds. It runs in a daemon
    thread because name resolution ignores socket timeouts."""
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((hub_host(), 443), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s config."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub client rejects is not cached
        return False


def hub_access(repo_id: str) -> dict[str, Any]:
    """Extra ``from_pretrained`` arguments for loading ``repo_id``, or a :class:`ModelSourceError`
    when it is neither cached nor reachable."""
    offline = hub_offline()
    if not offline and hub_reachable():
        return {}
    if in_hub_cache(repo_id):
        return {"local_files_only": True}
    from .locate import local_names

    reason = "HF_HUB_OFFLINE is set" if offline else f"{hub_host()} cannot be reached"
    raise ModelSourceError(
        f"model {repo_id!r} is not available locally (not in the Hugging Face cache) and {reason}; "
        f"load a local model instead: {', '.join(local_names())}, a saved model directory or a .gguf file"
    )
