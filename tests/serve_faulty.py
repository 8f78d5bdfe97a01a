"""A real uvicorn process serving the nano model whose Nth forward pass raises (tests/test_server_reliability.py).

python tests/serve_faulty.py PORT FAIL_AT [FAIL_AT ...]
"""

from __future__ import annotations

import sys
import time

import torch
import uvicorn

from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.server import ServeConfig, create_app


class Faulty(torch.nn.Module):
    """The model, raising RuntimeError on the forward calls numbered in `fail_at` (from 1)."""

    def __init__(self, model: torch.nn.Module, fail_at: set[int], delay_s: float = 0.0) -> None:
        super().__init__()
        self.inner, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0
        self.delay_s = delay_s

    def forward(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay_s)  # a slower machine: long answers take seconds, so a test can stop one
        if self.calls in self.fail_at:
            raise RuntimeError(f"injected fault at forward {self.calls}")
        return self.inner(*args, **kwargs)

    def hidden(self, *args, **kwargs):
        return self.inner.hidden(*args, **kwargs)

    def head(self, *args, **kwargs):
        return self.inner.head(*args, **kwargs)


def main() -> None:
    args = sys.argv[2:]
    delay_s = 0.0
    if args[:1] == ["--delay-ms"]:
        delay_s, args = float(args[1]) / 1000, args[2:]
    port, fail_at = int(sys.argv[1]), {int(a) for a in args}

    def load():
        model, tok = _load_model_and_tokenizer(build_parser().parse_args(["serve"]))
        return Faulty(model, fail_at, delay_s), tok

    uvicorn.run(create_app(load, ServeConfig(ctx_size=512)), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
