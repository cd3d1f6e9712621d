"""Where a store lives: local paths, or object storage and HTTP(S) through obstore.

``open_store(path)`` gives what xarray and zarr open: the path itself for a local store, or
a read-only ``zarr.storage.ObjectStore`` over an obstore client for ``s3://``, ``gs://``
(``gcs://``), ``az://`` (``abfs://``, ``azure://``) and ``http(s)://`` URLs, optionally behind
a local chunk cache (:mod:`.chunk_cache`).

Credentials: the usual environment of each cloud (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_REGION`` / ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS`` or the gcloud application-default file, ``AZURE_STORAGE_*``).
When none is set the requests go unsigned, which is what public buckets (WeatherBench2's,
ARCO-ERA5) need. ``storage_options`` (``--storage_options JSON``) override: obstore's config
keys (``{"skip_signature": false}``, ``{"region": "eu-west-1"}``, ...) plus
``client_options`` (``{"timeout": "30s"}``) and ``retry`` (``max_retries``, ``retry_timeout_s``,
``init_backoff_s``, ``max_backoff_s``).

Errors: a missing bucket or path and a denied request are :class:`UsageError`; a request
that keeps failing after obstore's retries (exponential backoff, up to ``retry_timeout_s``,
120 s by default; a request that hangs times out after ``timeout``, 30 s) is
:class:`~aurora_loop.errors.DataUnavailable`, which stops a training run with a checkpoint.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping
from typing import Any

from aurora_loop.errors import DataUnavailable, UsageError

SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "azure", "http", "https")
#: obstore's retry settings unless ``storage_options["retry"]`` says otherwise.
DEFAULT_RETRY = {"max_retries": 10, "retry_timeout_s": 120.0, "init_backoff_s": 0.1, "max_backoff_s": 15.0}
DEFAULT_CLIENT = {"timeout": "30s", "connect_timeout": "5s"}
_CREDENTIAL_ENV = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
           "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    "gs": ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY"),
    "az": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY", "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_ID",
           "AZURE_STORAGE_USE_EMULATOR"),
}


def scheme_of(path: str | os.PathLike | None) -> str | None:
    """The URL scheme of a remote store (``s3``, ``gs``, ``az``, ``http``, ...), None for a local path."""
    if path is None:
        return None
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.lower() in SCHEMES else None


def is_remote(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a URL this module opens (not a local path)."""
    return scheme_of(path) is not None


def parse_storage_options(value: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``--storage_options``: a JSON object (or a mapping already) -> dict; one-line UsageError otherwise."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(value)
    except ValueError as err:
        raise UsageError(f"--storage_options is not JSON ({err.msg}); pass an object such as '{{\"region\": \"us-east-1\"}}'") from None
    if not isinstance(parsed, dict):
        raise UsageError("--storage_options must be a JSON object such as '{\"region\": \"us-east-1\"}'")
    return parsed


def _family(scheme: str) -> str:
    return {"gcs": "gs", "abfs": "az", "azure": "az", "https": "http"}.get(scheme, scheme)


def _has_credentials(family: str) -> bool:
    if any(os.environ.get(name) for name in _CREDENTIAL_ENV.get(family, ())):
        return True
    if family == "gs":  # gcloud's application-default credentials
        config = os.environ.get("CLOUDSDK_CONFIG") or os.path.join(os.path.expanduser("~"), ".config", "gcloud")
        return os.path.exists(os.path.join(config, "application_default_credentials.json"))
    return False


def _retry_config(options: Mapping[str, Any]) -> dict[str, Any]:
    retry = {**DEFAULT_RETRY, **dict(options or {})}
    seconds = datetime.timedelta
    return {
        "max_retries": int(retry["max_retries"]),
        "retry_timeout": seconds(seconds=float(retry["retry_timeout_s"])),
        "backoff": {"init_backoff": seconds(seconds=float(retry["init_backoff_s"])), "max_backoff": seconds(seconds=float(retry["max_backoff_s"])),
                    "base": 2.0},
    }


def object_store(url: str, storage_options: Mapping[str, Any] | None = None) -> Any:
    """An obstore client for ``url`` (its path is the client's prefix), read-only use."""
    from obstore.store import from_url

    family = _family(scheme_of(url) or "")
    options = dict(storage_options or {})
    client = {**DEFAULT_CLIENT, **dict(options.pop("client_options", {}) or {})}
    retry = _retry_config(options.pop("retry", {}) or {})
    config: dict[str, Any] = {}
    if family in ("s3", "gs", "az") and not _has_credentials(family):
        config["skip_signature"] = True  # a public bucket: unsigned requests
    endpoint = str(options.get("endpoint", os.environ.get("AWS_ENDPOINT_URL", "") if family == "s3" else ""))
    if (family == "http" and url.startswith("http://")) or endpoint.startswith("http://"):
        client.setdefault("allow_http", True)  # a local or private server without TLS
    config.update(options)
    if family == "http":
        config = {}  # HTTP has no credentials or signing
    try:
        return from_url(url, config=config or None, client_options=client, retry_config=retry)
    except Exception as err:  # noqa: BLE001 - obstore raises its own types for bad URLs and keys
        raise UsageError(f"cannot open {url!r} ({_first_line(err)}); check the URL and --storage_options") from None


def open_store(path: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
               cache_gb: float = 50.0) -> Any:
    """What zarr and xarray open for ``path``: the local path itself, or a read-only
    ``zarr.storage.ObjectStore`` for a URL (behind a :class:`.chunk_cache.ChunkCache` in
    ``cache_dir`` when given, bounded at ``cache_gb`` GB)."""
    if not is_remote(path):
        return os.fspath(path)
    from zarr.storage import ObjectStore

    url = os.fspath(path).rstrip("/")
    store: Any = ObjectStore(object_store(url, storage_options), read_only=True)
    if cache_dir:
        from aurora_loop.datasets.chunk_cache import ChunkCache

        store = ChunkCache(store, cache_dir, url, max_bytes=int(cache_gb * 1e9))
    return store


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def storage_error(err: BaseException, path: str) -> Exception | None:
    """The error to raise for ``err`` met while reading ``path``: a :class:`UsageError`
    (missing, denied: the user must act), :class:`DataUnavailable` (the store kept failing:
    try later), or None when ``err`` is not a storage error."""
    import obstore.exceptions as obe

    text = str(err)
    denied = isinstance(err, (obe.PermissionDeniedError, obe.UnauthenticatedError)) or "403 Forbidden" in text or "401 Unauthorized" in text
    if denied:
        return UsageError(f"access to {path!r} was denied ({_first_line(err)}); set credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, "
                          "AZURE_STORAGE_*) or --storage_options, or check the bucket's permissions")
    if isinstance(err, (obe.NotFoundError, FileNotFoundError, KeyError)) or "404 Not Found" in text or "NoSuchBucket" in text:
        return UsageError(f"{path!r} does not exist ({_first_line(err)}); check the bucket and path")
    if isinstance(err, (obe.BaseError, OSError, TimeoutError)):
        return DataUnavailable(f"reading {path!r} kept failing after retries ({_first_line(err)})")
    return None


def check_remote_root(store: Any, path: str) -> None:
    """Raise a one-line UsageError when the bucket of ``path`` is missing or access is denied
    (before xarray's generic "no group found")."""
    import obstore

    inner = getattr(store, "store", None) or getattr(getattr(store, "_store", None), "store", None)
    if inner is None or _family(scheme_of(path) or "") == "http":
        return
    try:
        next(iter(obstore.list(inner, chunk_size=1)), None)
    except Exception as err:  # noqa: BLE001 - mapped below, or re-raised
        mapped = storage_error(err, path)
        if isinstance(mapped, UsageError) and "does not exist" in str(mapped):
            raise UsageError(f"the bucket or container of {path!r} does not exist; check the URL") from None
        if isinstance(mapped, DataUnavailable):
            raise UsageError(f"{path!r} cannot be reached ({_first_line(err)}); check the URL, the endpoint (AWS_ENDPOINT_URL) and the network") from None
        if mapped is not None:
            raise mapped from None
        raise
