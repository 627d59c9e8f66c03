"""Where studies live: the storage URL (default: SQLite under the cache dir), opened once per process.

An Optuna `RDBStorage` owns an SQLAlchemy engine whose pool keeps its connections open, and the engine sits in
reference cycles: dropping the storage closes nothing until a full garbage collection, which a process with a
large heap rarely runs. A storage opened per call therefore leaked connections, and a long-lived process (the
Space, `watch`, a notebook running searches in a loop) could run a PostgreSQL server out of them ("too many
clients already"). So each URL is opened once per process — SQLAlchemy's rule of one engine per database per
process — and shared by every search, export and query in it; a child process (after a fork) opens its own.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import optuna
import sqlalchemy.exc

from ..errors import StudyError

# A running trial writes a heartbeat every HEARTBEAT_S; one silent for GRACE_S belonged to a dead process:
# it is marked failed and its parameters are queued again (nothing finished is lost).
HEARTBEAT_S, GRACE_S = 2, 10
KEEP = 8  # storages kept open per process; the least recently used beyond that is closed

_open: OrderedDict[tuple[str, int], optuna.storages.RDBStorage] = OrderedDict()
_lock = threading.Lock()


def open_storage(storage: str) -> optuna.storages.RDBStorage:
    """The RDB storage at `storage` (an SQLAlchemy URL), with heartbeats: a dead worker's trial is failed after
    GRACE_S and queued again. The same object for the same URL within a process.

    >>> open_storage("sqlite:////tmp/studies.db") is open_storage("sqlite:////tmp/studies.db")
    True
    """
    key = (storage, os.getpid())
    with _lock:
        if key in _open:
            _open.move_to_end(key)
            return _open[key]
        rdb = _open[key] = _connect(storage)
        while len(_open) > KEEP:
            _, old = _open.popitem(last=False)
            old.engine.dispose()  # its idle connections close now; a study still using it reconnects
    return rdb


def _connect(storage: str) -> optuna.storages.RDBStorage:
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # "experimental" in Optuna, and exactly what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(storage, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                                  heartbeat_stale_trial_callback=retry)
            except (ImportError, ValueError) as err:
                raise StudyError(f"Cannot open the study storage {safe_url(storage)}: {err}. Use an SQLAlchemy "
                                 "URL such as sqlite:///studies.db or postgresql+psycopg://user@host/db "
                                 "(PostgreSQL needs `pip install psycopg[binary]`).") from err
            except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as err:
                # Workers that open a new database at the same moment race to create Optuna's tables.
                if attempt == 2:
                    raise StudyError(f"Cannot open the study storage {safe_url(storage)}: {err}") from err
                time.sleep(1.0 + attempt)


def safe_url(storage) -> str:
    """The storage URL without a password (an Optuna storage object: its class name)."""
    from sqlalchemy.engine import make_url

    if not isinstance(storage, str):
        return type(storage).__name__
    try:
        return make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("@")[-1]


def default_storage(cache_dir=None) -> str:
    """The study storage when --storage is not given: an SQLite file under the cache dir."""
    from ..sources import default_cache_dir  # the sources package imports torch: only when no storage is given

    return f"sqlite:///{Path(cache_dir or default_cache_dir()) / 'studies.db'}"
