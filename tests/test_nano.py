"""The nano recipe end to end in smoke mode (CI: a few steps of every stage), and its data generator."""

from __future__ import annotations

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
