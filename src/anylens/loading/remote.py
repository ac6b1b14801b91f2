"""Models that run on NDIF: nnsight builds them on the meta device and ships each trace there.

Before anything touches the network for long, ``load_remote`` checks what a remote run needs — an
API key and a reachable NDIF host — so that a machine without them gets a clear error at once,
never a hang inside a trace.
"""

from __future__ import annotations

import socket
import threading
from typing import Any
from urllib.parse import urlparse

from ..core.errors import RemoteError
from ..core.model import AnyModel

#: Seconds allowed for name resolution plus the TCP connection to the NDIF host.
PREFLIGHT_TIMEOUT = 5.0

_HOW_TO_RUN_LOCALLY = "to run here instead, load the weights without remote=True (al.load(path_or_id))"


def ndif_host(remote: bool | str) -> str:
    """The NDIF URL a run goes to: a URL given as ``remote``, else nnsight's configured host."""
    from nnsight import CONFIG

    return remote if isinstance(remote, str) else CONFIG.API.HOST


def check_api_key() -> None:
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        raise RemoteError(
            "remote=True runs traces on NDIF, which needs an API key: set the NDIF_API_KEY environment "
            "variable or call nnsight.CONFIG.set_default_api_key(KEY) (keys: https://login.ndif.us); "
            + _HOW_TO_RUN_LOCALLY
        )


def check_reachable(url: str, timeout: float = PREFLIGHT_TIMEOUT) -> None:
    """Connect to the host of ``url`` within ``timeout`` seconds, or raise RemoteError.

    Name resolution has no timeout of its own, so the whole attempt runs in a daemon thread that
    is abandoned when time is up.
    """
    parsed = urlparse(url)
    if not parsed.hostname:
        raise RemoteError(f"NDIF host {url!r} is not a URL: give one like 'https://api.ndif.us'")
    port = parsed.port or (443 if parsed.scheme in ("https", "wss") else 80)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        reason: BaseException | str = f"no answer within {timeout:g} s"
    elif outcome[0] is None:
        return
    else:
        reason = outcome[0]
    raise RemoteError(
        f"cannot reach NDIF at {url} ({reason}): remote=True needs network access to it; "
        "set another host with NDIF_HOST or nnsight.CONFIG.API.HOST, or " + _HOW_TO_RUN_LOCALLY
    )


def load_remote(model_id: str, *, remote: bool | str = True, adapter: Any = None, tokenizer: Any = None) -> AnyModel:
    """An AnyModel for hub id ``model_id`` whose traces run on NDIF (or simulate it: ``remote="local"``).

    Only the config is fetched; the weights stay on the server. Computations that need weights on
    this machine (the logit lens's unembedding, direct logit attribution) raise LocalWeightsError.
    """
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    from ..registry.resolve import adapter_for

    if remote != "local":
        check_api_key()
        check_reachable(ndif_host(remote))
    try:
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        nn_model = TransformersModel(model_id, task="text-generation", tokenizer=tokenizer)
    except OSError as error:
        raise RemoteError(
            f"cannot build {model_id!r} for a remote run: its config was not found ({error}); give a hub id "
            "that NDIF serves (see https://nnsight.net/status), with network access to the hub"
        ) from error
    model = AnyModel(nn_model, adapter_for(nn_model._module, adapter), tokenizer, remote=remote)
    model.source = model_id
    return model
