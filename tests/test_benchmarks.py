"""The benchmark scripts run end to end on the tiny preset (a smoke test: no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ISA_LEVELS = ("amx", "avx512_bf16", "avx512", "avx2", "scalar")


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
    assert result["machine"]["cpus"] >= 1 and result["machine"]["isa_level"] in ISA_LEVELS


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_data_throughput_gemmakit_half_runs(tmp_path: Path) -> None:
    """The gemmakit half on 300 webgen documents, without datatrove; results JSON and Markdown written."""
    bench = _load("data_throughput")
    out, md = tmp_path / "r.json", tmp_path / "RESULTS.md"
    md.write_text("# Decode benchmark results\n\n| a | b |\n")
    args = ["--docs", "300", "--workers", "1", "--skip-datatrove", "--work", str(tmp_path / "work"),
            "--out", str(out), "--markdown", str(md)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"gemmakit x1"}
    row = result["rows"]["gemmakit x1"]
    assert row["docs_in"] == 300 == sum(result["corpus_kinds"].values())
    assert row["kept"] + row["dedup_removed"] == row["after_quality"] < 300
    assert row["dedup_removed"] > 0  # webgen plants exact and near duplicates of earlier prose
    assert sum(row["kept_by_kind"].values()) == row["kept"]
    assert not any(row["kept_by_kind"].get(k) for k in ("short", "symbols", "repetitive"))
    assert row["docs_s_per_core"] == row["docs_s"] == 300 / row["wall_s"]
    assert result["machine"]["cores"] >= 1 and "datatrove" in result["machine"]
    assert result["machine"]["isa_level"] in ISA_LEVELS and "kernel_backend" in result["machine"]
    text = md.read_text()
    assert text.startswith("# Decode benchmark results\n\n| a | b |\n") and "| gemmakit | 1 |" in text
    assert not (tmp_path / "work" / "runs").exists()  # run directories removed unless --keep


def test_machine_info_records_the_isa(monkeypatch) -> None:
    """The shared machine record names the ISA flags, the kernel ISA level and backend, and the env caps."""
    machine_info = _load("machine_info")
    m = machine_info.machine()  # first call: imports and builds the kernels under the unchanged env
    keys = {"cpu", "cpus", "cores", "isa", "isa_level", "kernel_backend", "bf16_prefill", "torch",
            "torch_threads", "cpu_capability", "env", "python", "loadavg"}  # fmt: skip
    assert keys <= m.keys() and m["cpus"] >= 1
    assert m["isa_level"] in ISA_LEVELS and set(m["isa"]) <= set(machine_info.ISA_FLAGS)
    assert m["kernel_backend"] == "torch" or m["kernel_backend"].startswith("native-")
    assert json.loads(json.dumps(m))["isa_level"] == m["isa_level"]
    monkeypatch.setenv("GEMMAKIT_KERNEL_ISA", "scalar")  # caps the level; the loaded kernels stay as built
    capped = machine_info.machine()
    assert capped["isa_level"] == "scalar" and capped["env"]["GEMMAKIT_KERNEL_ISA"] == "scalar"


def test_every_results_file_records_the_isa() -> None:
    """Each benchmarks/results/*.json says which ISA it was measured on: machine.isa_level is a level,
    or says it was recorded before ISA tracking (then the file holds no proof of it)."""
    files = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        machine = json.loads(path.read_text())["machine"]
        assert machine.get("isa_level") in (*ISA_LEVELS, "unknown (recorded before ISA tracking)"), path.name


def test_results_sections_replaced_not_duplicated(tmp_path: Path) -> None:
    results_md = _load("results_md")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Intro\n\ntable\n")
    results_md.update_section(md, "data_throughput", "## Data\n\nfirst")
    results_md.update_section(md, "decode", "## Decode\n\nd1")
    results_md.update_section(md, "data_throughput", "## Data\n\nsecond")
    results_md.update_section(md, "decode", "## Decode\n\nd2")
    text = md.read_text()
    assert text.startswith("# Intro\n\ntable\n") and "second" in text and "d2" in text
    assert "first" not in text and "d1" not in text
    assert text.count("<!-- data_throughput:start -->") == text.count("<!-- decode:end -->") == 1


@pytest.mark.slow  # trains for a minute on 2 cores; the suite's 20-minute budget runs it with --runslow only
def test_alignment_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/alignment.py --smoke: every stage runs from the shipped nano model, the table renders."""
    bench = _load("alignment")
    assert bench.main(["--smoke", "--out", str(tmp_path / "a"), "--md", str(tmp_path / "a.md")]) == 0
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(result["stages"]) == {"reward", "dpo", "rl", "rl_with_rm"}
    md = (tmp_path / "a.md").read_text()
    assert (
        "pairwise accuracy" in md and "win rate vs SFT" in md and result["machine"]["isa_level"] in ISA_LEVELS
    )


@pytest.mark.slow  # trains for a minute on 2 cores; the suite's 20-minute budget runs it with --runslow only
def test_safety_classifier_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/safety_classifier.py --smoke: data, a few training steps from nano, the held-out table
    with the baseline, and the guarded-chat timing render; nothing shipped is replaced."""
    bench = _load("safety_classifier")
    assert bench.main(["--smoke", "--out", str(tmp_path / "s"), "--md", str(tmp_path / "s.md")]) == 0
    md = (tmp_path / "s.md").read_text()
    for row in ("| dangerous_content |", "| harassment |", "| hate_speech |", "| sexually_explicit |"):
        assert row in md
    assert "alt-profanity-check" in md and "Guarded chat" in md


def test_watermark_benchmark_smoke(tmp_path: Path) -> None:
    """benchmarks/watermark.py --smoke: nano generates with and without SynthID, the detector trains,
    the TPR and cost tables render and our Bayesian scores equal transformers'."""
    bench = _load("watermark")
    assert bench.main(["--smoke", "--out", str(tmp_path / "w.json"), "--md", str(tmp_path / "w.md")]) == 0
    result = json.loads((tmp_path / "w.json").read_text())
    assert result["detector"]["max_abs_posterior_diff_vs_transformers"] < 1e-6
    assert result["machine"]["isa_level"] in ISA_LEVELS and "TPR at 1% FPR" in (tmp_path / "w.md").read_text()
