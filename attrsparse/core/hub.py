"""Local paths first, the Hugging Face hub second, and a fast answer when the hub is out of reach.

A model or data argument is decided locally before anything asks the network: an existing path
is a path; an argument written as a path (:func:`looks_like_path`) that does not exist is "no such
file or directory"; only what is left may be a hub name. Before a hub name is looked up,
:func:`hub_unreachable` opens one TCP connection to the hub (or to the proxy the environment
names) with a short timeout, so an offline machine fails at once in one line instead of after a
minute of retries.

Environment: ``HF_HUB_OFFLINE=1`` means unreachable without trying; ``HF_ENDPOINT`` changes the
host probed; ``https_proxy``/``HTTPS_PROXY``/``all_proxy``/``ALL_PROXY`` are probed instead of the
hub when set; ``ATTRSPARSE_HUB_TIMEOUT_S`` (default 3) bounds the probe.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = ("1", "true", "yes", "on")
_PROBED: dict[tuple[str, int], str | None] = {}


def looks_like_path(text: str) -> bool:
    """True when ``text`` is written as a local path rather than a hub name: absolute, starting
    with ``.`` or ``~``, holding a backslash or more than one ``/``, or whose first component is an
    existing local directory (``runs/my-export`` beside a ``runs`` folder)."""
    text = str(text).strip()
    if not text:
        return False
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1:
        return True
    head, sep, _ = text.partition("/")
    return bool(sep) and Path(head).expanduser().is_dir()


def _probe_target() -> tuple[str, int]:
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        proxy = os.environ.get(name, "").strip()
        if proxy:
            url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
            if url.hostname:
                return url.hostname, url.port or 8080
    url = urlparse(os.environ.get("HF_ENDPOINT", "").strip() or DEFAULT_ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def hub_unreachable() -> str | None:
    """None when the Hugging Face hub (or the proxy) accepts a connection, else why not, in a few
    words. Decided once per process and target."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    target = _probe_target()
    if target not in _PROBED:
        try:
            timeout = float(os.environ.get("ATTRSPARSE_HUB_TIMEOUT_S", "") or 3.0)
        except ValueError:
            timeout = 3.0
        try:
            socket.create_connection(target, timeout=timeout).close()
            _PROBED[target] = None
        except OSError as exc:  # no DNS, no route, refused, timed out
            reason = exc.strerror or str(exc) or type(exc).__name__
            _PROBED[target] = f"cannot connect to {target[0]}: {reason}"
    return _PROBED[target]
