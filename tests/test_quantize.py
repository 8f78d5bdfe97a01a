"""gemmakit.quantize: packing, native kernels, the swapped model, quantized checkpoints, the CLI.

References: the packed layouts' scalar definitions written out in this file; fp64 products of the
dequantized matrices for the kernels; HF transformers (the oracle) holding the dequantized weights
for the whole quantized model; the float model for the documented error bounds.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model, random_tokens, twin_of
from safetensors import safe_open

import gemmakit
from gemmakit.checkpoint import CheckpointError, internal_name_to_hf, load_model, save_hf
from gemmakit.config import PRESETS
from gemmakit.infer import Engine
from gemmakit.model import Gemma
from gemmakit.quantize import (
    QEmbedding,
    QLinear,
    QMatrix,
    QuantError,
    dequantize_matrix,
    kernels,
    load_any,
    load_quantized,
    quantize_model,
    quantize_state_dict,
    save_quantized,
    with_bf16_kernels,
)
from gemmakit.quantize.schemes import pack_nibbles, quantize_matrix, unpack_nibbles

SCHEMES = [("int8", None), ("int4", 32), ("int4", 64)]
MODEL_SCHEMES = SCHEMES[:2]  # the HF test models have in_features 96 (w_down), which group 64 does not divide
# Random tiny models amplify weight error layer by layer; these stds give well-separated float logits
# (RMS ~0.8 for Gemma 1, ~2.5 for the sandwich-norm Gemma 2/3) instead of a chaotic network.
STD = {"gemma1-mqa": 0.1, "gemma1-mha": 0.1, "gemma2": 0.3, "gemma3": 0.3, "gemma3-mqa": 0.3}
CASES = ["gemma1-mqa", "gemma2", "gemma3"]


@pytest.fixture(scope="module")
def kern():
    k = kernels.native()
    if k is None:
        pytest.skip(f"no native kernels: {kernels._state.get('why')}")
    return k


def _q(model: Gemma, scheme: str, group: int | None) -> Gemma:
    return quantize_model(copy.deepcopy(model), scheme, group)


# ---- schemes -------------------------------------------------------------------------------------


def test_int4_layout_matches_its_scalar_definition() -> None:
    """Column D*i + L of a block of 8*D columns is nibble i of little-endian uint32 lane L."""
    q = torch.randint(0, 16, (3, 224), dtype=torch.uint8)  # one full 128-column block + a 96-column tail
    packed = pack_nibbles(q)
    assert packed.shape == (3, 112) and torch.equal(unpack_nibbles(packed), q)
    for row in range(3):
        for col in range(224):
            start, d = (0, 16) if col < 128 else (128, 12)
            lane, i = (col - start) % d, (col - start) // d
            word = int.from_bytes(bytes(packed[row, start // 2 + 4 * lane : start // 2 + 4 * lane + 4].tolist()), "little")  # fmt: skip
            assert (word >> (4 * i)) & 15 == q[row, col]


def test_weight_error_bounds() -> None:
    """Per element: int8 within half a row step, int4 within half a group step; RMS as documented."""
    w = torch.randn(256, 2048, generator=torch.Generator().manual_seed(0)) * 0.02
    w[3] = 0.0  # an all-zero row and group must survive (no division by zero)
    rel = {}
    for scheme, group in SCHEMES + [("int4", 128)]:
        packed = quantize_matrix(w, scheme, group)
        deq = dequantize_matrix(packed, scheme, group)
        err = (deq - w).abs()
        if scheme == "int8":
            step = w.abs().amax(1, keepdim=True) / 127
            assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-12)
        else:
            wg = w.view(256, -1, group)
            step = (wg.amax(-1) - wg.amin(-1)) / 15
            slack = 0.02 * step + 2e-3 * wg.abs().amax(-1)  # bf16 s and m
            assert torch.all(err.view(256, -1, group) <= (step / 2 + slack)[..., None])
        assert torch.equal(deq[3], torch.zeros(2048))
        rel[(scheme, group)] = ((deq - w).norm() / w.norm()).item()
    # documented in gemmakit/quantize/schemes.py (measured 0.83%, 7.8%, 9.0%, 10.0%)
    assert rel[("int8", None)] < 0.009 and rel[("int4", 32)] < 0.081
    assert rel[("int4", 32)] < rel[("int4", 64)] < 0.093 and rel[("int4", 64)] < rel[("int4", 128)] < 0.103


def test_bad_arguments_are_one_line_errors() -> None:
    model = twin_of(make_hf_model("gemma1-mqa"))  # in_features 64 and 96 (w_down)
    for kwargs, needle in [
        (dict(scheme="int3"), "scheme: expected one of"),
        (dict(scheme="int8", group_size=32), "int8 uses one scale per output row"),
        (dict(scheme="int4", group_size=48), "positive multiple of 32"),
        (dict(scheme="int4", group_size=0), "positive multiple of 32"),
        (dict(scheme="int4", group_size=64), "64 does not divide in_features 96 of blocks.0.w_down.weight"),
    ]:
        with pytest.raises(QuantError) as info:
            quantize_state_dict(model, model.config, **kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(QuantError, match="missing"):
        quantize_state_dict({"embed.weight": model.embed.weight}, model.config)


def test_quantize_state_dict_is_pure() -> None:
    model = twin_of(make_hf_model("gemma3"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qsd, meta = quantize_state_dict(model, model.config, "int4", 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.embed, torch.nn.Embedding) and isinstance(model.blocks[0].wq, torch.nn.Linear)
    assert meta["scheme"] == "int4" and meta["group_size"] == 32 and len(meta["tensors"]) == 1 + 7 * 6
    assert (
        qsd["blocks.0.wq.qweight"].dtype == torch.uint8
        and qsd["blocks.0.attn_norm.weight"].dtype == torch.float32
    )


# 2 x 80 = 160 activation rows: above every kernels.CROSSOVERS row (at most 128), so a forward of this
# shape takes the tiled GEMM on every ISA level, which is HF's fp32 GEMM bit for bit under exact_prefill.
PREFILL_SHAPE = (2, 80)
assert (
    max(max(r.int8, r.int4, r.bf16) for r in kernels.CROSSOVERS.values())
    < PREFILL_SHAPE[0] * PREFILL_SHAPE[1]
)


@contextlib.contextmanager
def exact_prefill():
    """fp32 prefill GEMMs for the duration (bf16 ones are the default on AMX / AVX512-BF16 CPUs)."""
    before = kernels.bf16_prefill()
    kernels.bf16_prefill(False)
    try:
        yield
    finally:
        kernels.bf16_prefill(before)


# ---- kernels -----------------------------------------------------------------------------------------


def _builds() -> list[str]:
    isas = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        isas += ["avx2", "scalar"]  # the AVX2 path and the scalar path, whatever this CPU has
    return isas


@pytest.mark.parametrize("isa", _builds())
def test_kernels_equal_the_reference(isa: str, kern) -> None:
    """GEMV == fp64 product of the dequantized matrix; dequantize == the PyTorch reference, bit for bit."""
    k = kern if isa == "native" else kernels.build(isa)
    assert k.isa in ("avx512", "avx2", "scalar")
    g = torch.Generator().manual_seed(0)
    for n, kdim in [(37, 96), (13, 224), (66, 640), (40, 2048)]:
        w = torch.randn(n, kdim, generator=g) * 0.05
        for scheme, group in SCHEMES + [("int4", 96), ("int4", 128)]:
            if scheme == "int4" and kdim % group:
                continue
            packed = quantize_matrix(w, scheme, group)
            deq = dequantize_matrix(packed, scheme, group)
            assert torch.equal(k.dequantize(packed, scheme, (n, kdim), group, 0, n), deq)
            assert torch.equal(k.dequantize(packed, scheme, (n, kdim), group, 5, 11), deq[5:11])
            half = torch.empty(6, kdim, dtype=torch.bfloat16)  # the bf16 prefill tiles: RNE of the same
            assert torch.equal(
                k.dequantize(packed, scheme, (n, kdim), group, 5, 11, half), deq[5:11].bfloat16()
            )
            for m in (1, 2, 3, 4, 5, 9):
                x = torch.randn(m, kdim, generator=g)
                ref = x.double() @ deq.double().T
                got = k.gemv(x, packed, scheme, (n, kdim), group).double()
                # fp32 summation bound, in units of sum |x w| (measured worst: int8 1.6, int4 4.4)
                bound = 16 * torch.finfo(torch.float32).eps * (x.abs().double() @ deq.abs().double().T)
                assert torch.all((got - ref).abs() <= bound), (isa, scheme, group, n, kdim, m)


def test_kernels_refuse_wrong_tensors(kern) -> None:
    packed = quantize_matrix(torch.randn(8, 64), "int8", None)
    with pytest.raises(ValueError, match="qweight"):
        kern.gemv(torch.randn(1, 64), {**packed, "qweight": packed["qweight"].t()}, "int8", (8, 64), None)
    with pytest.raises(ValueError, match="x: expected"):
        kern.gemv(torch.randn(1, 32), packed, "int8", (8, 64), None)


def test_build_is_cached_and_failure_falls_back(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("GEMMAKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GEMMAKIT_KERNELS", raising=False)  # the failed build must be what falls back
    first = kernels.build()
    stamp = first.path.stat().st_mtime_ns
    assert kernels.build().path == first.path and first.path.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]  # no temp files left
    monkeypatch.setenv("GEMMAKIT_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    model = twin_of(make_hf_model("gemma3"))
    q = _q(model, "int4", 32)
    tokens = random_tokens(1, 1)
    try:
        kernels.use_native(True)
        with caplog.at_level(logging.WARNING):
            assert kernels.backend() == "torch"
            fallback = q(tokens)
        assert sum("native quantized kernels unavailable" in r.message for r in caplog.records) == 1
    finally:
        monkeypatch.undo()
        kernels.use_native(True)
    # native GEMV vs fallback fp32 GEMM, M = 1: summation order only, through 6 layers; measured
    # <= 5e-7 * max |logit| on the AVX-512 and AVX2 builds
    torch.testing.assert_close(fallback, q(tokens), rtol=0, atol=2e-6 * float(fallback.abs().max()))


# ---- the quantized model ------------------------------------------------------------------------------


def _hf_with(hf, model: Gemma):
    """A copy of the HF model holding `model`'s weights, dequantized where quantized."""
    hf = copy.deepcopy(hf)
    sd = {
        k: v for k, v in model.state_dict().items() if not k.endswith((".qweight", ".scales", ".scale_min"))
    }
    for name, module in model.named_modules():
        if isinstance(module, QMatrix):
            sd[name + ".weight"] = module.dequantize()
    hf.load_state_dict({internal_name_to_hf(k, model.config): v for k, v in sd.items()}, strict=False)
    return hf


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheme,group", MODEL_SCHEMES)
def test_quantized_model_equals_hf_with_dequantized_weights(
    case: str, scheme: str, group: int | None
) -> None:
    """fp32 prefill (tiled GEMM) is bit-equal to HF; one-token decode (the GEMV) agrees to fp32
    rounding; bf16 prefill (AMX CPUs) stays within the activation rounding (measured 0.7-1.4%)."""
    hf = make_hf_model(case, std=STD[case])
    q = _q(twin_of(hf), scheme, group)
    assert isinstance(q.embed, QEmbedding) and isinstance(q.blocks[0].w_down, QLinear)
    oracle = _hf_with(hf, q)
    tokens = random_tokens(*PREFILL_SHAPE)
    with torch.no_grad():
        ref = oracle(tokens).logits
        if kernels.bf16_prefill():
            assert ((q(tokens) - ref).norm() / ref.norm()).item() < 3e-2
        with exact_prefill():
            assert torch.equal(q(tokens), ref)
        one = tokens[:1, :1]
        # GEMV vs HF's GEMM on the same weights: summation order only; measured <= 5e-7 * max |logit|
        want = oracle(one).logits
        torch.testing.assert_close(q(one), want, rtol=0, atol=2e-6 * float(want.abs().max()))


@pytest.mark.parametrize("case", CASES)
def test_error_bounds_and_greedy_agreement(case: str) -> None:
    """Logit RMS error relative to the float model's logit RMS, and top-1 agreement over 48 positions.

    Measured (2 x 24 tokens): int8 rel 1.6-3.6%, agreement 0.98-1.00; int4 g32 rel 21-40%, agreement
    0.94-1.00. Random tiny networks amplify weight error far more than trained ones; the bounds
    below catch layout or wiring bugs (which give ~100% error and ~1/320 agreement).
    """
    model = twin_of(make_hf_model(case, std=STD[case]))
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        ref = model(tokens)
        for (scheme, group), (bound, agree) in zip(MODEL_SCHEMES, [(0.05, 0.9), (0.45, 0.8)], strict=True):
            out = _q(model, scheme, group)(tokens)
            rel = ((out - ref).norm() / ref.norm()).item()
            rate = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"{case} {scheme} g{group}: logit rel RMS error {rel:.3f}, top-1 agreement {rate:.2f}")
            assert rel < bound and rate >= agree, (case, scheme, group, rel, rate)


def test_prefill_and_decode_paths_agree() -> None:
    """Engine prefill + cached decode (GEMV) vs one uncached forward of all 20 rows (exact fp32 prefill)."""
    model = _q(twin_of(make_hf_model("gemma3", std=0.3)), "int4", 32)
    tokens = random_tokens(1, 20)
    engine = Engine(model)
    cache = engine.new_cache(1, 20)
    steps = [engine.prefill(tokens[:, :12], None, cache)]
    for t in range(12, 20):
        steps.append(engine.decode_one(tokens[:, t], torch.tensor([t]), cache))
    with torch.no_grad(), exact_prefill():
        full = model(tokens)[0, 11:]
    # cached GEMV steps vs one uncached GEMM forward: summation order only; measured <= 5.6e-7 *
    # max |logit| (native AVX-512, AVX2 and the PyTorch fallback)
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=2e-6 * float(full.abs().max()))


def test_untied_head_and_int8_embedding_under_int4() -> None:
    cfg = PRESETS["tiny"].replace(tie_embeddings=False)
    model = Gemma(cfg).init_weights(std=0.3, seed=0).eval()
    q = quantize_model(copy.deepcopy(model), "int4", 64, embed_scheme="int8")
    assert isinstance(q.lm_head, QLinear) and q.lm_head.scheme == "int8" and q.embed.scheme == "int8"
    assert q.blocks[0].wq.scheme == "int4"
    tokens = random_tokens(1, 10)
    with torch.no_grad():
        ref, out = model(tokens), q(tokens)
    assert ((out - ref).norm() / ref.norm()).item() < 0.45  # measured 0.26
    with pytest.raises(QuantError, match="already quantized"):
        quantize_model(q, "int8")


# ---- checkpoints and the CLI ------------------------------------------------------------------------------


def test_save_load_round_trip_is_bitwise(tmp_path: Path) -> None:
    model = _q(twin_of(make_hf_model("gemma2", std=0.3)), "int4", 32)
    out = save_quantized(model, tmp_path / "q")
    manifest = json.loads((out / "manifest.json").read_text())
    meta = manifest["quantization"]
    assert manifest["format"] == "quantized" and meta["layout"] == "gemmakit-q1"
    assert meta["scheme"] == "int4" and meta["group_size"] == 32
    assert meta["tensors"]["blocks.0.w_down"] == {"scheme": "int4", "group_size": 32, "shape": [64, 96]}
    raw = (out / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    for name, entry in header.items():  # every tensor starts at a multiple of its item size (for the C code)
        if name != "__metadata__":
            size = {"F32": 4, "I32": 4, "U8": 1, "I8": 1}[entry["dtype"]]
            assert entry["data_offsets"][0] % size == 0, name
    for loaded in (load_quantized(out), load_any(out), gemmakit.load(out)):
        assert set(loaded.state_dict()) == set(model.state_dict())
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        tokens = random_tokens(2, 9)
        with torch.no_grad():
            assert torch.equal(loaded(tokens), model(tokens))  # prefill path
            assert torch.equal(loaded(tokens[:1, :1]), model(tokens[:1, :1]))  # GEMV path
    with pytest.raises(CheckpointError, match="a quantized checkpoint"):
        load_model(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks.1.wq.qweight").dtype == torch.uint8


def test_corrupt_quantized_checkpoints_are_one_line_errors(tmp_path: Path) -> None:
    model = _q(twin_of(make_hf_model("gemma3", std=0.3)), "int8", None)
    good = save_quantized(model, tmp_path / "good")

    def broken(name: str, edit) -> Path:
        d = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"  # names that no needle matches
        shutil.copytree(good, d)
        edit(d)
        return d

    def manifest_edit(change):
        def edit(d: Path) -> None:
            m = json.loads((d / "manifest.json").read_text())
            change(m)
            (d / "manifest.json").write_text(json.dumps(m))

        return edit

    wq_as_int4 = manifest_edit(lambda m: m["quantization"]["tensors"]["blocks.0.wq"].update(scheme="int4", group_size=32))  # fmt: skip
    cases = {
        "layout": (manifest_edit(lambda m: m["quantization"].update(layout="other")), "quantization.layout"),
        "scheme": (wq_as_int4, "blocks.0.wq.qweight: expected uint8"),
        "group": (
            manifest_edit(lambda m: m["quantization"]["tensors"]["embed"].update(group_size=16)),
            "quantization.tensors.embed: group_size: int8 uses",
        ),
        "truncated": (lambda d: (d / "model.safetensors").write_bytes(raw[:-10]), "truncated: expected"),
        "garbage": (lambda d: (d / "model.safetensors").write_bytes(b"\0" * 9), "unknown format"),
        "pickle": (lambda d: torch.save({}, d / "model.safetensors"), "refusing to unpickle"),
        "size": (lambda d: (d / "model.safetensors").open("ab").write(b" "), "size expected"),
    }
    raw = (good / "model.safetensors").read_bytes()
    for name, (edit, needle) in cases.items():
        where = broken(name, edit)
        with pytest.raises(CheckpointError) as info:
            load_quantized(where)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg and msg.startswith(str(where)), (name, msg)


def test_cli_quantize_then_generate(tmp_path: Path) -> None:
    from spm_helpers import train_gemma_spm

    from gemmakit.tokenizer import Tokenizer

    cfg = PRESETS["tiny"].replace(vocab_size=640)
    src = save_hf(Gemma(cfg).init_weights(std=0.3, seed=0), tmp_path / "model")
    shutil.copy(train_gemma_spm(tmp_path / "tok", "gemma3"), src / "tokenizer.model")
    exe = str(Path(sys.executable).with_name("gemmakit"))
    run = lambda *a: subprocess.run([exe, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    proc = run("quantize", "--model", str(src), "--scheme", "int4", "--out", str(tmp_path / "q"))
    assert proc.returncode == 0 and "group size 64" in proc.stdout, proc.stderr
    proc = run("generate", "--model", str(tmp_path / "q"), "--prompt", "hello", "--max-new-tokens", "8",
               "--attn", "eager", "--ignore-eos")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(tmp_path / "q")
    ids = Engine(load_quantized(tmp_path / "q")).generate([tok.encode("hello", bos=True)], 8)[0]
    assert proc.stdout.rstrip("\n") == tok.decode(ids)
    proc = run("info", "--model", str(tmp_path / "q"))
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert proc.returncode == 0 and "quantized int4, groups of 64" in proc.stdout, proc.stderr
    assert f"weights:     {size / 1024:.2f} KiB" in proc.stdout, proc.stdout
    bad = [
        "quantize",
        "--model",
        str(src),
        "--scheme",
        "int4",
        "--group-size",
        "96",
        "--out",
        str(tmp_path / "x"),
    ]
    proc = run(*bad)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "96 does not divide" in proc.stderr, (
        proc.stderr
    )
    assert not (tmp_path / "x").exists()


# ---- the bf16 scheme ------------------------------------------------------------------------------------


@pytest.mark.parametrize("isa", _builds())
def test_bf16_gemv_equals_fp64_reference(isa: str, kern) -> None:
    """bf16 x fp32 GEMV == fp64 product of the bf16 weights within fp32 summation error, every ISA path."""
    k = kern if isa == "native" else kernels.build(isa)
    g = torch.Generator().manual_seed(0)
    for n, kdim in [(37, 100), (13, 224), (66, 640), (9, 2048), (5, 7)]:  # K tails of 4, 0, 0, 0, 7 columns
        packed = quantize_matrix(torch.randn(n, kdim, generator=g) * 0.05, "bf16", None)
        w = packed["qweight"]
        assert w.dtype == torch.bfloat16 and torch.equal(dequantize_matrix(packed, "bf16", None), w.float())
        assert torch.equal(k.dequantize(packed, "bf16", (n, kdim), None, 1, 4), w[1:4].float())
        for m in (1, 2, 3, 4, 5, 9):
            x = torch.randn(m, kdim, generator=g)
            ref = x.double() @ w.double().T
            got = k.gemv(x, packed, "bf16", (n, kdim), None).double()
            bound = 16 * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().T)
            assert torch.all((got - ref).abs() <= bound), (isa, n, kdim, m)
    with pytest.raises(ValueError, match="qweight: expected a contiguous CPU torch.bfloat16"):
        k.gemv(torch.randn(1, 7), {"qweight": torch.randn(5, 7)}, "bf16", (5, 7), None)


def _bf16_pair(case: str) -> tuple:
    """(HF model, gemmakit fp32 twin) whose weights are all exactly bf16 values (a bf16 checkpoint's)."""
    hf = make_hf_model(case, std=STD[case])
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    return hf, twin_of(hf)


@pytest.mark.parametrize("case", CASES)
def test_bf16_scheme_model_equals_the_fp32_model(case: str) -> None:
    """Same weights, same fp32 math: GEMV rows (M <= 4) match HF fp32 to summation order.

    Measured max |diff| / max |logit|: 2-5e-7. Prefill with a fast bf16 GEMM (AMX / AVX512-BF16)
    rounds activations to bf16 (measured logit rel RMS 0.6-1.1% on these random tiny networks);
    without one it is HF's fp32 GEMM bit for bit.
    """
    hf, model = _bf16_pair(case)
    q = quantize_model(copy.deepcopy(model), "bf16")
    assert isinstance(q.embed, QEmbedding) and q.embed.qweight.dtype == torch.bfloat16
    assert torch.equal(q.blocks[0].w_down.qweight.float(), model.blocks[0].w_down.weight)
    assert torch.equal(q.embed.qweight.float(), model.embed.weight)
    with torch.no_grad():
        for tokens in (random_tokens(1, 4), random_tokens(2, 2), random_tokens(1, 1)):
            ref = hf(tokens).logits
            rel = ((q(tokens) - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-5, (case, tuple(tokens.shape), rel)
        tokens = random_tokens(*PREFILL_SHAPE)
        ref, out = hf(tokens).logits, q(tokens)
        if kernels._BF16_GEMM and kernels.native() is not None:
            assert ((out - ref).norm() / ref.norm()).item() < 3e-2
        else:
            assert torch.equal(out, ref)
        kernels.use_native(False)  # the PyTorch fallback: tiled fp32 GEMM at every M, bit-equal to HF
        try:
            assert torch.equal(q(tokens), ref) and torch.equal(q(tokens[:1, :3]), hf(tokens[:1, :3]).logits)
        finally:
            kernels.use_native(True)


def test_bf16_models_are_rewired_onto_the_native_kernels_without_copies() -> None:
    """A bf16 model becomes the bf16 scheme sharing its weight storage, computing what
    `quantize_model(.., "bf16")` computes; float32 models are left alone."""
    _, model = _bf16_pair("gemma3")
    reference = quantize_model(copy.deepcopy(model), "bf16")
    fp32 = copy.deepcopy(model)
    assert with_bf16_kernels(fp32) is fp32 and isinstance(fp32.blocks[0].wq, torch.nn.Linear)
    half = model.to(torch.bfloat16)
    pointers = {n: p.data_ptr() for n, p in half.named_parameters() if not n.endswith("norm.weight")}
    rewired = with_bf16_kernels(half)
    if kernels.native() is None:
        assert isinstance(rewired.blocks[0].wq, torch.nn.Linear)  # no compiler: left as it was
        return
    assert isinstance(rewired.blocks[0].wq, QLinear) and isinstance(rewired.embed, QEmbedding)
    buffers = dict(rewired.named_buffers())
    assert {n: buffers[n.removesuffix("weight") + "qweight"].data_ptr() for n in pointers} == pointers
    assert all(p.dtype == torch.float32 for p in rewired.parameters())  # the norms
    tokens = random_tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(rewired(tokens), reference(tokens))
    assert with_bf16_kernels(rewired) is rewired  # already rewired: unchanged


def test_bf16_save_load_round_trip(tmp_path: Path) -> None:
    """The bf16 weights survive save/load bit for bit, also when loading with dtype=float32."""
    _, model = _bf16_pair("gemma2")
    q = quantize_model(copy.deepcopy(model), "bf16")
    out = save_quantized(q, tmp_path / "q")
    meta = json.loads((out / "manifest.json").read_text())["quantization"]
    assert meta["scheme"] == "bf16" and meta["group_size"] is None
    assert meta["tensors"]["blocks.0.w_down"] == {"scheme": "bf16", "group_size": None, "shape": [64, 96]}
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("blocks.1.wq.qweight").dtype == torch.bfloat16
    tokens = random_tokens(2, 9)
    for loaded in (load_quantized(out), load_any(out, dtype=torch.float32), gemmakit.load(out)):
        assert set(loaded.state_dict()) == set(q.state_dict())
        assert all(torch.equal(v, q.state_dict()[k]) for k, v in loaded.state_dict().items())
        with torch.no_grad():
            assert torch.equal(loaded(tokens), q(tokens)) and torch.equal(
                loaded(tokens[:1, :1]), q(tokens[:1, :1])
            )
    with pytest.raises(QuantError, match="bf16 uses no groups"):
        quantize_model(copy.deepcopy(model), "bf16", 32)


def test_cli_quantize_bf16(tmp_path: Path) -> None:
    cfg = PRESETS["tiny"].replace(vocab_size=640)
    model = Gemma(cfg).init_weights(std=0.3, seed=0).to(torch.bfloat16)
    src = save_hf(model, tmp_path / "model")
    exe = str(Path(sys.executable).with_name("gemmakit"))
    run = lambda *a: subprocess.run([exe, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    proc = run("quantize", "--model", str(src), "--scheme", "bf16", "--out", str(tmp_path / "q"))
    assert proc.returncode == 0 and "wrote bf16 checkpoint" in proc.stdout, proc.stderr
    proc = run("info", "--model", str(tmp_path / "q"))
    assert proc.returncode == 0 and "quantized bf16 at" in proc.stdout, proc.stdout + proc.stderr
    loaded = load_any(tmp_path / "q")
    assert torch.equal(loaded.blocks[1].w_up.qweight, model.blocks[1].w_up.weight)  # the checkpoint's bits
    tokens = random_tokens(1, 3)
    with torch.no_grad():
        ref = Gemma(cfg).eval()
        ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        want = ref(tokens)
        assert ((loaded(tokens) - want).abs().max() / want.abs().max()).item() < 1e-5
