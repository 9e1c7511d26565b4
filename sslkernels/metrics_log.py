"""``metrics.jsonl``: one JSON line per training step, kept consistent with the checkpoints.

Every line is handed to the OS as it is written (``tail -f`` sees it); :meth:`MetricsLog.sync`
makes the log durable (fsync) and returns its length in bytes, which the checkpoint written
right after records. A run that is killed (even ``kill -9``) therefore has a log at least as long
as its last checkpoint, and on ``--resume`` the log is cut back to exactly the recorded length,
dropping the lines of steps the checkpoint does not hold; the resumed run rewrites them, so an
interrupted-and-resumed log equals the uninterrupted one step for step.
"""
from __future__ import annotations

import json
import os

from ._cli import UsageError


def check_resumable(path: str, nbytes: int, step: int) -> None:
    """Raises :class:`UsageError` unless the log at ``path`` holds the ``nbytes`` bytes that
    were durable when the checkpoint of ``step`` was written, ending with that step's line."""
    if nbytes == 0:
        return
    have = os.path.getsize(path) if os.path.isfile(path) else None
    if have is None or have < nbytes:
        state = "is missing" if have is None else f"has {have} bytes"
        raise UsageError(f"{path} {state}, but the checkpoint was written when it had {nbytes} "
                         f"(steps 1-{step}): the log was removed or cut, so a resumed run's log "
                         f"would miss steps; restore it, or start over with --overwrite")
    with open(path, "rb") as f:
        f.seek(max(0, nbytes - 4096))
        tail = f.read(nbytes - max(0, nbytes - 4096))
    last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        last_step = json.loads(last)["step"]
    except (ValueError, KeyError, TypeError):
        last_step = None
    if last_step != step:
        raise UsageError(f"{path} does not match the checkpoint: its line at byte {nbytes} is "
                         f"not step {step}; the log was edited or belongs to another run "
                         f"(restore it, or start over with --overwrite)")


class MetricsLog:
    """Appends JSON lines to ``path``. ``truncate_to=None`` starts a new log (an existing file is
    replaced); an int first cuts the file back to that many bytes (see :func:`check_resumable`).
    ``path=None`` writes nothing (the non-zero ranks of a distributed run)."""

    def __init__(self, path: str | None, truncate_to: int | None = None):
        self.path = path
        if path is None:
            self._f = None
            return
        if truncate_to is None:
            self._f = open(path, "wb")
        else:
            self._f = open(path, "r+b")
            self._f.truncate(truncate_to)
            self._f.seek(truncate_to)

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write((json.dumps(record) + "\n").encode())
            self._f.flush()

    def sync(self) -> int:
        """fsync; returns the durable length in bytes."""
        if self._f is None:
            return 0
        self._f.flush()
        os.fsync(self._f.fileno())
        return self._f.tell()

    def close(self) -> None:
        if self._f is not None:
            self.sync()
            self._f.close()
            self._f = None
