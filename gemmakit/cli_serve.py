"""`gemmakit serve`: the OpenAI-compatible server on the command line (needs the `serve` extra).

Where it sits: a thin entry point registered by `cli`; the server is `gemmakit.server` under uvicorn.
The flags are checked and the model path is looked at before uvicorn starts, so a typo fails at once
with one line; the weights then load in the background while /health answers 503 "loading".

Key trade-off: binding anything but loopback without an API key is allowed (a LAN demo is a real
use) but logged as a warning on every start, since anyone who can reach the port can use the model.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gemmakit import cli_args as ca
from gemmakit.errors import UserError

logger = logging.getLogger("gemmakit.server")


class ServeError(UserError):
    """A `gemmakit serve` flag or the environment it reads is invalid."""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from gemmakit.server.app import ServeConfig, run
    except ImportError as e:
        raise ServeError(
            f"gemmakit serve needs the serve extra: pip install -e '.[serve]' ({e.name} missing)"
        ) from None
    if args.model is not None and not Path(args.model).exists():
        raise ServeError(f"--model: {args.model}: no such file or directory")
    if args.guard:  # read now so a bad file fails in one line before anything loads
        from gemmakit.safety.guard import load_guard_config

        load_guard_config(args.guard)
    if args.watermark:
        from gemmakit.safety.watermark import load_keys

        load_keys(args.watermark)
    key = args.api_key or os.environ.get("GEMMAKIT_API_KEY") or None
    config = ServeConfig(model_id=args.model_id or (Path(args.model).name if args.model else "nano"),
                         parallel=args.parallel, ctx_size=args.ctx_size, queue_limit=args.queue,
                         prefill_chunk=args.prefill_chunk or 256, api_key=key, host=args.host,
                         allowed_hosts=tuple(args.allowed_host or ()), request_timeout_s=args.timeout,
                         max_body_bytes=int(args.max_body_mb * 2**20), guard=args.guard,
                         watermark=args.watermark)  # fmt: skip
    logging.getLogger("gemmakit").setLevel(logging.INFO)
    if key is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key: anyone who reaches the port can use the model "
                       "(set --api-key or GEMMAKIT_API_KEY)", config.host)  # fmt: skip

    def load() -> tuple[Any, Any]:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return args.load(args)

    return run(load, config, port=args.port, drain_s=args.drain, verbose=args.verbose)


def add_parsers(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None],
                load: Callable[[argparse.Namespace], tuple[Any, Any]]) -> None:  # fmt: skip
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming)",
                       description="Serve a model over the OpenAI API (/v1/chat/completions, /v1/completions, "
                                   "/v1/models, /health, /ready, /metrics) with continuous batching. Needs "
                                   "pip install -e '.[serve]'.")  # fmt: skip
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=ca.port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model-id", help="the model name clients send and /v1/models lists (default: the "
                   "model directory's name)")  # fmt: skip
    p.add_argument("--parallel", type=ca.positive_int, default=4,
                   help="requests generating at once (KV cache rows; default 4)")  # fmt: skip
    p.add_argument("--ctx-size", type=ca.positive_int, default=None,
                   help="tokens per request, prompt + reply (default: min(model's context, 8192))")  # fmt: skip
    p.add_argument("--queue", type=ca.positive_int, default=64,
                   help="requests waiting for a row before new ones get 429 (default 64)")  # fmt: skip
    p.add_argument(
        "--api-key", help="require 'Authorization: Bearer KEY' (default: $GEMMAKIT_API_KEY, else none)"
    )
    p.add_argument("--allowed-host", action="append",
                   help="also answer to this Host header name (repeatable; loopback names always work)")  # fmt: skip
    p.add_argument("--timeout", type=ca.float_range(0.0, lo_open=True), default=600.0,
                   help="seconds a request may generate before it ends with finish_reason length (default 600)")  # fmt: skip
    p.add_argument("--drain", type=ca.float_range(0.0), default=30.0,
                   help="on SIGTERM, seconds to let running requests finish (default 30)")  # fmt: skip
    p.add_argument("--max-body-mb", type=ca.float_range(0.0, lo_open=True), default=2.0,
                   help="largest request body in MiB (default 2)")  # fmt: skip
    p.add_argument("--guard", metavar="FILE", help="safety checks on prompts and streamed replies (a guard TOML "
                   "file, e.g. recipes/guard.toml); blocked answers end with finish_reason content_filter")  # fmt: skip
    p.add_argument(
        "--watermark", metavar="KEYS.toml", help="SynthID Text watermark on every generated answer"
    )
    p.set_defaults(func=cmd_serve, load=load)
