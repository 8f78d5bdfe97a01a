"""The Dockerfile and the Kubernetes manifest name only paths, ports and flags the server has.

Parsed, not built (no container runtime in CI): every COPY source exists, ports agree across
EXPOSE, the entrypoint, the container and the Service, every probe path is a route of the app,
the server flags parse with gemmakit's own CLI parser, the drain fits the grace period, and the
memory request covers the weights plus the KV cache rows the server reserves.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import torch
import yaml

from gemmakit.checkpoint import estimate_memory
from gemmakit.cli import NANO_DIR, build_parser
from gemmakit.config import from_hf_dict
from gemmakit.infer.kv_cache import kv_cache_bytes
from gemmakit.server import ServeConfig, create_app

ROOT = Path(__file__).resolve().parents[1]


def _dockerfile() -> dict[str, list[str]]:
    """instruction -> its argument strings, continuation lines joined."""
    out: dict[str, list[str]] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.setdefault(word.upper(), []).append(rest.strip())
    return out


def _routes() -> set[str]:
    app = create_app(lambda: (None, None), ServeConfig())
    return {r.path for r in app.app.routes}


def _k8s() -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"Deployment", "Service"}
    return kinds["Deployment"], kinds["Service"]


def _server_args(extra: list[str]) -> object:
    entry = json.loads(_dockerfile()["ENTRYPOINT"][0])
    assert entry[:2] == ["gemmakit", "serve"]
    return build_parser().parse_args(entry[1:] + extra)


def test_dockerfile_paths_ports_and_healthcheck_exist() -> None:
    d = _dockerfile()
    for copy in d["COPY"]:
        *sources, _ = shlex.split(copy)
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    args = _server_args([])
    assert d["EXPOSE"] == [str(args.port)] and args.host == "0.0.0.0"
    [health] = d["HEALTHCHECK"]
    path = health.split(f"127.0.0.1:{args.port}", 1)[1].split("'", 1)[0]
    assert path in _routes()
    assert any("torch==2.13.0" in run for run in d["RUN"])  # the pinned torch, from the chosen wheel index


def test_kubernetes_manifest_matches_the_server() -> None:
    deployment, service = _k8s()
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    args = _server_args(container["args"])
    [port] = container["ports"]
    assert port["containerPort"] == args.port
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    routes = _routes()
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes and get["port"] == port["name"]
    assert spec["terminationGracePeriodSeconds"] > args.drain  # SIGTERM drain finishes before SIGKILL
    assert [e["name"] for e in container["env"]] == ["GEMMAKIT_API_KEY"]
    # memory: the weights, `parallel` KV rows of the default context (float32 activations: the
    # largest cache dtype), and 1 GiB for Python and PyTorch
    cfg = from_hf_dict(json.loads((NANO_DIR / "config.json").read_text()))
    ctx = args.ctx_size or min(cfg.max_seq_len, 8192)
    need = estimate_memory(cfg, torch.bfloat16)["weight_bytes"]
    need += kv_cache_bytes(cfg, args.parallel, ctx, torch.float32) + 2**30
    request = container["resources"]["requests"]["memory"]
    assert request.endswith("Mi") and int(request[:-2]) * 2**20 >= need, (request, need / 2**20)
