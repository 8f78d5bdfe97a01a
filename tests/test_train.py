"""The training loop on the tiny preset: learning, exact resume after SIGKILL, corruption fallback,
non-finite halting, failed saves, config mismatch, chunked loss, schedules and recipes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from train_helpers import chat_setup, sft_recipe

import gemmakit
from gemmakit.config import get_preset
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer
from gemmakit.train import NonFiniteError, TrainError, fit, objectives, recipe_from_dict, run
from gemmakit.train import checkpoints as ckpt
from gemmakit.train.loop import Hooks
from gemmakit.train.objectives import NextTokenLoss, chunked_cross_entropy
from gemmakit.train.optim import lr_at, param_groups
from gemmakit.train.recipe import OptimSection, RecipeError, load_recipe
from gemmakit.train.run import build_model
from gemmakit.train.sft import ChatBatches, encode_conversations, read_chat_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-exact comparisons between processes need the same reduction order: one thread everywhere."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sft_lowers_the_loss_changes_every_parameter_and_exports(tmp_path: Path) -> None:
    data, tok = chat_setup(tmp_path)
    recipe = recipe_from_dict(sft_recipe(data, tok, loop={"steps": 20}))
    init = {k: v.clone() for k, v in build_model(recipe, Tokenizer.load(tok)).state_dict().items()}
    result = run(recipe, tmp_path / "run")
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses  # measured: 6.34 -> 4.20
    final = gemmakit.load(tmp_path / "run" / "final")
    unchanged = [k for k, v in final.state_dict().items() if torch.equal(v, init[k])]
    assert not unchanged
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in records)
    assert [r["loss"] for r in records] == result.losses
    train_json = json.loads((tmp_path / "run" / "final" / "train.json").read_text())
    assert train_json["steps"] == 20 and train_json["final_train_loss"] == result.losses[-1]
    # transformers reads the export and computes the same logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").eval()
    tokens = random_tokens(1, 12)
    with torch.no_grad():
        ours = final(tokens)  # eager attention; transformers loads the export with SDPA: rounding only
        # (measured 3.4e-7 * max |logit| with AVX-512 and AVX2 GEMMs)
        torch.testing.assert_close(hf(tokens).logits, ours, rtol=0, atol=4e-6 * float(ours.abs().max()))


@pytest.mark.parametrize("whole_bytes", [0, 256 << 20])  # chunked with recompute; one piece
def test_chunked_loss_equals_full_cross_entropy(monkeypatch, whole_bytes: int) -> None:
    monkeypatch.setattr(objectives, "WHOLE_LOGITS_BYTES", whole_bytes)
    model = Gemma(get_preset("tiny")).init_weights(0.1, seed=0)
    tokens = random_tokens(2, 30)
    targets = torch.roll(tokens, -1, dims=1)
    targets[0, :5] = -100
    full = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    (g_full,) = torch.autograd.grad(full, model.embed.weight)
    chunked = chunked_cross_entropy(model, model.hidden(tokens), targets, chunk=7)
    (g_chunk,) = torch.autograd.grad(chunked, model.embed.weight)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-6)


_KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from gemmakit.train import recipe_from_dict, run
    raw, out, kill_at = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    def hook(step, micro):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    run(recipe_from_dict(raw), out, on_micro=hook)
""")


def test_resume_after_sigkill_is_bit_exact_and_corrupt_checkpoints_are_skipped(tmp_path: Path) -> None:
    data, tok = chat_setup(tmp_path)
    raw = sft_recipe(data, tok, loop={"steps": 12, "save_every": 4, "keep_last": 3})
    recipe = recipe_from_dict(raw)
    reference = run(recipe, tmp_path / "a").losses

    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, json.dumps(raw), str(tmp_path / "b"), "9"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    found = ckpt.latest(tmp_path / "b")
    assert found is not None and found.step == 8
    resumed = run(recipe, tmp_path / "b", resume=True).losses
    assert resumed == reference[8:]  # the same floats, bit for bit
    records = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)) and [r["loss"] for r in records] == reference

    # one flipped byte in the newest checkpoint: it is rejected and the previous one is used
    newest = ckpt.latest(tmp_path / "b")
    assert newest is not None and newest.step == 12
    blob = newest.path / "trainable.safetensors"
    raw_bytes = bytearray(blob.read_bytes())
    raw_bytes[len(raw_bytes) // 2] ^= 0x01
    blob.write_bytes(bytes(raw_bytes))
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.verify(newest.path)
    fallback = ckpt.latest(tmp_path / "b")
    assert fallback is not None and fallback.step == 8
    assert run(recipe, tmp_path / "b", resume=True).losses == reference[8:]
    kept = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000008", "step-000012"]  # keep_last 3, no temp dirs left

    # a different run must not resume from these checkpoints (T11): the differing field is named
    other = recipe_from_dict(sft_recipe(data, tok, loop={"steps": 12}, data={"seq_len": 32}))
    with pytest.raises(TrainError, match=r"data\.seq_len: 40 -> 32"):
        run(other, tmp_path / "b", resume=True)


_KILL_IN_SAVE = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from gemmakit import artifact
    from gemmakit.train import recipe_from_dict, run
    raw, out, kill_step = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    real = artifact.write_json
    def write_json(path, obj):  # SIGKILL just before the manifest of step `kill_step` is written
        if path.name == "manifest.json" and obj.get("step") == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, obj)
    artifact.write_json = write_json
    run(recipe_from_dict(raw), out)
""")


def test_a_kill_during_save_leaves_the_previous_checkpoint_newest(tmp_path: Path) -> None:
    data, tok = chat_setup(tmp_path)
    raw = sft_recipe(data, tok, loop={"steps": 9, "save_every": 3})
    reference = run(recipe_from_dict(raw), tmp_path / "a").losses
    proc = subprocess.run([sys.executable, "-c", _KILL_IN_SAVE, json.dumps(raw), str(tmp_path / "b"), "6"],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = tmp_path / "b" / "checkpoints"
    assert any(".tmp-" in p.name for p in root.iterdir())  # the half-written step-6 is left behind...
    assert ckpt.latest(tmp_path / "b").step == 3  # ...and never taken for a checkpoint
    assert run(recipe_from_dict(raw), tmp_path / "b", resume=True).losses == reference[3:]
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000006", "step-000009"]
    with pytest.raises(TrainError, match="already holds checkpoints.*--resume"):  # no silent restart
        run(recipe_from_dict(raw), tmp_path / "b")


def _tiny_fit_setup(tmp_path: Path) -> tuple:
    data, tok = chat_setup(tmp_path)
    recipe = recipe_from_dict(sft_recipe(data, tok, loop={"steps": 10, "save_every": 2}))
    tokenizer = Tokenizer.load(tok)
    model = build_model(recipe, tokenizer)
    batches = ChatBatches(encode_conversations(read_chat_jsonl(data), tokenizer), 40, 4, pad_id=0)
    return recipe, model, batches


@pytest.mark.parametrize("fault", ["nan_loss", "inf_grad"])
def test_non_finite_halts_before_the_optimizer_step(tmp_path: Path, fault: str) -> None:
    recipe, model, batches = _tiny_fit_setup(tmp_path)
    module = NextTokenLoss(model)
    snapshot = {}

    def inject(step: int, micro: int) -> None:
        if step != 5:
            return
        snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        if fault == "nan_loss":
            with torch.no_grad():
                model.final_norm.weight[0] = float("nan")
            snapshot["final_norm.weight"] = model.final_norm.weight.detach().clone()
        else:
            model.blocks[1].w_up.weight.register_hook(lambda g: g * float("inf"))

    with pytest.raises(NonFiniteError) as err:
        fit(module, batches, recipe, tmp_path / "run", hooks=Hooks(on_micro=inject))
    msg = str(err.value)
    # on_micro gets the 0-based step index 5; the message uses the metrics log's number, 6
    assert "step 6" in msg and "not finite" in msg and "step-000004" in msg, msg
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]  # nothing written at or after the bad step
    after = model.state_dict()
    assert all(torch.equal(after[k], v, ) if not v.isnan().any() else v.isnan().equal(after[k].isnan())
               for k, v in snapshot.items())  # fmt: skip


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    recipe, model, batches = _tiny_fit_setup(tmp_path)
    real = ckpt.write_torch

    def disk_full(path: Path, obj) -> None:
        if path.name == "optimizer.pt" and "step-000004" in str(path.parent):
            raise OSError(28, "No space left on device")
        real(path, obj)

    monkeypatch.setattr(ckpt, "write_torch", disk_full)
    with pytest.raises(ckpt.CheckpointError, match="saving step 4 failed.*previous checkpoint is intact"):
        fit(NextTokenLoss(model), batches, recipe, tmp_path / "run")
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000002"]
    assert ckpt.latest(tmp_path / "run").step == 2


def test_schedules() -> None:
    cos = OptimSection(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(s, 100, cos) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    wsd = OptimSection(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, 100, wsd) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70 and lrs[-1] == pytest.approx(0.0) and lrs[85] < 1.0


def test_weight_decay_spares_norms_and_the_embedding() -> None:
    model = Gemma(get_preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(
        names[id(p)].endswith("norm.weight") or names[id(p)] == "embed.weight" for p in no_decay["params"]
    )
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.wq.weight", "blocks.5.w_down.weight"}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_recipe_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"unknown key\(s\) optim\.lrr; valid keys of \[optim\]: lr"):
        recipe_from_dict({"optim": {"lrr": 1e-3}})
    with pytest.raises(RecipeError, match=r"loop\.steps: expected int, got str"):
        recipe_from_dict({"loop": {"steps": "ten"}})
    with pytest.raises(RecipeError, match="method: expected one of"):
        recipe_from_dict({"method": "ppo"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)
    good = tmp_path / "good.toml"
    good.write_text('method = "sft"\n[optim]\nlr = 1e-3\n')
    r = load_recipe(good, ["optim.lr=5e-4", "loop.steps=7", "model.overrides.dim=32"])
    assert r.optim.lr == 5e-4 and r.loop.steps == 7 and r.model.overrides == {"dim": 32}
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(good, ["steps"])


def test_every_shipped_recipe_loads() -> None:
    # data_*.toml are data-pipeline recipes (tests/test_data_pipeline.py loads those) and guard.toml is
    # a guard file for `gemmakit chat --guard` (tests/test_safety_guard.py loads it).
    others = {"guard.toml"}
    recipes = sorted(
        p
        for p in (ROOT / "recipes").glob("*.toml")
        if not p.name.startswith("data_") and p.name not in others
    )
    recipes += sorted((ROOT / "gemmakit" / "assets" / "nano-build").glob("*.toml"))  # the nano build's
    assert recipes, "no recipes shipped"
    for path in recipes:
        load_recipe(path)
