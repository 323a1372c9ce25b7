"""Pretrained weights from the Hugging Face hub (or open_clip's sources) without ever hanging.

Every load of a hub *name* goes through :func:`hf_access` (transformers models and tokenizers) or
:func:`require_open_clip` (open_clip pretrained tags). Before anything touches the network they
decide, in well under a second when the answer is local, where the files will come from:

1. a local directory (or ``embedded:NAME``): nothing to do;
2. the files are in the local cache: load them; when the hub cannot be reached (``HF_HUB_OFFLINE``
   set, or a short TCP probe fails) the load runs in offline mode, so no ETag request waits;
3. not cached and the hub reachable: download, with short HTTP timeouts;
4. not cached and not reachable: :class:`registry.ComponentError` at once, one line naming the
   model, where it looked, and how to pre-download it or point at a local directory.

The probe opens one TCP connection to the hub's host (or to ``HTTPS_PROXY``'s) in a daemon thread
and gives up after :data:`PROBE_TIMEOUT` seconds, DNS included; its answer is memoised per host.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from registry import ComponentError

logger = logging.getLogger(__name__)

#: Seconds the reachability probe may take (TCP connect, DNS included) before the hub counts as unreachable.
PROBE_TIMEOUT = float(os.environ.get("DCAP_HUB_PROBE_TIMEOUT", "3"))
#: HTTP timeouts (seconds) given to huggingface_hub unless the user set HF_HUB_*_TIMEOUT.
ETAG_TIMEOUT = 5
DOWNLOAD_TIMEOUT = 10
EMBEDDED_PREFIX = "embedded:"
_TRUE = {"1", "on", "yes", "true"}
_probed: dict[tuple[str, int], bool] = {}


# --------------------------------------------------------------------------------------------
# Where things are
# --------------------------------------------------------------------------------------------
def offline_requested() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set to a true value now."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return False


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME/hub`` / ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def hf_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def is_local(name: str | os.PathLike[str]) -> bool:
    """A local directory/file or an ``embedded:`` asset: loading it never needs the network."""
    text = str(name)
    return text.startswith(EMBEDDED_PREFIX) or Path(text).expanduser().exists()


def hf_cached(repo_id: str, filename: str | None = None) -> bool:
    """Whether the HF cache holds a snapshot of ``repo_id`` (and ``filename`` in it, if given)."""
    folder = hf_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not folder.is_dir():
        return False
    snapshots = [p for p in folder.iterdir() if p.is_dir()]
    if filename is None:
        return any(any(s.iterdir()) for s in snapshots)
    return any((s / filename).exists() for s in snapshots)


# --------------------------------------------------------------------------------------------
# Is the hub reachable?
# --------------------------------------------------------------------------------------------
def _probe_target(url: str) -> tuple[str, int]:
    """(host, port) the HTTP client will connect to for ``url``: the proxy's when one is set."""
    parsed = urlparse(url)
    proxy = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
             if parsed.scheme == "https" else os.environ.get("HTTP_PROXY") or os.environ.get("http_proxy"))
    no_proxy = os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or ""
    if proxy and not any(parsed.hostname and parsed.hostname.endswith(h.strip().lstrip("."))
                         for h in no_proxy.split(",") if h.strip()):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return parsed.hostname or "", port


def reachable(url: str | None = None, timeout: float | None = None) -> bool:
    """Whether a TCP connection to ``url``'s host (default: the HF endpoint) opens within
    ``timeout`` seconds. Runs in a daemon thread so that a stuck DNS lookup cannot hang us."""
    host, port = _probe_target(url or hf_endpoint())
    if not host:
        return False
    key = (host, port)
    if key in _probed:
        return _probed[key]
    limit = PROBE_TIMEOUT if timeout is None else timeout
    result: list[bool] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=limit):
                result.append(True)
        except Exception:  # noqa: BLE001 - any failure to connect means "unreachable"
            result.append(False)

    worker = threading.Thread(target=connect, name=f"probe-{host}", daemon=True)
    start = time.monotonic()
    worker.start()
    worker.join(limit + 0.5)
    ok = bool(result and result[0])
    logger.debug("probe %s:%d -> %s in %.2f s", host, port, ok, time.monotonic() - start)
    _probed[key] = ok
    return ok


def hub_available() -> bool:
    """Not in offline mode and the hub (or its proxy) answers a TCP connection."""
    return not offline_requested() and reachable()


def _short_timeouts() -> None:
    """Short huggingface_hub HTTP timeouts unless the user chose their own."""
    from huggingface_hub import constants

    if not os.environ.get("HF_HUB_ETAG_TIMEOUT"):
        constants.HF_HUB_ETAG_TIMEOUT = ETAG_TIMEOUT
    if not os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT"):
        constants.HF_HUB_DOWNLOAD_TIMEOUT = DOWNLOAD_TIMEOUT


@contextmanager
def _offline_mode() -> Iterator[None]:
    """Force huggingface_hub (and so transformers) to read only the cache inside the block."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _why_unreachable(url: str | None = None) -> str:
    if offline_requested():
        return "HF_HUB_OFFLINE=1 is set"
    host, port = _probe_target(url or hf_endpoint())
    return f"{host}:{port} cannot be reached (probe timed out or was refused after <= {PROBE_TIMEOUT:g} s)"


def _first_line(error: BaseException) -> str:
    """The whole message on one line (a multi-line message is joined, never cut)."""
    text = str(error).strip()
    return " ".join(text.split()) if text else type(error).__name__


# --------------------------------------------------------------------------------------------
# Transformers names
# --------------------------------------------------------------------------------------------
_LOCAL_HINT = "save it with save_pretrained(DIR) and pass that directory instead of the name"


def missing_hf_message(name: str, what: str, local_hint: str | None = None) -> str:
    """The one-line message for a hub model that is neither cached nor reachable; ``local_hint``
    says how to pass a local copy instead (default: a ``save_pretrained`` directory)."""
    return (f"{what} {name!r} is not in the Hugging Face cache ({hf_cache_dir()}) and the hub "
            f"({hf_endpoint()}) is unavailable: {_why_unreachable()}. Pre-download it on a "
            f"connected machine with `hf download {name}` (`huggingface-cli download` before "
            f"huggingface_hub 1.0; same HF_HOME), or {local_hint or _LOCAL_HINT}")


@contextmanager
def hf_access(name: str | os.PathLike[str] | None, what: str = "model",
              download: bool = True, local_hint: str | None = None) -> Iterator[None]:
    """Guard a ``from_pretrained(name)`` block so that it can never hang on the network.

    ``download=False`` says the block needs no hub file at all (a model built from a built-in
    config): nothing is checked. A local directory, a file or ``embedded:NAME`` passes through.
    A cached hub name loads in offline mode when the hub is unavailable; an uncached one fails
    at once with :func:`missing_hf_message`. Connection and not-found errors raised inside the
    block become one-line :class:`ComponentError`s naming ``name``; ``local_hint`` is the way
    to a local copy that the message offers.
    """
    if name is None or not download or is_local(name):
        yield
        return
    name = str(name)
    _short_timeouts()
    cached = hf_cached(name)
    online = hub_available()
    if not cached and not online:
        raise ComponentError(missing_hf_message(name, what, local_hint))
    try:
        if online:
            yield
        else:
            logger.info("%s %s: hub unavailable, loading from the cache %s", what, name, hf_cache_dir())
            with _offline_mode():
                yield
    except ComponentError:
        raise
    except OSError as error:  # transformers: not found / cannot connect / not a valid identifier
        hint = missing_hf_message(name, what, local_hint) if not online else (
            f"{what} {name!r} could not be loaded from the hub ({hf_endpoint()}) or the cache "
            f"({hf_cache_dir()}): {_first_line(error)}. Check the name, or pass a local directory")
        raise ComponentError(hint) from error


# --------------------------------------------------------------------------------------------
# open_clip names
# --------------------------------------------------------------------------------------------
def open_clip_cache_dirs() -> list[Path]:
    """Where open_clip keeps downloads: the HF cache (``hf_hub`` weights) and ``~/.cache/clip`` (URLs)."""
    return [hf_cache_dir(), Path(os.path.expanduser("~/.cache/clip"))]


def _open_clip_sources(model: str, pretrained: str) -> tuple[list[str], list[Path], str | None]:
    """(HF repos, URL cache files, URL) that open_clip would read for ``model``/``pretrained``.

    open_clip prefers the ``hf_hub`` entry of a pretrained config; only configs without one
    download their ``url`` into ``~/.cache/clip``.
    """
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
    if cfg.get("hf_hub"):
        parts = cfg["hf_hub"].rstrip("/").split("/")
        return ["/".join(parts[:2])], [], None
    url = cfg.get("url") or None
    if url:
        return [], [Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)], url
    return [], [], None


@contextmanager
def open_clip_access(model: str, pretrained: str | None) -> Iterator[None]:
    """Guard ``open_clip.create_model_and_transforms(model, pretrained)`` like :func:`hf_access`.

    Local checkpoints, ``local-dir:``/``embedded:`` models, random weights (``pretrained=None``)
    and names open_clip does not know pass through (open_clip reports those itself).
    """
    hub_model = model[len("hf-hub:"):] if model.startswith("hf-hub:") else None
    if hub_model is None and (not pretrained or is_local(pretrained)):
        yield
        return
    _short_timeouts()
    if hub_model is not None:
        repos, files, url = [hub_model], [], None
        label = model
    else:
        repos, files, url = _open_clip_sources(model, pretrained)
        label = f"{model}:{pretrained}"
        if not repos and not files:  # unknown pair: open_clip's own error lists the choices
            yield
            return
    cached = any(hf_cached(repo) for repo in repos) or any(f.is_file() for f in files)
    online = (not offline_requested() and reachable(url)) if url else hub_available()
    if not cached and not online:
        where = " and ".join(str(p) for p in open_clip_cache_dirs())
        raise ComponentError(
            f"open_clip weights {label!r} are not cached ({where}) and cannot be downloaded: "
            f"{_why_unreachable(url)}. Pre-download on a connected machine with `python -c \"import "
            f"open_clip; open_clip.create_model('{model}', pretrained='{pretrained or ''}')\"`"
            + (f" or `hf download {repos[0]}`" if repos else "")
            + (", or pass a local folder: --encoder local-dir:/path/with/open_clip_config.json"
               if hub_model is not None else
               f", or pass a local checkpoint: --encoder {model}:/path/to/open_clip_model.safetensors"))
    if online:
        yield
    else:
        with _offline_mode():
            yield


# --------------------------------------------------------------------------------------------
# Everything a run needs, checked at once
# --------------------------------------------------------------------------------------------
def check_available(models: list[tuple[str, str]],
                    open_clip_models: list[tuple[str, str | None]] = ()) -> None:
    """Fail in one line naming *every* hub model (``(name, what)``) and open_clip weights
    (``(model, pretrained)``) that is neither local, cached nor reachable, before any work; the
    guards of :func:`hf_access` and :func:`open_clip_access` decide, nothing is loaded."""
    guards = [(f"{what} {name!r}", lambda n=name, w=what: hf_access(n, w))
              for name, what in dict.fromkeys(models)]
    guards += [(f"open_clip weights {model}:{pretrained}",
                lambda m=model, p=pretrained: open_clip_access(m, p))
               for model, pretrained in open_clip_models]
    missing: list[str] = []
    first: str | None = None
    for label, guard in guards:
        try:
            with guard():
                pass
        except ComponentError as error:
            missing.append(label)
            first = first or str(error)
    if len(missing) == 1:
        raise ComponentError(first)
    if missing:
        raise ComponentError(
            f"{len(missing)} models are neither cached nor reachable: {', '.join(missing)}; "
            f"the first: {first}")
