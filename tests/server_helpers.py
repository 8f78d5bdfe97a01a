"""Start `gemmakit serve` as a real uvicorn process for the server tests, and wait until it is ready."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def serve(*args: str, log_dir: Path, env: dict[str, str] | None = None, timeout: float = 180):
    """`gemmakit serve ARGS --port P` until /health answers 200; terminated (then killed) afterwards."""
    argv = [sys.executable, "-m", "gemmakit.cli", "-v", "serve", *args, "--port", "{port}"]
    return launch(argv, log_dir=log_dir, env=env, timeout=timeout)


@contextlib.contextmanager
def launch(argv: list[str], log_dir: Path, env: dict[str, str] | None = None, timeout: float = 180,
           healthy: bool = True) -> Iterator[Served]:  # fmt: skip
    """Run `argv` ("{port}" replaced by a free port) until the server answers /health (200 if `healthy`)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([a.replace("{port}", str(port)) for a in argv], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})  # fmt: skip
    served = Served(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"gemmakit serve exited with {proc.returncode}:\n{served.output()}")
            try:
                if httpx.get(served.url + "/health", timeout=2).status_code == 200 or not healthy:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"gemmakit serve not healthy after {timeout} s:\n{served.output()}")
            time.sleep(0.2)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
