"""A real uvicorn process serving the nano model whose Nth forward pass raises (tests/test_server_reliability.py).

python tests/serve_faulty.py PORT FAIL_AT [FAIL_AT ...]
"""

from __future__ import annotations

import sys

import torch
import uvicorn

from gemmakit.cli import _load_model_and_tokenizer, build_parser
from gemmakit.server import ServeConfig, create_app


class Faulty(torch.nn.Module):
    """The model, raising RuntimeError on the forward calls numbered in `fail_at` (from 1)."""

    def __init__(self, model: torch.nn.Module, fail_at: set[int]) -> None:
        super().__init__()
        self.inner, self.config, self.fail_at, self.calls = model, model.config, fail_at, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_at:
            raise RuntimeError(f"injected fault at forward {self.calls}")
        return self.inner(*args, **kwargs)

    def hidden(self, *args, **kwargs):
        return self.inner.hidden(*args, **kwargs)

    def head(self, *args, **kwargs):
        return self.inner.head(*args, **kwargs)


def main() -> None:
    port, fail_at = int(sys.argv[1]), {int(a) for a in sys.argv[2:]}

    def load():
        model, tok = _load_model_and_tokenizer(build_parser().parse_args(["serve"]))
        return Faulty(model, fail_at), tok

    uvicorn.run(create_app(load, ServeConfig(ctx_size=512)), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
