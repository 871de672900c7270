"""Hugging Face Hub datasets, failing fast when the hub cannot be reached.

Without a network `datasets.load_dataset` retries for ~25 s before giving up;
a training job should instead stop at once with a message saying what to do.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlsplit

import datasets

from .errors import DataError

PROBE_TIMEOUT_S = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def _env_offline() -> str | None:
    """The offline switch as `datasets` reads it (HF_DATASETS_OFFLINE wins when set)."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var)
        if value is not None:
            return f"{var}={value}" if value.upper() in _TRUE else None
    return None


def _probe_target() -> tuple[str, int]:
    """Host and port a hub request would connect to first (the proxy when one is set)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """TCP connect with a hard deadline. Runs in a thread because DNS lookups
    ignore socket timeouts and can block far longer on a cut-off machine."""
    ok = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _offline_error(dataset_id: str, reason: str, cached_hint: str) -> DataError:
    return DataError(
        f"data.path={dataset_id!r}: this Hugging Face Hub dataset cannot be fetched offline "
        f"({reason}). Fix: download it on a machine with network access and save it as local "
        f"files (e.g. ds.to_json('train.jsonl')), then use data.name=files "
        f"data.path=/path/to/train.jsonl (json/jsonl/csv/parquet/text){cached_hint}")


def load_hub(path: str) -> datasets.DatasetDict:
    """`owner/name` or `owner/name:config` from the hub (or the local cache when offline)."""
    dataset_id, _, config = path.partition(":")
    reason = _env_offline()
    if reason is None and datasets.config.HF_HUB_OFFLINE:
        reason = "offline mode was set when datasets was imported"
    if reason is not None and not datasets.config.HF_HUB_OFFLINE:
        # The switch was flipped after `datasets` read it, so load_dataset would
        # still go online and retry: stop here instead.
        raise _offline_error(path, reason, "")
    if reason is None:
        host, port = _probe_target()
        if not _reachable(host, port):
            raise _offline_error(
                path, f"{host}:{port} is unreachable",
                "; or, if it is already in the local datasets cache, set HF_DATASETS_OFFLINE=1 "
                "to load the cached copy")
    try:
        return datasets.load_dataset(dataset_id, config or None)
    except (ConnectionError, FileNotFoundError) as e:
        if reason is not None:  # offline and not in the cache
            raise _offline_error(path, f"{reason} and it is not in the local cache", "") from None
        raise DataError(f"data.path={path!r}: cannot load this hub dataset ({e}): check the id "
                        f"on https://huggingface.co/datasets, or use data.name=files") from None
    except ValueError as e:  # e.g. a multi-config dataset without a config name
        raise DataError(f"data.path={path!r}: {e}. Fix: name a config as "
                        f"data.path=<owner/name>:<config>") from None
