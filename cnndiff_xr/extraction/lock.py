"""The writer lock of a store: one extraction writes a store at a time.

An extraction holds :class:`StoreLock` -- a small JSON object ``<store>.lock`` next to the store (outside it, so the
store itself stays plain Zarr and a refused run leaves no trace in it), created atomically (a hard link of a complete
temporary file locally, which is atomic on NFS too; ``If-None-Match: *`` on S3; other fsspec filesystems get their
mode ``"xb"``, which may be a check-then-create) and holding pid, host, start time and a heartbeat refreshed every
:data:`LOCK_HEARTBEAT_S` seconds. A second run is refused with :class:`StoreLockedError` naming the store and the
holder. A lock is *stale*, and removed with a warning, when its holder ran on this host and that process is gone, or
when its heartbeat is older than :data:`LOCK_STALE_S` (a crashed run on another host); ``break_lock=True``
(``cnndiff extract --break-lock``) removes any lock.

The lock only keeps two *runs* apart: within a run, batches write disjoint whole chunks and need no lock (see
:mod:`cnndiff_xr.extraction.run` for why a rerun that overlaps a dead run's orphaned tasks is still safe).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

from ..validation import ParameterTypeError, ParameterValueError, check_bool
from .store import StoreError, _filesystem, _forget_cached, _protocols, check_storage_options, check_url, reaching

__all__ = ["LOCK_HEARTBEAT_S", "LOCK_STALE_S", "StoreLock", "StoreLockedError", "break_lock", "lock_url", "read_lock"]


class StoreLockedError(StoreError):
    """Another extraction holds the store's lock; the message names the store and the holder."""


#: Seconds between heartbeats of a held lock (the holder rewrites the lock object with the current time).
LOCK_HEARTBEAT_S = 60.0
#: A lock whose heartbeat is older than this many seconds is stale (its holder crashed or lost its connection).
LOCK_STALE_S = 600.0
LOCK_SUFFIX = ".lock"


def lock_url(url: str) -> str:
    """Where the writer lock of the store at ``url`` lives: ``<store>.lock``, next to the store."""
    return check_url(url).rstrip("/") + LOCK_SUFFIX


def read_lock(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The lock record of the store at ``url`` (pid, host, started, heartbeat, ...) or None when it is not locked."""
    fs, path = _filesystem(lock_url(url), check_storage_options(storage_options))
    _forget_cached(fs, path)
    try:
        with fs.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        record = None
    if not isinstance(record, dict):  # not written by us, or damaged: held by an unknown holder
        record = {"token": None, "unreadable": raw[:200].decode(errors="replace")}
    return record


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is alive (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale_reason(record: Mapping[str, Any], stale_after: float, now: float | None = None) -> str | None:
    """Why a lock record is stale, or None if its holder may still be running."""
    now = time.time() if now is None else now
    pid, host = record.get("pid"), record.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid):
        return f"its process {pid} on this host ({host}) is no longer running"
    beat = record.get("heartbeat")
    if isinstance(beat, (int, float)) and now - beat > stale_after:
        return f"its last heartbeat was {now - beat:.0f} s ago (a lock is stale after {stale_after:.0f} s)"
    return None


def _describe_holder(record: Mapping[str, Any], now: float | None = None) -> str:
    if "unreadable" in record:
        return f"an unknown holder (the lock object is not a cnndiff lock record: {record['unreadable']!r})"
    now = time.time() if now is None else now
    beat = record.get("heartbeat")
    ago = f"{now - beat:.0f} s ago" if isinstance(beat, (int, float)) else "never"
    return (f"pid {record.get('pid')} on host {record.get('host')!r}, started {record.get('started')}, "
            f"last heartbeat {ago}, command {record.get('command')!r}")


def _remove(url: str, storage_options: Mapping[str, Any] | None) -> None:
    fs, path = _filesystem(url, storage_options)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


def break_lock(url: str, *, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Remove the store's writer lock whoever holds it; return the removed record (None if there was none).

    Only for a lock whose holder is known to be dead: a live holder keeps writing, and a second run could then write
    the same chunks at the same time (the same bytes, since batches are deterministic, but nothing guarantees it).
    """
    record = read_lock(url, storage_options=storage_options)
    if record is not None:
        _remove(lock_url(url), check_storage_options(storage_options))
    return record


def _seconds(name: str, value: Any) -> float:
    """A positive number of seconds."""
    message = f"{name} must be a positive number of seconds, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterTypeError(message)
    if not value > 0:
        raise ParameterValueError(message)
    return float(value)


class StoreLock:
    """The writer lock of one store: ``with StoreLock(url): ...`` (the rules are in the module docstring).

    Parameters
    ----------
    url, storage_options
        The store (the lock object is ``<url>.lock``).
    break_lock
        Remove an existing lock whatever its state (for a holder known to be dead).
    stale_after
        Seconds without a heartbeat after which a lock counts as stale.
    heartbeat
        Seconds between heartbeats of this lock while held (shorter than ``stale_after``).
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None, break_lock: bool = False,
                 stale_after: float = LOCK_STALE_S, heartbeat: float = LOCK_HEARTBEAT_S) -> None:
        self.url = check_url(url)
        self.storage_options = check_storage_options(storage_options)
        self.break_lock = check_bool("break_lock", break_lock)
        self.stale_after = _seconds("stale_after", stale_after)
        self.heartbeat = _seconds("heartbeat", heartbeat)
        if heartbeat >= stale_after:
            raise ParameterValueError(f"heartbeat={heartbeat!r} must be shorter than stale_after={stale_after!r} "
                                      "(seconds)")
        self.lock_url = lock_url(self.url)
        self.token: str | None = None
        self.record: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- the lock object
    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "lock": "cnndiff_xr store writer lock",
            "store": self.url,
            "token": uuid.uuid4().hex,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat": now,
            "command": " ".join(sys.argv)[:300],
        }

    def _create(self, record: Mapping[str, Any]) -> bool:
        """Create the lock object holding ``record`` if none exists, atomically; False if one exists."""
        fs, path = _filesystem(self.lock_url, self.storage_options)
        data = json.dumps(record).encode()
        if "file" in _protocols(fs):
            # The complete record appears at once or not at all: write a private temporary file, then hard-link it to
            # the lock name (link fails if the name exists), as Zarr's LocalStore does for its exclusive writes.
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{record['token']}.tmp"
            try:
                with open(tmp, "wb") as fh:  # may fail (a full disk): the finally removes what it left
                    fh.write(data)
                os.link(tmp, path)
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            return True
        try:
            # "xb": exclusive create. s3fs sends If-None-Match: * with the PUT, so S3 itself refuses a second creator.
            with fs.open(path, "xb") as fh:
                fh.write(data)
        except FileExistsError:
            return False
        except OSError as err:  # a failed precondition (412) on object stores that report it differently
            if "PreconditionFailed" in str(err) or "412" in str(err):
                return False
            raise
        return True

    def _rewrite(self, record: Mapping[str, Any]) -> None:
        fs, path = _filesystem(self.lock_url, self.storage_options)
        data = json.dumps(record).encode()
        if "file" in _protocols(fs):
            tmp = f"{path}.{record['token']}.tmp"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)  # atomic: readers see the old or the new record
            except BaseException:
                # a full disk fails the write: the old record stays, and no temporary file is left next to the store
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        else:
            with fs.open(path, "wb") as fh:  # one PUT on object stores: atomic too
                fh.write(data)

    # ---- acquire / release
    def acquire(self) -> StoreLock:
        """Take the lock, removing a stale one (with a warning); :class:`StoreLockedError` if it is held."""
        for _ in range(5):
            record = self._new_record()
            if self._create(record):
                self.token, self.record = record["token"], record
                self._start_heartbeat()
                return self
            held = read_lock(self.url, storage_options=self.storage_options)
            if held is None:
                continue  # released between our attempt and the read: try again
            if held.get("token") == record["token"]:
                # Ours: the create reached the object store but its response was lost, and the client's retry of the
                # exclusive PUT was refused (412) by the object the first attempt made
                self.token, self.record = record["token"], record
                self._start_heartbeat()
                return self
            reason = "break_lock=True was given" if self.break_lock else _stale_reason(held, self.stale_after)
            if reason is None:
                raise StoreLockedError(
                    f"store {self.url!r} is being written by another extraction: {_describe_holder(held)} (lock "
                    f"object {self.lock_url!r}). Two runs must not write one store at once; wait for that run to "
                    f"finish (rerunning afterwards finishes only what is missing). If it is dead, its lock is "
                    f"removed automatically once its process is gone (same host) or {self.stale_after:.0f} s after "
                    f"its last heartbeat; or pass break_lock=True (cnndiff extract --break-lock) to remove it now."
                )
            warnings.warn(f"removing the lock of store {self.url!r} held by {_describe_holder(held)}: {reason}",
                          stacklevel=2)
            # Remove it only if it is still the lock we judged: two runs breaking one stale lock at once must not
            # remove each other's new lock (a narrow race remains between this read and the removal).
            again = read_lock(self.url, storage_options=self.storage_options)
            if again is not None and again.get("token") == held.get("token") and again.get("heartbeat") == \
                    held.get("heartbeat"):
                _remove(self.lock_url, self.storage_options)
        raise StoreLockedError(f"store {self.url!r}: could not take its lock {self.lock_url!r}: other runs keep "
                               "taking it; try again")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock object if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token is None:
            return
        held = read_lock(self.url, storage_options=self.storage_options)
        if held is not None and held.get("token") == self.token:
            _remove(self.lock_url, self.storage_options)
        self.token = None

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"cnndiff-lock-heartbeat {self.url}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                held = read_lock(self.url, storage_options=self.storage_options)
                if held is None or held.get("token") != self.token:
                    warnings.warn(f"the lock of store {self.url!r} was removed or taken by another run while this "
                                  "run held it (break_lock?); two runs may now be writing the store", stacklevel=1)
                    return
                self.record = {**held, "heartbeat": time.time()}
                self._rewrite(self.record)
            except Exception as err:  # a transient storage error must not kill the run; the next beat retries
                warnings.warn(f"could not refresh the lock of store {self.url!r}: {err}", stacklevel=1)

    def __enter__(self) -> StoreLock:
        with reaching(self.url, f"taking its writer lock {self.lock_url!r}"):
            return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
