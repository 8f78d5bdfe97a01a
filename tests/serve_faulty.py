"""A real uvicorn process serving the nano model with injected faults (tests/test_server_reliability.py).

python tests/serve_faulty.py PORT [--delay-ms MS] [--load-s S] [--die-at N] [FAIL_AT ...]

FAIL_AT: forward passes (numbered from 1) that raise RuntimeError, which the batcher handles per
forward. --die-at N: forward N raises an error nothing in the worker expects (a BaseException), which
stops the worker thread. --delay-ms: each forward sleeps first (a slower machine). --load-s: loading
the model takes this much longer (the /health "loading" window).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.server import ServeConfig
from gemmakit.server.app import run


class WorkerKilled(BaseException):
    """Not an Exception: escapes the batcher's per-forward handler, as a bug in its own code would."""


class Faulty(torch.nn.Module):
    """The model, raising on the forward calls chosen."""

    def __init__(
        self, model: torch.nn.Module, fail_at: set[int], delay_s: float = 0.0, die_at: int = 0
    ) -> None:
        super().__init__()
        self.inner, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0
        self.delay_s, self.die_at = delay_s, die_at

    def forward(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay_s)  # a slower machine: long answers take seconds, so a test can stop one
        if self.calls == self.die_at:
            raise WorkerKilled(f"injected worker death at forward {self.calls}")
        if self.calls in self.fail_at:
            raise RuntimeError(f"injected fault at forward {self.calls}")
        return self.inner(*args, **kwargs)

    def hidden(self, *args, **kwargs):
        return self.inner.hidden(*args, **kwargs)

    def head(self, *args, **kwargs):
        return self.inner.head(*args, **kwargs)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("fail_at", type=int, nargs="*")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--load-s", type=float, default=0.0)
    p.add_argument("--die-at", type=int, default=0)
    args = p.parse_args()

    def load():
        time.sleep(args.load_s)
        model, tok = _load_model_and_tokenizer(build_parser().parse_args(["serve"]))
        return Faulty(model, set(args.fail_at), args.delay_ms / 1000, args.die_at), tok

    return run(load, ServeConfig(ctx_size=512), port=args.port, drain_s=5.0)


if __name__ == "__main__":
    sys.exit(main())
