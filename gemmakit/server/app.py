"""The OpenAI-compatible HTTP server: FastAPI routes over one continuous `Batcher`.

Where it sits: the top of the data flow beside `cli` (`gemmakit serve` builds it with `create_app`
and runs it under uvicorn). Requests are checked by `server.protocol` into jobs, each choice becomes a
`batching.Request` whose events the worker thread hands to the request's asyncio queue; the route
turns them into an OpenAI response or SSE chunks. Echo log-probs (`/v1/completions` with echo, as
lm-eval's local-completions asks) are scored by one forward pass outside the batcher.

Outside the routes, one ASGI layer checks every request before a route sees it: the Host header
(DNS rebinding: a loopback-bound server answers only to loopback names), the API key
(`hmac.compare_digest`; the probes /health and /ready and the chat page are exempt), and the body size (413 from
Content-Length, or as soon as a chunked body passes the limit; never buffered whole first).

Key trade-off: one process, one model, one worker thread: the GIL is released inside torch's
kernels, so HTTP handling and decoding overlap, and the batch, not extra processes, gives
concurrency. A request that exceeds the queue gets 429 with Retry-After at once instead of waiting.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest

from gemmakit.chat import stop_tokens
from gemmakit.infer.batching import Batcher, Busy, Failed, Finished, Request, Token
from gemmakit.infer.engine import GenerationError
from gemmakit.server import openapi as oa
from gemmakit.server.protocol import (
    ApiError,
    Job,
    TextStream,
    parse_chat,
    parse_completion,
    parse_json,
    render_messages,
)

logger = logging.getLogger("gemmakit.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_HEADERS = 100  # request header fields
MAX_HEADER_BYTES = 16 * 1024  # their names and values together


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs; `gemmakit serve` flags map one to one."""

    model_id: str = "nano"  # the name /v1/models lists and responses carry
    parallel: int = 4  # KV cache rows: requests generating at once
    ctx_size: int | None = None  # tokens per row (prompt + reply); None: min(model's max_seq_len, 8192)
    queue_limit: int = 64  # requests waiting for a row before new ones get 429
    prefill_chunk: int = 256  # prompt tokens fed per step while others decode
    api_key: str | None = None  # required as "Authorization: Bearer KEY" on every route but /health
    host: str = "127.0.0.1"  # the bind address; loopback also restricts the Host header
    allowed_hosts: tuple[str, ...] = ()  # extra Host names accepted (e.g. a reverse proxy's name)
    max_body_bytes: int = 2 * 1024 * 1024  # 2 MB, TGI's default
    request_timeout_s: float = 600.0  # wall time per request; past it the reply ends with "length"
    retry_after_s: int = 1  # the Retry-After header of a 429 / 503
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    guard: str | None = None  # a guard TOML file (safety.guard): input and streamed-output checks
    watermark: str | None = None  # a SynthID keys TOML file: every generated answer is watermarked


class _Guardrails:
    """ASGI middleware: Host allowlist, API key and body limit, before any route runs."""

    # Probes and the page carry no key (the page's own requests do). /ready costs one token.
    EXEMPT = ("/health", "/ready", "/", "/static/chat.js")

    def __init__(self, app: Any, config: ServeConfig) -> None:
        self.app, self.config = app, config
        self.loopback_only = _is_loopback(config.host)
        self.hosts = {h.lower() for h in config.allowed_hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # CVE-2025-48956 class: many or huge headers. h11 only bounds a header block that arrives in
        # pieces (h11_max_incomplete_event_size), not one read in a single 64 KiB recv, so count here too.
        size = sum(len(k) + len(v) for k, v in scope["headers"])
        if len(scope["headers"]) > MAX_HEADERS or size > MAX_HEADER_BYTES:
            return await _send_error(send, ApiError(f"the request headers exceed {MAX_HEADERS} fields or "
                                                    f"{MAX_HEADER_BYTES} bytes", None, 431, "invalid_request_error",
                                                    "headers_too_large"))  # fmt: skip
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", ""))
        if self.loopback_only and host not in LOOPBACK_NAMES and host not in self.hosts:
            return await _send_error(send, ApiError(f"Host {host!r} is not allowed (this server answers to "
                                                    "localhost only)", None, 403, "permission_error"))  # fmt: skip
        key = self.config.api_key
        if key and scope["path"] not in self.EXEMPT:
            given = headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await _send_error(send, ApiError("invalid or missing API key", None, 401,
                                                        "authentication_error", "invalid_api_key"))  # fmt: skip
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, _too_large(limit))
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _send_error(send, _too_large(limit))


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the request body exceeds {limit} bytes", None, 413, "invalid_request_error",
                    "request_too_large")  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """'[::1]:8000' -> '::1', 'localhost:8000' -> 'localhost'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


async def _send_error(send: Callable, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (updated from the event loop only)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum, self.n = bounds, [0] * len(bounds), 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.bounds):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.n += 1

    def lines(self, name: str, help: str) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        return out + [
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.n}",
        ]


def _prometheus(server: Server) -> str:
    """/metrics in Prometheus' text format (0.0.4)."""
    b = server.batcher
    c = b.counters if b is not None else {}
    rows = [
        ("gemmakit_requests_total", "counter", "generation requests admitted to the queue", c.get("requests", 0)),
        ("gemmakit_prompt_tokens_total", "counter", "prompt tokens prefilled", c.get("prompt_tokens", 0)),
        ("gemmakit_cached_prompt_tokens_total", "counter", "prompt tokens reused from a finished request's row",
         c.get("cached_tokens", 0)),
        ("gemmakit_generated_tokens_total", "counter", "tokens generated", c.get("generated_tokens", 0)),
        ("gemmakit_engine_failures_total", "counter", "forward passes that raised", c.get("failures", 0)),
        ("gemmakit_http_errors_total", "counter", "error responses (4xx and 5xx)", server.counts["errors"]),
        ("gemmakit_http_rejected_busy_total", "counter", "requests refused with 429/503 (queue full, shutting down)",
         server.counts["busy"]),
        ("gemmakit_decode_steps_total", "counter", "batched decode steps", c.get("decode_steps", 0)),
        ("gemmakit_decode_seconds_total", "counter", "worker seconds in decode steps (forward, sampling, hand-off)",
         round(b.step_seconds["decode"], 6) if b else 0),
        ("gemmakit_prefill_steps_total", "counter", "prefill steps (one forward over the admitted prompts' chunks)",
         c.get("prefill_steps", 0)),
        ("gemmakit_prefill_seconds_total", "counter", "worker seconds in prefill steps",
         round(b.step_seconds["prefill"], 6) if b else 0),
        ("gemmakit_requests_running", "gauge", "requests generating now", b.running if b else 0),
        ("gemmakit_requests_waiting", "gauge", "requests queued for a row (queue depth)", b.waiting if b else 0),
    ]  # fmt: skip
    lines = []
    for name, kind, help, value in rows:
        lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += server.ttft.lines(
        "gemmakit_time_to_first_token_seconds", "seconds from submission to the first token"
    )
    lines += server.itl.lines("gemmakit_inter_token_seconds", "seconds between two tokens of one answer")
    return "\n".join(lines) + "\n"


class Server:
    """The app's state: model, tokenizer, batcher, counters. Built by `create_app`."""

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        config: ServeConfig,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.config, self._load, self._on_fatal = config, load, on_fatal
        self.model = self.tokenizer = self.batcher = self.guard = self.watermark = None
        self.load_error: str | None = None
        self.started = time.time()
        self.stops: frozenset[int] = frozenset()
        self.context = 0
        self._score_lock = threading.Lock()
        self.counts = {"errors": 0, "busy": 0}
        # seconds; TTFT includes queueing and prefill, as clients see it
        self.ttft = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))

    def start(self) -> None:
        """Load the model and start the batcher (in a thread: /health says "loading" meanwhile)."""
        try:
            self.model, self.tokenizer = self._load()
            cfg = self.model.config
            self.context = self.config.ctx_size or min(cfg.max_seq_len, 8192)
            self.stops = frozenset(stop_tokens(self.tokenizer))
            if self.config.watermark:
                from gemmakit.safety.watermark import load_keys

                self.watermark = load_keys(self.config.watermark)
            if self.config.guard:  # its classifier loads before the server reports ready: fail-closed
                from gemmakit.safety.guard import load_guard

                self.guard = load_guard(self.config.guard)
            self.batcher = Batcher(self.model, self.config.parallel, self.context, self.config.queue_limit,
                                   self.config.prefill_chunk, on_death=self._on_fatal)  # fmt: skip
        except Exception as e:  # shown by /health; the process stays up so the probe can report it
            logger.exception("loading the model failed")
            self.load_error = f"{type(e).__name__}: {e}"

    @property
    def ready(self) -> bool:
        return self.batcher is not None and self.batcher.alive

    def require_ready(self) -> None:
        if self.batcher is not None and self.batcher.dead is not None:
            raise ApiError("the engine stopped; the server is restarting", None, 503, "unavailable_error")
        if not self.ready:
            raise ApiError("the model is still loading" if self.load_error is None else "the model failed to load",
                           None, 503, "unavailable_error")  # fmt: skip

    # ---- generation -------------------------------------------------------------------------------
    async def events(
        self, job: Job, prompt: list[int], index: int
    ) -> AsyncIterator[Token | Finished | Failed]:
        """Submit one choice and yield its events; cancels it if the consumer goes away."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seed = None if job.seed is None else (job.seed + index) % 2**64
        request = Request(
            prompt, job.max_tokens, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e),
            temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, seed=seed,
            stop_tokens=self.stops, logprobs=job.logprobs, logit_bias=job.logit_bias,
            deadline=time.monotonic() + self.config.request_timeout_s, processor=self._processor(),
            mask=self._mask(job),
        )  # fmt: skip
        last = time.monotonic()
        self.submit(request)
        first = True
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Token):
                    now = time.monotonic()
                    (self.ttft if first else self.itl).observe(now - last)
                    first, last = False, now
                yield event
                if not isinstance(event, Token):
                    return
        finally:
            request.cancel()  # a no-op once finished; frees the row at once if the client left

    def _mask(self, job: Job) -> Any:
        """The JSON grammar's mask of one choice, fresh (it is stateful), or None."""
        if job.grammar is None:
            return None
        from gemmakit.server.structured import JsonConstraint

        return JsonConstraint(job.grammar, self.tokenizer, self.model.config.vocab_size, tuple(self.stops))

    def _processor(self) -> Any:
        """The watermark of one choice (applied after the sampling filters, as transformers does)."""
        if self.watermark is None:
            return None
        from gemmakit.safety.watermark import watermark_processor

        return watermark_processor(self.watermark)

    def submit(self, request: Request) -> None:
        try:
            self.batcher.submit(request)
        except Busy as e:
            self.counts["busy"] += 1
            status = 503 if "shutting down" in str(e) else 429
            raise ApiError(
                str(e), None, status, "overloaded_error" if status == 429 else "unavailable_error"
            ) from None
        except GenerationError as e:
            raise ApiError(str(e), "prompt") from None

    @torch.inference_mode()
    def score_prompt(
        self, ids: list[int], top: int
    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """Each prompt token's log-prob given the ones before (None for the first) and the top alternatives."""
        with self._score_lock:
            device = next(self.model.parameters()).device
            hidden = self.model.hidden(torch.tensor([ids], device=device))[0, :-1]  # predicts tokens 1..
            target = torch.tensor(ids[1:], device=device)
            lps: list[float | None] = [None]
            tops: list[list[tuple[int, float]]] = [[]]
            for s in range(0, hidden.shape[0], 512):  # the (chunk, V) float32 log-softmax stays small
                logp = F.log_softmax(self.model.head(hidden[s : s + 512]).float(), dim=-1)
                lps += logp.gather(-1, target[s : s + 512, None])[:, 0].tolist()
                if top:
                    values, idx = logp.topk(top, dim=-1)
                    tops += [
                        list(zip(i, v, strict=True))
                        for i, v in zip(idx.tolist(), values.tolist(), strict=True)
                    ]
                else:
                    tops += [[] for _ in range(logp.shape[0])]
            return lps, tops


class _Choice:
    """One choice being generated: text (cut at stop strings), log-probs, finish reason, usage."""

    def __init__(self, server: Server, job: Job, prompt: list[int], index: int) -> None:
        self.server, self.job, self.index = server, job, index
        self.text = TextStream(server.tokenizer, job.stop)
        self.logprobs: list[tuple[int, float, tuple]] = []
        self.finish_reason: str | None = None
        self.prompt_tokens, self.completion_tokens, self.cached = len(prompt), 0, 0
        self.failed: str | None = None
        guard = server.guard
        self.monitor = guard.monitor(job.user_text) if guard is not None and guard.config.output else None
        self.guard_info: dict | None = None  # set when the guard stopped this choice

    async def take(self, event: Token | Finished | Failed) -> str:
        """`feed`, then the guard's output monitor: only text it has checked is returned; a blocked
        answer ends with finish_reason "content_filter" (the caller stops generating)."""
        piece = self.feed(event)
        m = self.monitor
        if m is None or self.failed:
            return piece
        out = await run_in_threadpool(m.push, piece) if piece else ""
        if not m.stopped and (self.finish_reason is not None or not isinstance(event, Token)):
            out += await run_in_threadpool(m.finish)
        if m.stopped:
            self.finish_reason, self.guard_info = "content_filter", guard_info("output", m.verdict)
        return out

    def feed(self, event: Token | Finished | Failed) -> str:
        """Apply one event; the text that may be shown now."""
        if isinstance(event, Token):
            if self.text.stopped:
                return ""
            self.completion_tokens += 1
            piece = self.text.push(event.id)
            if self.job.logprobs is not None and event.logprob is not None:
                self.logprobs.append((event.id, event.logprob, event.top or ()))
            if self.text.stopped:
                self.finish_reason = "stop"
            return piece
        if isinstance(event, Failed):
            self.failed = event.message
            return ""
        self.cached = event.cached_tokens
        if self.finish_reason is None:
            self.finish_reason = "stop" if event.reason in ("stop", "cancelled") else "length"
        return self.text.finish()

    def token_text(self, token_id: int) -> str:
        return self.server.tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    def chat_logprobs(self, entries: list[tuple[int, float, tuple]]) -> dict | None:
        if self.job.logprobs is None:
            return None

        def item(t: int, lp: float) -> dict:
            return {
                "token": self.token_text(t),
                "logprob": lp,
                "bytes": list(self.server.tokenizer.token_bytes(t)),
            }

        return {
            "content": [
                {**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]} for t, lp, top in entries
            ]
        }


def create_app(
    load: Callable[[], tuple[Any, Any]],
    config: ServeConfig | None = None,
    on_fatal: Callable[[], None] | None = None,
) -> FastAPI:
    """The ASGI app. `load()` returns (model, tokenizer); it runs in a thread at startup. `on_fatal` is
    called (from the worker thread) if the batcher's worker stops: `run` then exits with status 1."""
    config = config or ServeConfig()
    server = Server(load, config, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=server.start, name="gemmakit-load", daemon=True)
        loader.start()
        yield
        if server.batcher is not None:
            await run_in_threadpool(server.batcher.close, 0.0)

    app = FastAPI(title="gemmakit", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        server.counts["errors"] += 1
        headers = {"Retry-After": str(config.retry_after_s)} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            e.status_code, "invalid_request_error"
        )
        return JSONResponse(
            ApiError(str(e.detail), None, e.status_code, kind).body(),
            status_code=e.status_code,
            headers=e.headers,
        )

    @app.exception_handler(Exception)
    async def internal_error(_: HttpRequest, e: Exception) -> JSONResponse:
        logger.exception("internal error")
        server.counts["errors"] += 1
        return JSONResponse(
            ApiError("Internal server error", None, 500, "internal_error").body(), status_code=500
        )

    @app.get("/health", **oa.probe(oa.STATUS, "the engine is loaded and its last forward pass succeeded"))
    async def health() -> JSONResponse:
        if server.load_error is not None:
            return JSONResponse({"status": "error", "error": "the model failed to load"}, status_code=503)
        if server.batcher is not None and server.batcher.dead is not None:
            return JSONResponse({"status": "error", "error": "the engine stopped"}, status_code=503)
        if not server.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if not server.batcher.healthy:
            return JSONResponse(
                {"status": "unhealthy", "error": "the last forward pass failed"}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @app.get("/ready", **oa.probe(oa.STATUS, "a one-token generation succeeded"))
    async def ready() -> JSONResponse:
        """Readiness: one 1-token generation through the batcher."""
        server.require_ready()
        job = Job(chat=False, model=config.model_id, prompts=[], max_tokens=1, temperature=0.0)
        async for event in server.events(job, [server.tokenizer.bos_id], 0):
            if isinstance(event, Failed):
                return JSONResponse({"status": "unhealthy"}, status_code=503)
        return JSONResponse({"status": "ready"})

    page_headers = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'",
                    "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(_static("index.html"), media_type="text/html; charset=utf-8", headers=page_headers)

    @app.get("/static/chat.js", include_in_schema=False)
    async def script() -> Response:
        return Response(_static("chat.js"), media_type="text/javascript; charset=utf-8", headers=page_headers)

    @app.get("/v1/models", **oa.probe(oa.MODELS, "the served model", busy=False))
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_id, "object": "model", "created": int(server.started),
                                            "owned_by": "gemmakit", "context_length": server.context}]}  # fmt: skip

    @app.get("/metrics", **oa.METRICS)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(server), media_type="text/plain; version=0.0.4")

    async def body_of(request: HttpRequest) -> dict:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(f"Content-Type must be application/json, got {ctype[:60]!r}", None, 415,
                           "invalid_request_error", "unsupported_media_type")  # fmt: skip
        return parse_json(await request.body())

    async def generate(request: HttpRequest, parse: Callable[..., Job], kind: str) -> Any:
        body = await body_of(request)
        server.require_ready()
        job = parse(body, server.tokenizer, server.context, config.model_id)
        if job.response_format is not None:
            from gemmakit.server.structured import grammar_for

            job.grammar = grammar_for(job.response_format)
        return await _respond(server, request, job, kind)

    @app.post("/v1/chat/completions", **oa.generation(oa.CHAT_REQUEST, oa.CHAT_RESPONSE, oa.CHAT_CHUNK))
    async def chat_completions(request: HttpRequest) -> Any:
        return await generate(request, parse_chat, "chatcmpl")

    @app.post(
        "/v1/completions", **oa.generation(oa.COMPLETION_REQUEST, oa.COMPLETION_RESPONSE, oa.COMPLETION_CHUNK)
    )
    async def completions(request: HttpRequest) -> Any:
        return await generate(request, parse_completion, "cmpl")

    guarded = _Guardrails(app, config)
    guarded.server = server  # for tests and the CLI's shutdown
    return guarded  # type: ignore[return-value]


async def _respond(server: Server, http: HttpRequest, job: Job, kind: str) -> Any:
    rid = f"{kind}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    blocked = await _check_input(server, job)
    if blocked is not None:
        return await _refuse(server, job, rid, created, blocked)
    pairs = [(p, i) for p in job.prompts for i in range(job.n)]  # choice index = prompt * n + i
    if job.stream:
        # Submit before the response starts so a full queue is a 429, not an error inside a 200 stream.
        streams = [server.events(job, p, i) for p, i in pairs]
        firsts = []
        for s in streams:
            firsts.append(await anext(s))
        return StreamingResponse(_sse(server, job, pairs, streams, firsts, rid, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
    choices = [_Choice(server, job, p, k) for k, (p, _) in enumerate(pairs)]
    texts = [""] * len(choices)

    async def run(k: int, prompt: list[int], i: int) -> None:
        if job.max_tokens == 0:  # echo-only scoring
            choices[k].finish_reason = "length"
            return
        events = server.events(job, prompt, i)
        try:
            async for event in events:
                texts[k] += await choices[k].take(event)
                if choices[k].finish_reason is not None and isinstance(event, Token):
                    break  # a stop string or the guard ended it: stop generating now
        finally:
            await events.aclose()

    tasks = [asyncio.ensure_future(run(k, p, i)) for k, (p, i) in enumerate(pairs)]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.25)
            if not all(t.done() for t in tasks) and await http.is_disconnected():
                logger.info("%s: client disconnected; aborted", rid)
                break
    finally:
        for t in tasks:
            t.cancel()  # the events() generators cancel their requests
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()
    if any(c.failed for c in choices):
        raise RuntimeError(f"{rid}: generation failed: {next(c.failed for c in choices if c.failed)}")
    usage = _usage(choices, job)
    if job.chat:
        for k, c in enumerate(choices):
            if c.finish_reason == "content_filter":
                texts[k] += _refusal_text(server, texts[k])
        out = [{"index": k, "message": {"role": "assistant", "content": texts[k]},
                "logprobs": c.chat_logprobs(c.logprobs), "finish_reason": c.finish_reason,
                **({"guard": c.guard_info} if c.guard_info else {})}
               for k, c in enumerate(choices)]  # fmt: skip
        return {"id": rid, "object": "chat.completion", "created": created, "model": job.model, "choices": out,
                "usage": usage}  # fmt: skip
    out = []
    for k, (c, (prompt, _)) in enumerate(zip(choices, pairs, strict=True)):
        text, logprobs = texts[k], None
        if job.echo or job.logprobs is not None:
            logprobs = await _completion_logprobs(server, job, c, prompt)
        if job.echo:
            text = server.tokenizer.decode(prompt) + text
        if c.finish_reason == "content_filter":
            text += _refusal_text(server, texts[k])
        out.append({"index": k, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
                    **({"guard": c.guard_info} if c.guard_info else {})})  # fmt: skip
    return {"id": rid, "object": "text_completion", "created": created, "model": job.model, "choices": out,
            "usage": usage}  # fmt: skip


def _static(name: str) -> bytes:
    """A file of the chat page, shipped in the package (gemmakit/server/static)."""
    return (Path(__file__).parent / "static" / name).read_bytes()


def _usage(choices: list[_Choice], job: Job) -> dict:
    prompt = sum(c.prompt_tokens for c in choices[:: job.n])  # each prompt counted once, as OpenAI
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached for c in choices[:: job.n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


async def _completion_logprobs(server: Server, job: Job, c: _Choice, prompt: list[int]) -> dict:
    """The legacy completions log-probs object: tokens, token_logprobs, top_logprobs, text_offset."""
    top = job.logprobs or 0
    entries: list[tuple[int, float | None, list]] = []
    if job.echo:
        lps, tops = await run_in_threadpool(server.score_prompt, prompt, top)
        entries += [(t, lp, alts) for t, lp, alts in zip(prompt, lps, tops, strict=True)]
    entries += [(t, lp, list(alts)) for t, lp, alts in c.logprobs]
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for t, lp, alts in entries:
        text = c.token_text(t)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({c.token_text(a): b for a, b in alts} if lp is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def _sse(server: Server, job: Job, pairs: list, streams: list, firsts: list, rid: str,
               created: int) -> AsyncIterator[bytes]:  # fmt: skip
    """OpenAI's chunk sequence: a role chunk (chat), content chunks, one finish chunk per choice, an
    optional usage chunk, then [DONE], also after an error."""
    choices = [_Choice(server, job, p, k) for k, (p, _) in enumerate(pairs)]

    def chunk(
        k: int, text: str | None, finish: str | None, logprobs: Any = None, role: bool = False
    ) -> bytes:
        return _chunk(job, rid, created, k, text, finish, logprobs, role, choices[k].guard_info)

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int) -> None:
        await queue.put((k, firsts[k]))
        if isinstance(firsts[k], Token):
            async for e in streams[k]:
                await queue.put((k, e))

    tasks = [asyncio.ensure_future(pump(k)) for k in range(len(streams))]
    try:
        if job.chat:
            for k in range(len(choices)):
                yield chunk(k, None, None, role=True)
        open_choices = len(choices)
        while open_choices:
            k, event = await queue.get()
            c = choices[k]
            if c.finish_reason is not None and isinstance(event, Token):
                continue  # stopped by a stop string: the rest is dropped (its request is cancelled)
            before = len(c.logprobs)
            text = await c.take(event)
            if isinstance(event, Failed):
                error = ApiError("Internal server error", None, 500, "internal_error").body()
                yield b"data: " + json.dumps(error).encode() + b"\n\n"
                break
            new = c.logprobs[before:]
            lp = None
            if new:
                lp = c.chat_logprobs(new) if job.chat else _stream_logprobs(c, new)
            if text or new:
                yield chunk(k, text, None, lp)
            if c.finish_reason is not None:
                if isinstance(event, Token):
                    tasks[k].cancel()  # stop string or guard: the pump's generator cancels the rest
                if c.finish_reason == "content_filter":
                    yield chunk(k, _refusal_text(server, c.monitor.released), None)
                yield chunk(k, None, c.finish_reason)
                open_choices -= 1
        else:
            if job.include_usage:
                yield _usage_chunk(job, rid, created, _usage(choices, job))
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their generators' finally cancel requests
        for s in streams:
            await s.aclose()


def _chunk(job: Job, rid: str, created: int, k: int, text: str | None, finish: str | None, logprobs: Any = None,
           role: bool = False, guard: dict | None = None) -> bytes:  # fmt: skip
    """One SSE event of choice k: the role (chat's first), a text piece, or the finish reason."""
    if job.chat:
        delta: dict = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
        c: dict = {"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        c = {"index": k, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if finish is not None and guard is not None:
        c["guard"] = guard
    body = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion", "created": created,
            "model": job.model, "choices": [c], **({} if job.include_usage else {"usage": None})}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def _usage_chunk(job: Job, rid: str, created: int, usage: dict) -> bytes:
    body = {"id": rid, "object": "chat.completion.chunk" if job.chat else "text_completion", "created": created,
            "model": job.model, "choices": [], "usage": usage}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def guard_info(side: str, verdict: Any) -> dict:
    """What a response says about a guard decision: side, action, flagged policies, scores, reason."""
    return {"side": side, "action": verdict.action, "flagged": list(verdict.flagged),
            "scores": {k: round(v, 4) for k, v in verdict.scores.items()},
            "reason": "check_unavailable" if verdict.error else "policy"}  # fmt: skip


def _refusal_text(server: Server, released: str) -> str:
    return ("\n" if released else "") + server.guard.config.refusal


async def _refuse(server: Server, job: Job, rid: str, created: int, info: dict) -> Any:
    """The answer to a prompt the guard's input check blocked: the refusal as every choice, finish_reason
    "content_filter", the guard's reasons; nothing is generated."""
    n = len(job.prompts) * job.n
    prompt_tokens = sum(len(p) for p in job.prompts)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens,
             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    refusal = server.guard.config.refusal
    if job.stream:

        async def events() -> AsyncIterator[bytes]:
            for k in range(n):
                if job.chat:
                    yield _chunk(job, rid, created, k, None, None, role=True)
                yield _chunk(job, rid, created, k, refusal, None)
                yield _chunk(job, rid, created, k, None, "content_filter", guard=info)
            if job.include_usage:
                yield _usage_chunk(job, rid, created, usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    if job.chat:
        choices = [{"index": k, "message": {"role": "assistant", "content": refusal}, "logprobs": None,
                    "finish_reason": "content_filter", "guard": info} for k in range(n)]  # fmt: skip
    else:
        choices = [{"index": k, "text": refusal, "logprobs": None, "finish_reason": "content_filter", "guard": info}
                   for k in range(n)]  # fmt: skip
    return {"id": rid, "object": "chat.completion" if job.chat else "text_completion", "created": created,
            "model": job.model, "choices": choices, "usage": usage}  # fmt: skip


async def _check_input(server: Server, job: Job) -> dict | None:
    """Run the guard's input check: the guard info if it blocks; a redaction rewrites the prompt."""
    guard = server.guard
    if guard is None or not guard.config.input:
        return None
    verdict = await run_in_threadpool(guard.check_input, job.user_text)
    if verdict.blocked:
        return guard_info("input", verdict)
    if verdict.action == "redact" and verdict.text is not None:
        if job.messages is not None:
            last = max(i for i, m in enumerate(job.messages) if m["role"] == "user")
            job.messages[last] = {**job.messages[last], "content": verdict.text}
            job.prompts = [render_messages(server.tokenizer, job.messages)]
        else:
            first = next(i for i, t in enumerate(job.texts) if t is not None)
            job.texts[first] = verdict.text
            job.prompts[first] = server.tokenizer.encode(verdict.text, bos=True)
    return None


def _stream_logprobs(c: _Choice, entries: list) -> dict:
    return {"tokens": [c.token_text(t) for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{c.token_text(a): b for a, b in alts} for _, _, alts in entries],
            "text_offset": [0 for _ in entries]}  # fmt: skip


def run(load: Callable[[], tuple[Any, Any]], config: ServeConfig, port: int, drain_s: float = 30.0,
        verbose: bool = False) -> int:  # fmt: skip
    """Serve until SIGINT / SIGTERM; then stop accepting and let running requests finish for `drain_s`.
    Returns the exit status: 0, or 1 when the engine's worker stopped (its requests were failed and the
    server shut itself down, so a supervisor such as Kubernetes or systemd starts a fresh one)."""
    import uvicorn

    died = threading.Event()

    def fatal() -> None:
        died.set()
        server.should_exit = True  # uvicorn polls this flag: a graceful shutdown from any thread

    app = create_app(load, config, on_fatal=fatal)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=port, log_level="info" if verbose else "warning",
                                           timeout_keep_alive=5, timeout_graceful_shutdown=drain_s,
                                           access_log=verbose, http=_header_deadline_protocol(config.header_timeout_s),
                                           h11_max_incomplete_event_size=MAX_HEADER_BYTES))  # fmt: skip
    server.run()
    if died.is_set():
        logger.error("the engine's worker stopped; exiting with status 1")
        return 1
    return 0


def _header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, plus a deadline for each request's headers.

    uvicorn times out idle keep-alive connections only after a response; a connection that sends
    nothing, or sends its headers a byte a second (slowloris), is held forever (seen here: open after
    25 s). This closes a connection whose next request's headers are not complete `seconds` after
    the connection opened or the previous response ended.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:  # headers are in
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11
