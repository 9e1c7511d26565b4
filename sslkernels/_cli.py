"""Command-line plumbing shared by ``train``, ``finetune`` and ``distill``: one-line argparse
errors, typed argument checkers, and :class:`UsageError` for the checks that need more than one
argument (or the disk), which the entry points turn into the same one-line error.

Every bad argument ends as ``<prog>: error: <what was wrong>`` on stderr and exit status 2,
before anything is written: the commands validate and load everything they need first and only
then create their output directory.
"""
from __future__ import annotations

import argparse
import math


class UsageError(ValueError):
    """A bad command-line argument (or combination) found after parsing. ``train()`` and
    friends raise it; the CLI prints it as an argparse error (exit status 2)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line: ``prog: error: message`` (no usage block, whose 40
    options would bury the message; ``--help`` has them)."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_command(parser: argparse.ArgumentParser, fn, args) -> int:
    """``fn(args)`` with :class:`UsageError` reported as ``parser``'s one-line error (exit 2)
    and Ctrl-C as exit status 130."""
    try:
        fn(args)
    except UsageError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


def _number(kind, text: str):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def int_at_least(lo: int, what: str = ""):
    """argparse ``type=``: an int >= ``lo``."""
    def parse(text: str) -> int:
        v = _number(int, text)
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}{what}, got {v}")
        return v
    parse.__name__ = f"int >= {lo}"  # argparse names the type in some messages
    return parse


def int_multiple_of(step: int):
    """argparse ``type=``: a positive multiple of ``step``."""
    def parse(text: str) -> int:
        v = _number(int, text)
        if v < step or v % step:
            raise argparse.ArgumentTypeError(f"must be a positive multiple of {step}, got {v}")
        return v
    parse.__name__ = f"multiple of {step}"
    return parse


def float_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """argparse ``type=``: a finite float in the interval from ``lo`` to ``hi``."""
    def parse(text: str) -> float:
        v = _number(float, text)
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            interval = (f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                        if hi != math.inf else f"{'>' if lo_open else '>='} {lo:g}")
            raise argparse.ArgumentTypeError(f"must be {'in ' if hi != math.inf else ''}"
                                             f"{interval}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def seed(text: str) -> int:
    """argparse ``type=``: a seed in [0, 2^31): the trainer mixes it with step numbers into
    64-bit generator seeds."""
    v = _number(int, text)
    if not 0 <= v < 2 ** 31:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^31), got {v}")
    return v


def device(text: str) -> str:
    """argparse ``type=``: a torch device that exists on this machine."""
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1, "
                                         f"...)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return text


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"

