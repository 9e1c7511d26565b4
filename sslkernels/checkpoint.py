"""Checkpoints of the commands (``train``, ``finetune``): written atomically, and read back
with a message a user can act on when the file is truncated, corrupt, of another kind, or of a
run configured differently.

A checkpoint is a dict with ``"kind"`` (which command wrote it), ``"config"`` (the options
that define the run: method, architecture, data, optimization) and the states. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings, lists and dicts
only, and nothing in it is executed.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from ._cli import UsageError

FORMAT = 2  # bumped when the layout changes; older files are reported, not misread


def save_checkpoint(path: str, state: dict) -> None:
    """Atomic: written to a temporary file in the same directory, fsynced, renamed over
    ``path``, and the directory fsynced so the rename itself survives a power cut."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform opens directories; the rename is atomic anyway
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str, kind: str, remedy: str, map_location=None) -> dict:
    """The checkpoint at ``path``, written by the command ``kind``, or a :class:`UsageError`
    that says which file is unusable, why, and ``remedy`` (what to do)."""
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}" + (f" ({remedy})" if remedy else ""))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError,
            ValueError, KeyError, AttributeError, IndexError) as e:
        size = os.path.getsize(path)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"checkpoint {path} ({size} bytes) is truncated or corrupt and cannot "
                         f"be read (torch.load: {first[:120]}); {remedy}") from None
    if not isinstance(state, dict) or state.get("kind") != kind or "config" not in state:
        what = (f"a {state.get('kind')!r} checkpoint" if isinstance(state, dict) and
                "kind" in state else "not a checkpoint of this version of sslkernels")
        raise UsageError(f"{path} is {what}, not one written by '{kind}'; {remedy}")
    if state.get("format") != FORMAT:
        raise UsageError(f"{path} has checkpoint format {state.get('format')}, this version "
                         f"reads format {FORMAT}; {remedy}")
    return state


def config_differences(saved: dict, current: dict) -> list[str]:
    """``--option saved-value -> current-value`` for every option whose values differ."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "(unset)"), current.get(key, "(unset)")
        if a != b:
            out.append(f"--{key.replace('_', '-')} {a} (checkpoint) vs {b} (now)")
    return out
