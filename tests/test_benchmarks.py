"""The benchmark scripts run end to end on the tiny preset (a smoke test: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_generate_runs_and_agrees_with_transformers(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--preset", "tiny", "--prompt-len", "12", "--new-tokens", "6", "--repeats", "1",
                       "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert set(result["results"]) == {
        "gemmakit eager",
        "gemmakit sdpa",
        "transformers eager",
        "transformers sdpa",
    }
    assert all(r["same_tokens_as_transformers_eager"] for r in result["results"].values())
    assert result["machine"]["cpus"] >= 1
