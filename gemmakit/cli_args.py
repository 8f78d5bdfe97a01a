"""The one validation layer for command-line values: typed argparse converters and a one-line parser.

Where it sits: under every `cli*` module (rank 7.5 in the layering test); it imports only `errors`
and, lazily, torch for `--device`. Every numeric or device option of every command is declared with
one of these converters, so a bad value is refused while parsing, before a model is loaded or a byte
is written, and the message names the option (`--max-new-tokens: expected an integer >= 1, got 0`).

Key trade-off: argparse's own `error()` prints the usage block and then the message (several lines);
`Parser.error` prints only `gemmakit: error: <message>` and exits 2, the same single line a
`UserError` raised later produces. `--help` still shows the full usage for anyone who wants it.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

# torch.Generator.manual_seed takes a seed in [-2**63, 2**64); we accept the unsigned range only, so
# the same number always means the same stream (a negative seed is reinterpreted mod 2**64 by torch).
SEED_MAX = 2**64 - 1


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2; subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        print(f"gemmakit: error: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_range(lo: int | None = None, hi: int | None = None) -> Callable[[str], int]:
    """An integer in [lo, hi] (either bound may be open)."""

    def convert(text: str) -> int:
        value = _int(text)
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text}")
        if lo is not None and value < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"expected an integer <= {hi}, got {text}")
        return value

    convert.__name__ = "integer"  # argparse names the type in "invalid <name> value" messages
    return convert


def float_range(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
) -> Callable[[str], float]:
    """A finite float in [lo, hi], or (lo, hi] with `lo_open`; nan and inf are always refused."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        low_ok = lo is None or (value > lo if lo_open else value >= lo)
        if not math.isfinite(value) or not low_ok or (hi is not None and value > hi):
            left = "(" if lo_open else "["
            span = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {text}")
        return value

    convert.__name__ = "number"
    return convert


positive_int = int_range(1)
nonneg_int = int_range(0)
seed = int_range(0, SEED_MAX)
threads = int_range(1, 4096)
port = int_range(0, 65535)  # 0: any free port


def device(text: str) -> str:
    """A torch device this build can use: cpu, cuda[:N] when CUDA is present, mps on Apple."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu or cuda:0, got {text!r}"
        ) from None
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch build has no usable CUDA device; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return text
    if dev.type == "mps" and torch.backends.mps.is_available():
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: not available on this machine; use cpu")
