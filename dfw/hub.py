"""The Hugging Face hub, or a clear error at once when it cannot be reached.

Without `HF_HUB_OFFLINE`, `from_pretrained` of a hub id that is not cached retries for about a minute when
the network is down, printing a warning per retry. `check_hub_or_cache` answers first: the id is in the
local cache, or the hub answers a TCP connection within `HUB_TIMEOUT_S` seconds, or one ConfigError says
which and what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from .errors import ConfigError

HUB_TIMEOUT_S = 10.0  # a connection to the hub (or the proxy) that takes longer counts as unreachable


def hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached now, or None when it can: offline mode, or no TCP connection to its
    host (or to the HTTPS proxy, when one is set) within `timeout` seconds, name resolution included."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE)"
    endpoint = urlparse(constants.ENDPOINT)
    proxy = next(
        (
            os.environ[k]
            for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(k)
        ),
        None,
    )
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict[str, BaseException | bool] = {}

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as err:
            outcome["error"] = err

    probe = threading.Thread(
        target=connect, daemon=True
    )  # a thread: name resolution has no timeout of its own
    probe.start()
    probe.join(timeout)
    if outcome.get("ok"):
        return None
    via = f" through the proxy {host}:{port}" if proxy else ""
    error = outcome.get("error")
    return f"{endpoint.netloc} is unreachable{via} ({error or f'no answer within {timeout:.0f} s'})"


def check_hub_or_cache(repo_id: str, option: str) -> None:
    """Return when `repo_id` can be loaded: it is in the local cache, or the hub can be reached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid repo id: from_pretrained gives its own error
        return
    if isinstance(cached, str):
        return
    reason = hub_unreachable()
    if reason is not None:
        raise ConfigError(
            f"{option}={repo_id!r}: could not load it from the Hugging Face hub or its local cache "
            f"({reason}). Download it once with network access (it is then cached), or pass "
            f"{option}=<local directory>"
        )
