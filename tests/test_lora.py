"""gemmakit.lora: training touches only adapters, merging, PEFT's on-disk format both ways, QLoRA, errors.

References: PEFT itself (`PeftModel.from_pretrained` / `get_peft_model` on the HF transformers model
holding the same base weights) for the logits of a LoRA model and for the adapter format; PEFT's own
initialisation for A's range; plain autograd through `nn.Linear` holding the dequantized matrices for
QLoRA gradients. Models are the tiny random ones of conftest.py.
"""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import make_hf_model, random_tokens, twin_of
from safetensors.torch import load_file, save_file
from torch import nn

from gemmakit.lora import (
    TARGETS,
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from gemmakit.model import Gemma
from gemmakit.quantize import QLinear, QMatrix, kernels, quantize_model

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _loss(model: Gemma, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def _train(model: Gemma, steps: int = 8, lr: float = 1e-2) -> tuple[float, float]:
    """A few AdamW steps on one random batch; (loss before, loss after), both in eval mode."""
    tokens = random_tokens(2, 17, seed=3)
    opt = torch.optim.AdamW(lora_parameters(model), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = _loss(model.eval(), tokens).item()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, tokens).backward()
        opt.step()
    with torch.no_grad():
        after = _loss(model.eval(), tokens).item()
    return before, after


def _randomize_adapters(model: Gemma, seed: int = 5, std: float = 0.05) -> None:
    """Nonzero B (and a fresh A), so an adapter visibly changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(r=0), "r"),
        (dict(r=2.5), "r"),
        (dict(r=True), "r"),
        (dict(alpha=0), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(targets=()), "targets"),
        (dict(targets=("wq", "wq")), "targets"),
        (dict(targets=("q_proj",)), "targets"),
    ],
)
def test_bad_config_is_a_one_line_error(kwargs: dict, field: str) -> None:
    with pytest.raises(LoraError) as e:
        LoraConfig(**kwargs)
    assert _one_line(e).startswith(f"{field}:")


def test_unknown_target_lists_the_valid_ones() -> None:
    with pytest.raises(LoraError) as e:
        LoraConfig(targets=("wq", "lm_head"))
    msg = _one_line(e)
    assert "'lm_head'" in msg and all(t in msg for t in TARGETS)
    assert LoraConfig(targets=["wq", "wv"]).targets == ("wq", "wv")  # lists (from JSON/TOML) become tuples


# ---- applying, training, merging -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["gemma1-mqa", "gemma3"])
def test_fresh_adapter_is_exactly_the_base_model(case: str) -> None:
    model = twin_of(make_hf_model(case))
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        base = model(tokens)
        apply_lora(model, LoraConfig(r=4), seed=0)
        assert torch.equal(model(tokens), base)  # B = 0: the update adds exact zeros
    assert all(m.lora_A.abs().min() > 0 for m in _lora_layers(model))  # ... while A is random
    again = apply_lora(twin_of(make_hf_model(case)), LoraConfig(r=4, dropout=0.5), seed=0).train()
    with torch.no_grad():
        assert torch.equal(again(tokens), base)  # dropout in train mode touches the adapter's input only
    again = apply_lora(twin_of(make_hf_model(case)), LoraConfig(r=4), seed=0)  # same seed, same A
    assert all(torch.equal(v, lora_state_dict(again)[k]) for k, v in lora_state_dict(model).items())


def test_init_matches_peft() -> None:
    """A is kaiming-uniform(a=sqrt(5)) like PEFT's (same range per shape), B is zero as in PEFT."""
    hf = make_hf_model("gemma1-mha")
    model = apply_lora(twin_of(hf), LoraConfig(r=8), seed=0)
    torch.manual_seed(0)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=HF_TARGETS))
    ref_a = {n: p for n, p in ref.named_parameters() if "lora_A" in n}
    ref_b = [p for n, p in ref.named_parameters() if "lora_B" in n]
    assert all(not p.any() for p in ref_b) and all(not m.lora_B.any() for m in _lora_layers(model))
    ours = {n: p for n, p in model.named_parameters() if n.endswith("lora_A")}
    assert len(ours) == len(ref_a) == 6 * 7
    for shape in {tuple(p.shape) for p in ref_a.values()}:
        ref_max = max(p.abs().max().item() for p in ref_a.values() if tuple(p.shape) == shape)
        our_max = max(p.abs().max().item() for p in ours.values() if tuple(p.shape) == shape)
        assert 0.9 * ref_max < our_max <= ref_max * 1.1, (shape, our_max, ref_max)
        our_std = torch.cat([p.flatten() for p in ours.values() if tuple(p.shape) == shape]).std()
        ref_std = torch.cat([p.detach().flatten() for p in ref_a.values() if tuple(p.shape) == shape]).std()
        assert math.isclose(our_std.item(), ref_std.item(), rel_tol=0.1)


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def test_training_changes_only_the_adapters() -> None:
    model = twin_of(make_hf_model("gemma3"))
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1), seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"blocks.{i}.{t}.{ab}" for i in range(6) for t in TARGETS for ab in ("lora_A", "lora_B")
    }
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    before, after = _train(model)
    assert after < 0.9 * before, (before, after)
    now = lora_state_dict(model)
    assert [k for k, v in adapters.items() if torch.equal(v, now[k])] == []  # every adapter tensor moved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())  # base: bit-identical


def test_merged_equals_unmerged_after_training(tmp_path) -> None:
    hf = make_hf_model("gemma2")
    model = apply_lora(twin_of(hf), LoraConfig(r=4, alpha=12), seed=1)
    _train(model, steps=4)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    tokens = random_tokens(2, 12, seed=7)
    with torch.no_grad():
        layer = model.blocks[2].w_up(x)
        unmerged = model(tokens)
        save_adapter(model, tmp_path / "a", LoraConfig(r=4, alpha=12))
        merge_lora(model)
        merged = model(tokens)
        torch.testing.assert_close(model.blocks[2].w_up(x), layer, atol=1e-5, rtol=1e-5)
        ref = peft.PeftModel.from_pretrained(hf, tmp_path / "a").merge_and_unload()(input_ids=tokens).logits
        base = twin_of(make_hf_model("gemma2"))(tokens)
    assert not _lora_layers(model) and type(model.blocks[0].wq) is nn.Linear
    assert set(model.state_dict()) == set(Gemma(model.config).state_dict())  # a plain model again
    assert (unmerged - base).abs().max() > 0.1  # training moved the logits
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)  # PEFT's merge of the same adapter
    # Two fp32 op orders (x W^T + s (x A^T) B^T vs x (W + s B A)^T) differ by ~1 ulp per layer; the
    # std-0.3 random weights amplify that to 2e-5..7e-5 at |logits| ~10-15 over 6 layers (measured).
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-5)


def test_apply_twice_is_refused() -> None:
    model = apply_lora(twin_of(make_hf_model("gemma1-mqa")), LoraConfig(r=2))
    with pytest.raises(LoraError) as e:
        apply_lora(model, LoraConfig(r=2))
    assert "already has LoRA" in _one_line(e)


# ---- PEFT parity -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, cfg",
    [
        ("gemma1-mqa", LoraConfig(r=4, alpha=12)),
        ("gemma2", LoraConfig()),
        ("gemma3", LoraConfig(r=2, alpha=5, targets=("wq", "wv", "w_down"))),
    ],
)
def test_saved_adapter_loads_in_peft_with_the_same_logits(case: str, cfg: LoraConfig, tmp_path) -> None:
    hf = make_hf_model(case)
    model = apply_lora(twin_of(hf), cfg, seed=0)
    _randomize_adapters(model)
    out = save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path="tiny-gemma")
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        base = hf(input_ids=tokens).logits
        ref_model = peft.PeftModel.from_pretrained(hf, out).eval()
        ref = ref_model(input_ids=tokens).logits
        ours = model(tokens)
    pc = ref_model.peft_config["default"]
    assert (pc.r, pc.lora_alpha, pc.base_model_name_or_path) == (cfg.r, cfg.alpha, "tiny-gemma")
    assert (ref - base).abs().max() > 1e-2  # the adapter really changes the model
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "peft-lora" and manifest["lora"]["r"] == cfg.r


@pytest.mark.parametrize(
    "case, targets, safe",
    [
        ("gemma3", HF_TARGETS, True),
        ("gemma1-mha", ["q_proj", "down_proj"], True),
        ("gemma3-mqa", HF_TARGETS, False),
    ],
)
def test_peft_written_adapter_loads_with_peft_logits(case: str, targets: list, safe: bool, tmp_path) -> None:
    hf = make_hf_model(case)
    model = twin_of(hf)  # before PEFT wraps hf's linears
    torch.manual_seed(0)
    ref_model = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, task_type="CAUSAL_LM")
    ).eval()
    with torch.no_grad():
        for n, p in ref_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    ref_model.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    tokens = random_tokens(2, 12)
    with torch.no_grad():
        ref = ref_model(input_ids=tokens).logits
        load_adapter(model, tmp_path / "peft")
        ours = model(tokens)
    assert len(_lora_layers(model)) == model.config.n_layers * len(targets)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_gemmakit_round_trip(tmp_path) -> None:
    cfg = LoraConfig(r=3, alpha=7, targets=("wk", "wo", "w_gate"))
    model = apply_lora(twin_of(make_hf_model("gemma2")), cfg, seed=2)
    _randomize_adapters(model)
    save_adapter(model, tmp_path / "a", cfg)
    other = load_adapter(twin_of(make_hf_model("gemma2")), tmp_path / "a")
    want, got = lora_state_dict(model), lora_state_dict(other)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert {m.scaling for m in _lora_layers(other)} == {7 / 3}


# ---- QLoRA ---------------------------------------------------------------------------------------

QUANT = [("int8", None), ("int4", 32)]


@pytest.mark.parametrize("scheme, group", QUANT)
def test_qlora_trains_only_adapters_and_refuses_merge(scheme: str, group: int | None) -> None:
    model = quantize_model(twin_of(make_hf_model("gemma3")), scheme, group)
    apply_lora(model, LoraConfig(r=4, alpha=8), seed=0)
    assert isinstance(model.blocks[0].wq.base, QLinear)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    assert any(v.dtype in (torch.int8, torch.uint8) for v in frozen.values())
    adapters = {k: v.clone() for k, v in lora_state_dict(model).items()}
    before, after = _train(model)
    assert after < 0.9 * before, (before, after)
    now = lora_state_dict(model)
    assert [k for k, v in adapters.items() if torch.equal(v, now[k])] == []
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())  # packed buffers untouched
    with pytest.raises(LoraError) as e:
        merge_lora(model)
    assert "quantized" in _one_line(e) and scheme in str(e.value)
    assert len(_lora_layers(model)) == 6 * 7  # refused before anything was changed


def _dequantized_twin(qmodel: Gemma) -> Gemma:
    """A float model whose linears and embedding hold the quantized model's dequantized matrices."""
    ref = Gemma(qmodel.config)
    sd = {f"{name}.weight": m.dequantize() for name, m in qmodel.named_modules() if isinstance(m, QMatrix)}
    for name, t in qmodel.state_dict().items():
        if name.endswith("norm.weight"):
            sd[name] = t
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("scheme, group", QUANT)
@pytest.mark.parametrize("t", [9, 40])  # 8 rows: the native GEMV; 78 rows: dequantized tiles + GEMM
def test_qlora_gradients_match_float_autograd(scheme: str, group: int | None, t: int) -> None:
    """Gradients through the frozen quantized matrices equal autograd through nn.Linear(dequantized W)."""
    qmodel = quantize_model(twin_of(make_hf_model("gemma1-mha")), scheme, group)
    ref = _dequantized_twin(qmodel)
    cfg = LoraConfig(r=4, alpha=8)
    for m in (qmodel, ref):
        apply_lora(m, cfg, seed=0)
        _randomize_adapters(m)
    tokens = random_tokens(1 if t < 20 else 2, t, seed=9)
    prev = kernels.bf16_prefill()
    try:
        kernels.bf16_prefill(False)  # fp32 products, so only summation order differs from F.linear
        for m in (qmodel, ref):
            _loss(m, tokens).backward()
    finally:
        kernels.bf16_prefill(prev)
    assert all(p.grad is None for n, p in ref.named_parameters() if "lora_" not in n)  # frozen base
    grads_ref = [p.grad for p in lora_parameters(ref)]
    grads_q = [p.grad for p in lora_parameters(qmodel)]
    assert all(g is not None and g.abs().max() > 0 for g in grads_q)
    for gq, gr in zip(grads_q, grads_ref, strict=True):
        torch.testing.assert_close(gq, gr, atol=1e-5, rtol=1e-4)


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    """(directory, config) of an adapter saved from the gemma1-mqa twin."""
    cfg = LoraConfig(r=4)
    model = apply_lora(twin_of(make_hf_model("gemma1-mqa")), cfg, seed=0)
    _randomize_adapters(model)
    return save_adapter(model, tmp_path / "adapter", cfg), cfg


def _load_fails(path, case: str = "gemma1-mqa") -> str:
    model = twin_of(make_hf_model(case))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(LoraError) as e:
        load_adapter(model, path)
    assert not _lora_layers(model) and all(p.requires_grad for p in model.parameters())  # untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return _one_line(e)


def _edit_weights(path, edit) -> None:
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(path, **changes) -> None:
    f = path / "adapter_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))


KEY = "base_model.model.model.layers.2.self_attn.k_proj.lora_B.weight"


def test_mismatched_base_names_the_file_and_tensor(saved) -> None:
    path, _ = saved
    msg = _load_fails(path, "gemma1-mha")  # 4 kv heads: k_proj's B is (64, r), the file holds (16, r)
    assert "adapter_model.safetensors" in msg and "k_proj.lora_B.weight" in msg and "[16, 4]" in msg
    msg = _load_fails(path, "gemma3-mqa")  # 7 layers, the file has 6
    assert "missing tensor base_model.model.model.layers.6." in msg


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda t: t.update(extra=torch.zeros(2)), "unexpected tensor extra"),
        (
            lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
            "unexpected tensor",
        ),
        (lambda t: t.pop(KEY), f"missing tensor {KEY}"),
        (lambda t: t.update({KEY: torch.zeros(16, 5)}), f"{KEY} has shape [16, 5], expected [16, 4]"),
        (lambda t: t.update({KEY: torch.zeros(16, 4, dtype=torch.int32)}), "expected a float dtype"),
    ],
)
def test_bad_adapter_tensors(saved, edit, needle: str) -> None:
    path, _ = saved
    _edit_weights(path, edit)
    msg = _load_fails(path)
    assert needle in msg and "adapter_model.safetensors" in msg


@pytest.mark.parametrize(
    "changes, needle",
    [
        (dict(peft_type="PREFIX_TUNING"), "peft_type"),
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(bias="all"), "bias"),
        (dict(layers_to_transform=[0, 1]), "layers_to_transform"),
        (dict(r=0), "r: expected a positive integer"),
        (dict(lora_alpha="x"), "alpha"),
        (dict(target_modules=["q_proj", "embed_tokens"]), "['embed_tokens']"),
    ],
)
def test_bad_adapter_config(saved, changes: dict, needle: str) -> None:
    path, _ = saved
    _edit_config(path, **changes)
    msg = _load_fails(path)
    assert needle in msg and "adapter_config.json" in msg


def test_unreadable_adapter_files(saved, tmp_path) -> None:
    path, _ = saved
    assert "expected a PEFT adapter directory" in _load_fails(tmp_path / "nowhere")
    (path / "adapter_model.safetensors").write_bytes(b"not a weights file at all")
    assert "adapter_model.safetensors" in _load_fails(path)
    (path / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors or adapter_model.bin" in _load_fails(path)
    (path / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json: unreadable" in _load_fails(path)


def test_save_and_load_refusals(saved, tmp_path) -> None:
    path, cfg = saved
    model = apply_lora(twin_of(make_hf_model("gemma1-mqa")), cfg, seed=0)
    with pytest.raises(LoraError) as e:
        load_adapter(model, path)
    assert "already has LoRA" in _one_line(e)
    with pytest.raises(LoraError) as e:
        save_adapter(model, tmp_path / "b", LoraConfig(r=8))
    assert "r=4" in _one_line(e) and "r=8" in str(e.value)
    with pytest.raises(LoraError) as e:
        save_adapter(model, tmp_path / "b", LoraConfig(r=4, targets=("wq",)))
    assert "targets" in _one_line(e)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(LoraError) as e:
        save_adapter(model, path, cfg)  # not empty, no overwrite
    assert "not empty" in _one_line(e)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    save_adapter(model, path, cfg, overwrite=True)
    assert load_file(path / "adapter_model.safetensors")[KEY].abs().max() == 0  # the fresh B = 0 replaced it
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind
