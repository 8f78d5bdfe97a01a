"""Training through its entry points: `gemmakit shards` + `gemmakit train` as subprocesses (pretraining),
LoRA / QLoRA runs through `train.run` (only adapters change; the exported adapter reproduces the model),
and one-line errors for bad recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_tokens
from train_helpers import WORDS, chat_setup, sft_recipe

from gemmakit.data.shards import Shards
from gemmakit.lora import load_adapter
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import recipe_from_dict, run
from gemmakit.train.run import build_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def test_shards_then_pretrain_from_the_command_line(tmp_path: Path) -> None:
    _, tok = chat_setup(tmp_path)
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))}) + "\n")
    (tmp_path / "story.txt").write_text("the cat sat on the mat and the dog sat on the log " * 20)
    proc = _cli("shards", "--tokenizer", str(tok), "--out", str(tmp_path / "shards"), str(corpus),
                str(tmp_path / "story.txt"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "61 documents" in proc.stdout and Shards.open(tmp_path / "shards").n_docs == 61
    recipe = tmp_path / "pre.toml"
    recipe.write_text(
        'method = "pretrain"\n[model]\npreset = "tiny"\n[model.overrides]\nvocab_size = 640\n'
        f'[data]\npath = "{tmp_path / "shards"}"\nval_path = "{tmp_path / "shards"}"\ntokenizer = "{tok}"\n'
        "seq_len = 32\nbatch_size = 4\n[optim]\nlr = 3e-3\nwarmup_steps = 2\n"
        '[loop]\nsteps = 15\nlog_every = 5\neval_every = 5\neval_batches = 2\ndevice = "cpu"\n'
    )
    proc = _cli("train", "--recipe", str(recipe), "--set", "loop.steps=16", "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "step     16/16" in proc.stdout and "val" in proc.stdout
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 16 and records[-1]["loss"] < records[0]["loss"]
    assert sum("val_loss" in r for r in records) >= 3
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the final model chats from the command line
    proc = _cli("generate", "--model", str(tmp_path / "run" / "final"), "--prompt", "the cat",
                "--max-new-tokens", "4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_bad_recipes_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1e-3\n")
    proc = _cli("train", "--recipe", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "optim.learning_rate" in proc.stderr
    proc = _cli("train", "--recipe", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "no such recipe file" in proc.stderr
    good = tmp_path / "good.toml"
    good.write_text('method = "pretrain"\n[data]\npath = "/nonexistent/shards"\ntokenizer = "/nonexistent"\n')
    proc = _cli("train", "--recipe", str(good), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "/nonexistent" in proc.stderr


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_lora_run_trains_only_adapters_and_exports_a_peft_adapter(tmp_path: Path, quantize: str) -> None:
    data, tok = chat_setup(tmp_path)
    raw = sft_recipe(data, tok, loop={"steps": 12}, optim={"lr": 1e-2},
                     lora={"enabled": True, "r": 4, "alpha": 8.0, "quantize": quantize})  # fmt: skip
    recipe = recipe_from_dict(raw)
    base = build_model(recipe, Tokenizer.load(tok))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    result = run(recipe, tmp_path / "run")
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    final = tmp_path / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.model", "train.json"} <= {
        p.name for p in final.iterdir()
    }
    # the trainable state of the last checkpoint is the adapters only
    ckpt_dir = tmp_path / "run" / "checkpoints" / "step-000012"
    from safetensors.torch import load_file

    trained = load_file(str(ckpt_dir / "trainable.safetensors"))
    assert trained and all(".lora_A" in k or ".lora_B" in k for k in trained)
    assert all(v.abs().sum() > 0 for k, v in trained.items() if ".lora_B" in k)  # every B moved off zero
    # the exported adapter on the untouched base reproduces the trained model
    rebuilt = build_model(recipe, Tokenizer.load(tok))
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in base_state.items())
    if quantize != "none":
        from gemmakit.quantize import quantize_model

        rebuilt = quantize_model(rebuilt, quantize)
    load_adapter(rebuilt, final)
    from gemmakit.lora import LoraConfig, apply_lora

    live = apply_lora(build_model(recipe, Tokenizer.load(tok)) if quantize == "none" else
                      __import__("gemmakit.quantize", fromlist=["x"]).quantize_model(build_model(recipe, Tokenizer.load(tok)), quantize),
                      LoraConfig(r=4, alpha=8.0))  # fmt: skip
    live.load_state_dict({k.removeprefix("model."): v for k, v in trained.items()}, strict=False)
    tokens = random_tokens(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens), live(tokens), rtol=0, atol=1e-5)
