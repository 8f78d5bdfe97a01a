"""The nano recipe end to end in smoke mode (CI: a few steps of every stage), and its data generator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import gemmakit
from gemmakit.chat import render
from gemmakit.data import synth
from gemmakit.tokenizer import Tokenizer
from gemmakit.train.nano import build


def test_synth_is_seeded_and_answers_are_computed() -> None:
    a, b = synth.conversations(200, 1), synth.conversations(200, 1)
    assert a == b and a != synth.conversations(200, 2)
    assert {c["kind"] for c in a} == {"arithmetic", "fact", "formatting", "refusal", "greeting"}
    for q, ans in synth.arithmetic_problems(200, 3):
        numbers = [int(t) for t in q.replace("?", " ").replace(".", " ").split() if t.isdigit()]
        assert ans in (numbers[0] + numbers[1], numbers[0] - numbers[1]), (q, ans)
    assert synth.answer_of("7 + 5 = 12. Anna has 12 apples.") == 12 and synth.answer_of("no idea") is None


def test_nano_smoke_build(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = build(tmp_path, smoke=True)
    finally:
        torch.set_num_threads(before)
    model_dir = tmp_path / "model"
    manifest = json.loads((model_dir / "nano.json").read_text())
    assert manifest == json.loads(json.dumps(report))
    assert manifest["pretrain"]["steps"] == 6 and manifest["sft"]["steps"] == 4
    assert manifest["pretrain"]["final_val_loss"] is not None
    assert 0.0 <= manifest["eval_after_sft"]["arithmetic_accuracy"] <= 1.0
    assert len(manifest["eval_after_sft"]["samples"]) == 5
    # the packaged model loads, in bf16 as shipped, and chats with Gemma 3's special ids
    tok = Tokenizer.load(model_dir)
    assert tok.start_of_turn_id == 105 and tok.end_of_turn_id == 106 and tok.vocab_size == 1024
    model = gemmakit.load(model_dir)
    assert next(model.parameters()).dtype == torch.bfloat16
    prompt = render(tok, [{"role": "user", "content": "Hello!"}]).tokens
    [new] = gemmakit.Engine(model).generate([prompt], 8)
    assert len(new) >= 1


def test_build_inputs_and_kernel_source_ship_as_package_data() -> None:
    """`gemmakit nano` and the kernels read files from the installed package, never the repository:
    each of them must be matched by pyproject.toml's package-data globs, or a wheel would lack it."""
    import fnmatch
    import tomllib

    from gemmakit.quantize import kernels
    from gemmakit.train import nano

    pkg = Path(gemmakit.__file__).resolve().parent
    globs = tomllib.loads((pkg.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    needed = [*(nano.BUILD_DIR / n for n in ("shakespeare.tar.xz", "shakespeare.sha256", "nano-pretrain.toml",
                                             "nano-sft.toml")), kernels.SOURCE_FILE]  # fmt: skip
    for path in needed:
        assert path.is_file(), path
        rel = path.relative_to(pkg).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs["gemmakit"]), f"{rel} is not package data"
    assert (
        nano._expected_sha256()
        == hashlib.sha256(nano.BUILD_DIR.joinpath("shakespeare.tar.xz").read_bytes()).hexdigest()
    )
