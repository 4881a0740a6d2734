"""One pipeline run per lake at a time: an exclusive lock file under a local lake root.

A run takes a non-blocking `fcntl.flock` on `<root>/_locks/pipeline.lock` and writes its pid,
host and start time into the file; a second run on the same root fails at once with
LakeLockedError naming the file and that holder. The kernel drops the lock when the holder's
process ends, killed or not, so a stale file never blocks the next run.

Object-store roots (s3://, gs://, abfss://) have no lock: a warning is logged. Delta's commits
still keep every table consistent there, but two runs may interleave versions of different
tables, so the scheduler must run one pipeline per lake (the Airflow DAG has max_active_runs=1).
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

log = logging.getLogger("a3gr.locks")

LOCK_DIR = "_locks"
PIPELINE_LOCK = "pipeline.lock"


class LakeLockedError(RuntimeError):
    """Another pipeline run holds the lake's lock."""


class LakeNotWritableError(OSError):
    """The lake root cannot be written (read-only, full, or not a directory)."""


def is_local_root(root: str) -> bool:
    return "://" not in root or root.startswith("file://")


def lock_path(root: str) -> Path:
    return Path(root.removeprefix("file://")) / LOCK_DIR / PIPELINE_LOCK


def _holder(fd: int) -> str:
    """The holder's details as it wrote them, readably."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}, started {info['started_at']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that has not written its details yet"


@contextmanager
def pipeline_lock(root: str) -> Iterator[Path | None]:
    """Hold the lake's pipeline lock for the `with` block; raise LakeLockedError if another run holds it."""
    if not is_local_root(root):
        log.warning("lake root %s is an object store: no pipeline lock is taken there; run one pipeline per "
                    "lake at a time (Delta commits still keep each table consistent)", root)
        yield None
        return
    path = lock_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LakeNotWritableError(exc.errno, f"lake root '{root}' is not writable: cannot create the lock file "
                                              f"{path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LakeLockedError(f"lake '{root}' is locked by another pipeline run ({_holder(fd)}); lock file "
                                  f"{path}. Wait for it to finish; the lock frees itself when that process "
                                  f"ends") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
        except OSError as exc:
            reason = "the disk is full" if exc.errno == errno.ENOSPC else exc.strerror
            raise LakeNotWritableError(exc.errno, f"lake root '{root}' is not writable: cannot write the lock "
                                                  f"file {path}: {reason}") from exc
        log.info("pipeline lock %s taken (pid %d)", path, holder["pid"])
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


def one_run_per_lake(run):
    """Decorate `run(cfg, ...)` so it holds the pipeline lock of `cfg.lake.root` while it runs."""
    @functools.wraps(run)
    def locked(cfg, *args, **kwargs):
        with pipeline_lock(cfg.lake.root):
            return run(cfg, *args, **kwargs)

    return locked
