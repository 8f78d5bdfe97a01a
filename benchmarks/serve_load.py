"""Serving load benchmark: `gemmakit serve` vs llama.cpp's `llama-server`, same model, same load, one run.

    python benchmarks/serve_load.py --llama-server PATH/llama-server [--shape gemma-3-270m]
                                    [--concurrency 1,4,16] [--prompt 128] [--new 64]

llama-server comes from the llama.cpp that llama-cpp-python 0.3.36 vendors (PyPI only, ~8 min on 2 cores):
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
    cmake --build build --target llama-server -j2        # -> build/bin/llama-server

The model is one random-weight checkpoint of a real Gemma shape (`decode.prepare`): gemmakit serves
its bf16 HF directory, llama-server the f16 GGUF that gemmakit exported from it (equal bits, same
tokenizer). Each server gets 2 threads and as many parallel slots as the highest concurrency, then
the same closed-loop load: C clients, each sending requests back to back (3 x C requests in all,
prompt of `--prompt` random token ids, exactly `--new` tokens: stop tokens are banned with
logit_bias on gemmakit and `ignore_eos` on llama-server), streamed over /v1/completions. Measured
client-side per request: time to first token (TTFT), inter-token latency (ITL, gaps between streamed
tokens) and the whole request; per run: generated tokens per second over the wall time.
Results: benchmarks/results/serve_load.json and a section of benchmarks/RESULTS.md, with ratios.

The goal from issue 14: throughput at concurrency 16 >= llama-server's, TTFT p99 at concurrency 4 <=
llama-server's. Only rows of one run compare: this host's speed drifts ~10-15% between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


def start_gemmakit(files: dict, slots: int, ctx: int, log: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    argv = [sys.executable, "-m", "gemmakit.cli", "serve", "--model", files["hf"], "--port", str(port),
            "--parallel", str(slots), "--ctx-size", str(ctx), "--queue", "1024", "--threads", "2",
            "--model-id", "bench"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", proc


def start_llama(binary: str, files: dict, slots: int, ctx: int, log: Path) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    argv = [binary, "-m", files["f16"], "--port", str(port), "--host", "127.0.0.1", "-np", str(slots),
            "-c", str(ctx * slots), "-t", "2", "-tb", "2", "--no-webui", "-a", "bench"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", proc


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server, killing it if it has not exited within 60 s."""
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    for attempt in range(3):
        try:
            return await _one_try(client, url, body)
        except httpx.RemoteProtocolError:  # a kept-alive connection the server had closed: send again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


async def _one_try(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = 0
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    stamps.append(time.perf_counter())
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    if not stamps:
        raise RuntimeError(f"{url}: no tokens streamed")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
            "e2e": stamps[-1] - t0, "chunks": usage or len(stamps)}  # fmt: skip


async def load(url: str, bodies: list[dict], concurrency: int) -> dict:
    queue = list(bodies)
    results: list[dict] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            results.append(await _one(client, url, queue.pop()))

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(r["chunks"] for r in results)
    itl = [g for r in results for g in r["itl"]]
    ttft = [r["ttft"] for r in results]
    return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "itl_p50": _pct(itl, 50),
            "itl_p99": _pct(itl, 99), "e2e_p50": _pct([r["e2e"] for r in results], 50)}  # fmt: skip


def _steps(url: str) -> dict[str, float]:
    """The batcher's step counters from gemmakit's /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for kind in ("decode", "prefill"):
            for what in ("steps", "seconds"):
                if line.startswith(f"gemmakit_{kind}_{what}_total "):
                    out[f"{kind}_{what}"] = float(line.split()[1])
    return out


def _bodies(
    system: str, vocab: int, stops: list[int], n: int, prompt: int, new: int, seed: int
) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [2] + [rng.randrange(10, vocab) for _ in range(prompt - 1)]
        body = {
            "model": "bench",
            "prompt": ids,
            "max_tokens": new,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if system == "gemmakit":
            body["logit_bias"] = {str(t): -100 for t in stops}
        else:
            body["ignore_eos"] = True
        out.append(body)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", required=True, help="path to llama.cpp's llama-server binary")
    p.add_argument("--shape", default="gemma-3-270m")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-serve"))
    p.add_argument("--out", default=str(HERE / "results" / "serve_load.json"))
    p.add_argument("--md", default=str(HERE / "RESULTS.md"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from decode import prepare
    from machine_info import machine
    from results_md import update_section

    from gemmakit.tokenizer import Tokenizer

    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(args.shape, work)
    tok = Tokenizer.load(files["hf"])
    stops = list(tok.stop_ids)
    ctx = args.prompt + args.new + 8
    slots = max(levels)
    version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=60)
    results: dict = {"machine": machine(), "shape": args.shape, "prompt": args.prompt, "new": args.new,
                     "slots": slots, "llama_server": " ".join((version.stdout + version.stderr).split())[:200],
                     "rows": {}}  # fmt: skip
    for system in ("gemmakit", "llama.cpp"):
        log = work / f"{system}.log"
        if system == "gemmakit":
            url, proc = start_gemmakit(files, slots, ctx, log)
        else:
            url, proc = start_llama(args.llama_server, files, slots, ctx, log)
        try:
            _wait(url, proc)
            name = "gemmakit" if system == "gemmakit" else "llama.cpp"
            warm = _bodies(name, tok.vocab_size, stops, 2, args.prompt, 8, seed=99)
            asyncio.run(load(url, warm, 1))  # warm-up: kernels built, caches touched
            for c in levels:
                bodies = _bodies(name, tok.vocab_size, stops, 3 * c, args.prompt, args.new, seed=c)
                before = _steps(url) if system == "gemmakit" else None
                row = asyncio.run(load(url, bodies, c))
                if before is not None:  # the worker's own step times: what the HTTP side adds shows
                    after = _steps(url)
                    for kind in ("decode", "prefill"):
                        n = after[f"{kind}_steps"] - before[f"{kind}_steps"]
                        row[f"{kind}_step_ms"] = (
                            (after[f"{kind}_seconds"] - before[f"{kind}_seconds"]) / max(n, 1) * 1e3
                        )
                        row[f"{kind}_steps"] = n
                results["rows"][f"{system} c{c}"] = row
                print(f"{system:10s} c={c:<3d} {row['tok_per_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50']*1e3:7.0f} ms "
                      f"p99 {row['ttft_p99']*1e3:7.0f} ms  ITL p50 {row['itl_p50']*1e3:6.1f} ms "
                      f"p99 {row['itl_p99']*1e3:6.1f} ms"
                      + (f"  decode step {row['decode_step_ms']:.1f} ms x {row['decode_steps']:.0f}, prefill step "
                         f"{row['prefill_step_ms']:.0f} ms x {row['prefill_steps']:.0f}" if "decode_step_ms" in row else ""),
                      flush=True)  # fmt: skip
        finally:
            stop(proc)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.out)
    update_section(Path(args.md), "serve_load", to_markdown(results, levels))
    return 0


def to_markdown(r: dict, levels: list[int]) -> str:
    m = r["machine"]
    lines = [f"## Serving load: gemmakit serve vs llama-server ({r['shape']}, random weights)", "",
             f"Machine: {m.get('cpu', '?')}, ISA {m.get('isa_level', '?')}; 2 threads per server, {r['slots']} "
             f"slots; prompt {r['prompt']} tokens, {r['new']} new tokens, greedy, streamed /v1/completions, "
             "3 x C requests from C closed-loop clients. gemmakit serves the bf16 checkpoint, llama-server "
             f"the f16 GGUF gemmakit exported from it; llama-server: {r.get('llama_server', '?')}. "
             "`python benchmarks/serve_load.py --llama-server ...`", "",
             "| C | system | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | throughput ratio | TTFT p99 ratio |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in levels:
        g, ll = r["rows"][f"gemmakit c{c}"], r["rows"][f"llama.cpp c{c}"]
        for name, row in (("gemmakit", g), ("llama-server", ll)):
            ratio = f"{g['tok_per_s'] / ll['tok_per_s']:.2f}x" if name == "gemmakit" else ""
            tratio = f"{g['ttft_p99'] / ll['ttft_p99']:.2f}x" if name == "gemmakit" else ""
            lines.append(f"| {c} | {name} | {row['tok_per_s']:.1f} | {row['ttft_p50']*1e3:.0f} / {row['ttft_p99']*1e3:.0f} "
                         f"| {row['itl_p50']*1e3:.1f} / {row['itl_p99']*1e3:.1f} | {ratio} | {tratio} |")  # fmt: skip
    lines += ["", "Ratios are gemmakit / llama-server: throughput above 1 and TTFT below 1 favour gemmakit."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
