"""`gemmakit serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn, the `serve` extra).

`protocol` checks OpenAI request bodies and formats answers; `app` holds the routes and the ASGI
guardrails (Host allowlist, API key, body limit) over one continuous batcher (`infer.batching`).
"""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app", "run"]


def __getattr__(name: str):  # fastapi is imported only when the server is used
    if name in __all__:
        from gemmakit.server import app

        return getattr(app, name)
    raise AttributeError(name)
