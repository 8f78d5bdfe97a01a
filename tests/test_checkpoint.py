"""Checkpoint reading and writing, checked against transformers (the oracle) and a malformed-file corpus.

Parity: HF `save_pretrained` -> `load_model` and `save_hf` -> HF `from_pretrained` must give logits
`torch.equal` to the HF model's. Robustness: every malformed input must raise `CheckpointError`
with a one-line message naming the file (and the tensor), and nothing else may escape.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, make_hf_model, random_tokens, twin_of
from safetensors.torch import load_file, save_file

from gemmakit.checkpoint import (
    CheckpointError,
    convert_checkpoint,
    detect_format,
    estimate_memory,
    load_model,
    save_gemma_pytorch,
    save_hf,
)
from gemmakit.config import PRESETS, ModelConfig, layer_pattern
from gemmakit.model import Gemma


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


def _load_owned(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as private copies, so the file can be rewritten in place."""
    return {k: v.clone() for k, v in load_file(path).items()}


def _raises(path, *needles: str) -> str:
    """load_model(path) must raise CheckpointError with a one-line message containing every needle."""
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---- parity with transformers ------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
def test_load_hf_save_pretrained_bit_identical(hf_case, sharded, tmp_path):
    hf = make_hf_model(hf_case)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    model = load_model(tmp_path)
    tokens = random_tokens(2, 12)
    assert torch.equal(_logits(model, tokens), _logits(hf, tokens))
    assert not model.training and model.config.n_layers == hf.config.num_hidden_layers


def test_dtype_cast_on_load(tmp_path):
    hf = make_hf_model("gemma2")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    ref = dict(hf.model.named_parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.blocks[1].w_up.weight, ref["layers.1.mlp.up_proj.weight"].to(torch.bfloat16))
    assert all(p.requires_grad for p in model.parameters())  # grads left at the default


def _tiny_multimodal():
    import transformers

    text = transformers.Gemma3TextConfig(
        vocab_size=VOCAB + 10, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        query_pre_attn_scalar=24, sliding_window=5,
    )  # fmt: skip
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    image_token_index=VOCAB, mm_tokens_per_image=4)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_gemma3_multimodal_repo_text_part(tmp_path):
    mm = _tiny_multimodal()
    mm.save_pretrained(tmp_path / "old")
    stored = _load_owned(tmp_path / "old" / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in stored)
    assert stored["language_model.model.embed_tokens.weight"].shape[0] == VOCAB + 10
    tokens = random_tokens(2, 12)
    ref = _logits(mm, tokens)[..., :VOCAB]  # the text vocab's columns; ids are all < VOCAB
    model = load_model(tmp_path / "old")
    assert model.config.vocab_size == VOCAB
    ours = _logits(model, tokens)
    # HF's head multiplies all VOCAB + 10 embedding rows, ours the VOCAB text rows: a GEMM of another
    # shape, free to sum in another order. The layers before it have the same shapes as HF's (bit-equal),
    # so only the head's K = 64 sums may differ: by at most K * eps * sum |h w| (measured: 0).
    with torch.no_grad():
        h, w = model.hidden(tokens).double(), model.embed.weight.double()
    bound = h.shape[-1] * torch.finfo(torch.float32).eps * (h.abs() @ w.abs().T)
    assert ours.shape == ref.shape and torch.all((ours.double() - ref.double()).abs() <= bound)
    # The transformers 5.x in-memory prefix `model.language_model.`, with the vision parts renamed too.
    (tmp_path / "new").mkdir()
    shutil.copy(tmp_path / "old" / "config.json", tmp_path / "new")
    renamed = {("model.language_model." + k[len("language_model.model."):]) if k.startswith("language_model.")
               else "model." + k: v for k, v in stored.items()}  # fmt: skip
    save_file(renamed, tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(_logits(load_model(tmp_path / "new"), tokens), ours)  # same weights, same model


def test_stored_lm_head_of_tied_model(tmp_path):
    hf = make_hf_model("gemma1-mqa")
    hf.save_pretrained(tmp_path)
    sd = _load_owned(tmp_path / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tokens = random_tokens(1, 8)
    assert torch.equal(_logits(load_model(tmp_path), tokens), _logits(hf, tokens))
    sd["lm_head.weight"] = sd["lm_head.weight"][:-1].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _raises(tmp_path, "lm_head.weight", "tied", str(list(sd["model.embed_tokens.weight"].shape)))


@pytest.mark.parametrize("case", ["gemma1-mqa", "gemma2", "gemma3"])
def test_save_hf_reloads_in_transformers(case, tmp_path):
    from transformers import AutoModelForCausalLM

    hf = make_hf_model(case)
    tokens = random_tokens(2, 12)
    for sub, shard in (("one", None), ("sharded", 30_000)):
        out = save_hf(twin_of(hf), tmp_path / sub, max_shard_bytes=shard)
        assert (out / "model.safetensors.index.json").exists() == (shard is not None)
        back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
        assert torch.equal(_logits(back, tokens), _logits(hf, tokens))
        assert torch.equal(_logits(load_model(out), tokens), _logits(hf, tokens))
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["format"] == "hf" and manifest["dtype"] == "float32"
    assert ModelConfig.from_dict(manifest["config"]) == twin_of(hf).config
    assert (
        manifest["files"]["model.safetensors"]["size"]
        == (tmp_path / "one" / "model.safetensors").stat().st_size
    )


def test_save_hf_bf16(tmp_path):
    hf = make_hf_model("gemma3")
    out = save_hf(twin_of(hf), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(out)
    assert model.embed.weight.dtype == torch.bfloat16
    assert torch.equal(model.embed.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_convert_hf_gemma_pytorch_hf(hf_case, tmp_path):
    hf = make_hf_model(hf_case)
    hf.save_pretrained(tmp_path / "hf")
    tokens = random_tokens(2, 12)
    ref = _logits(hf, tokens)
    gp = convert_checkpoint(tmp_path / "hf", tmp_path / "gp", to="gemma_pytorch")
    # The gemma_pytorch layout (reference §3.2): fused q|k|v rows, embedder, no RoPE buffers.
    sd = torch.load(gp / "model.ckpt", weights_only=True)["model_state_dict"]
    attn = hf.model.layers[1].self_attn
    fused = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    assert torch.equal(sd["model.layers.1.self_attn.qkv_proj.weight"], fused)
    assert torch.equal(sd["embedder.weight"], hf.model.embed_tokens.weight)
    assert ("model.layers.0.self_attn.query_norm.weight" in sd) == hf_case.startswith("gemma3")
    assert torch.equal(_logits(load_model(gp), tokens), ref)
    back = convert_checkpoint(gp, tmp_path / "back", to="hf")
    from transformers import AutoModelForCausalLM

    hf2 = AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager", dtype=torch.float32)
    assert torch.equal(_logits(hf2, tokens), ref)


def test_gemma_pytorch_files_without_manifest(tmp_path):
    hf = make_hf_model("gemma3")
    cfg = twin_of(hf).config
    tokens = random_tokens(1, 10)
    gp = save_gemma_pytorch(twin_of(hf), tmp_path / "gp")
    sd = torch.load(gp / "model.ckpt", weights_only=True)["model_state_dict"]
    # Real gemma_pytorch files carry RoPE buffers; they are dropped.
    sd["local_freqs_cis"] = sd["global_freqs_cis"] = torch.ones(8, 8, dtype=torch.complex64)
    torch.save({"model_state_dict": sd}, tmp_path / "bare.ckpt")
    assert torch.equal(_logits(load_model(tmp_path / "bare.ckpt", config=cfg), tokens), _logits(hf, tokens))
    _raises(tmp_path / "bare.ckpt", "no preset matches", "pass config=")
    # Sharded: pytorch_model.bin.index.json + shards in the same layout.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(sd)
    wmap = {n: f"part-{i % 2}.bin" for i, n in enumerate(names)}
    for part in ("part-0.bin", "part-1.bin"):
        torch.save({n: sd[n] for n in names if wmap[n] == part}, shard_dir / part)
    (shard_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    assert torch.equal(_logits(load_model(shard_dir, config=cfg), tokens), _logits(hf, tokens))


def test_legacy_pickle_with_hf_names(tmp_path):
    hf = make_hf_model("gemma1-mha")
    path = tmp_path / "weights.bin"
    torch.save(hf.state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) == "pickle"
    tokens = random_tokens(1, 9)
    model = load_model(path, config=twin_of(hf).config)
    assert torch.equal(_logits(model, tokens), _logits(hf, tokens))


def test_config_inferred_from_presets(tmp_path, monkeypatch):
    model = Gemma(PRESETS["tiny"]).init_weights(seed=0)
    save_gemma_pytorch(model, tmp_path / "gp")
    (tmp_path / "gp" / "manifest.json").unlink()
    loaded = load_model(tmp_path / "gp")
    assert loaded.config == PRESETS["tiny"]
    assert torch.equal(loaded.blocks[2].wk.weight, model.blocks[2].wk.weight)
    monkeypatch.setitem(PRESETS, "tiny-twin", PRESETS["tiny"].replace(rope_theta=123.0))
    _raises(tmp_path / "gp", "ambiguous", "tiny-twin")


# ---- memory -------------------------------------------------------------------------------------

# Peak RSS comes from /proc (VmHWM, reset through clear_refs), not resource.getrusage: Linux keeps
# ru_maxrss across execve, so a child of a 1 GB pytest process would report >= 1 GB whatever it did.
_RSS_SCRIPT = """
import json, sys
import torch
from gemmakit.checkpoint import load_model
from gemmakit.config import PRESETS
from gemmakit.model import Gemma

def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

with torch.device("meta"):  # one-time cost of the first meta model: torch imports its meta kernels
    Gemma(PRESETS["tiny"])  # (~75 MB, the same for every model size), so it belongs to the baseline
base = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
model = load_model(sys.argv[1])
with torch.no_grad():
    total = sum(float(p.sum()) for p in model.parameters())  # touch every weight page
print(json.dumps({"base_kb": base, "peak_kb": status_kb("VmHWM")}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_rss_near_weight_size(tmp_path):
    cfg = ModelConfig(generation="gemma1", vocab_size=8192, dim=512, n_layers=3, n_heads=4, n_kv_heads=1,
                      head_dim=128, hidden_dim=2048, layer_types=layer_pattern(3, 1))  # fmt: skip
    out = save_hf(Gemma(cfg).init_weights(seed=0), tmp_path / "m")
    weight_bytes = (out / "model.safetensors").stat().st_size
    assert weight_bytes > 40e6
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(out)], capture_output=True, text=True, check=True
    )
    rss = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (rss["peak_kb"] - rss["base_kb"]) * 1024
    # Measured ~1.1x; random init + a read copy + load_state_dict's copy measures ~3x.
    assert grown < 1.6 * weight_bytes, (grown, weight_bytes)


def test_estimate_memory_matches_hf_parameter_count():
    hf = make_hf_model("gemma3")
    cfg = twin_of(hf).config
    est = estimate_memory(cfg, torch.bfloat16)
    n_hf = sum(p.numel() for p in hf.parameters())  # HF lists the tied embedding once
    assert est["params"] == n_hf and est["weight_bytes"] == 2 * n_hf
    per_layer = 2 * hf.config.num_key_value_heads * hf.config.head_dim * 2  # k and v, bf16
    assert est["kv_bytes_per_1k"] == per_layer * 1024 * hf.config.num_hidden_layers
    n_local = hf.config.layer_types.count("sliding_attention")
    windowed = n_local * hf.config.sliding_window + (hf.config.num_hidden_layers - n_local) * 1024
    assert est["kv_bytes_per_1k_windowed"] == per_layer * windowed


# ---- writing safety -----------------------------------------------------------------------------


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, monkeypatch):
    model = twin_of(make_hf_model("gemma1-mqa"))
    out = save_hf(model, tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(CheckpointError, match="not empty"):
        save_gemma_pytorch(model, out)
    assert sorted(p.name for p in out.iterdir()) == before
    save_gemma_pytorch(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.ckpt"]
    calls = []

    def failing_fsync(fd):  # a disk that fails on the third file
        calls.append(fd)
        if len(calls) == 3:
            raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        save_hf(model, tmp_path / "fresh", max_shard_bytes=30_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no fresh/, no temp dirs left


# ---- the malformed corpus -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good")
    make_hf_model("gemma1-mqa").save_pretrained(path)
    return path


@pytest.fixture
def bad(good_dir, tmp_path) -> Path:
    """A fresh copy of a valid HF checkpoint directory, for one test to break."""
    return Path(shutil.copytree(good_dir, tmp_path / "ckpt"))


def _parts(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


K0 = "model.layers.0.self_attn.k_proj.weight"


def test_missing_path_and_empty_dir(tmp_path):
    _raises(tmp_path / "nope", "nope", "no such file")
    _raises(tmp_path, str(tmp_path), "no weights found")


def test_truncated_at_many_points(bad):
    st = bad / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    for cut in (1, 5, 8, 9, 8 + n // 2, 8 + n, 8 + n + 100, len(raw) // 2, len(raw) - 1):
        st.write_bytes(raw[:cut])
        msg = _raises(bad, str(st))
        if cut >= 8 + n:
            assert f"truncated: expected {len(raw)} bytes, got {cut}" in msg
        elif cut >= 9:
            assert "truncated" in msg


def test_bad_header_lengths(bad):
    st = bad / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    _raises(bad, str(st), "header length 1099511627776")
    st.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    _raises(bad, str(st), "truncated", f"header length {len(raw)}")


def test_non_json_header(bad):
    st = bad / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    st.write_bytes(raw[:8] + b"{" + b"\xff" * (n - 1) + raw[8 + n :])
    _raises(bad, str(st), "not valid JSON")


def test_unknown_dtype_and_bad_offsets(bad):
    st = bad / "model.safetensors"
    header, data = _parts(st)
    header[K0]["dtype"] = "Q7"
    _rewrite(st, header, data)
    _raises(bad, str(st), K0, "unknown dtype 'Q7'")
    header, _ = _parts(bad / "model.safetensors")
    header[K0]["dtype"] = "F32"
    begin, end = header[K0]["data_offsets"]
    header[K0]["data_offsets"] = [len(data), len(data) + end - begin]  # past the end of the file
    _rewrite(st, header, data)
    _raises(bad, str(st), K0, "truncated", "past the end")
    header[K0]["data_offsets"] = [begin, begin + 4]  # size disagrees with dtype x shape
    _rewrite(st, header, data)
    _raises(bad, str(st), K0, "data_offsets")


def _edit_tensors(bad: Path, edit) -> Path:
    st = bad / "model.safetensors"
    sd = _load_owned(st)
    edit(sd)
    save_file(sd, st, metadata={"format": "pt"})
    return st


def _transpose(sd):
    sd[K0] = sd[K0].t().contiguous()


def _drop(sd):
    del sd["model.layers.2.mlp.up_proj.weight"]


def _extra(sd):
    sd["model.layers.0.mlp.extra.weight"] = torch.zeros(3)


def _int64(sd):
    sd["model.norm.weight"] = sd["model.norm.weight"].long()


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_transpose, (K0, "shape expected [16, 64], found [64, 16]")),
        (_drop, ("missing tensor model.layers.2.mlp.up_proj.weight",)),
        (_extra, ("unexpected tensor model.layers.0.mlp.extra.weight",)),
        (_int64, ("model.norm.weight", "dtype expected", "found int64")),
    ],
)
def test_one_bad_tensor(bad, edit, needles):
    st = _edit_tensors(bad, edit)
    _raises(bad, str(st), *needles)


def test_all_four_problems_in_one_message(bad):
    st = _edit_tensors(bad, lambda sd: [f(sd) for f in (_transpose, _drop, _extra, _int64)])
    msg = _raises(bad, str(st), "4 problems", K0, "model.layers.2.mlp.up_proj.weight",
                  "model.layers.0.mlp.extra.weight", "model.norm.weight")  # fmt: skip
    assert msg.count(str(st)) == 1


class _Evil:
    """Unpickling this creates a file: the classic code-execution payload, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_never_trusted(bad, tmp_path):
    st = bad / "model.safetensors"
    sd = _load_owned(st)
    torch.save(sd, st)  # a real state dict, in the wrong format for its slot
    _raises(bad, str(st), "not a safetensors file")
    marker = tmp_path / "pwned"
    st.write_bytes(pickle.dumps(_Evil(marker)))
    _raises(bad, str(st), "not a safetensors file")
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps(_Evil(marker)))
    _raises(tmp_path / "evil.ckpt", "evil.ckpt", "weights-only")
    torch.save(_Evil(marker), tmp_path / "evil.pt")
    assert detect_format(tmp_path / "evil.pt") == "torch_zip"
    _raises(tmp_path / "evil.pt", "evil.pt", "weights-only")
    assert not marker.exists()


def test_empty_and_random_files(bad, tmp_path):
    st = bad / "model.safetensors"
    st.write_bytes(b"")
    _raises(bad, str(st), "empty file")
    noise = random.Random(0).randbytes(4096)
    st.write_bytes(noise)
    _raises(bad, str(st))
    (tmp_path / "noise.bin").write_bytes(noise)
    _raises(tmp_path / "noise.bin", "noise.bin")


def test_config_disagrees_with_weights(bad):
    cfg_path = bad / "config.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**good, "num_hidden_layers": 8}))
    _raises(bad, "model.safetensors", "n_layers: config.json says 8, the weights hold 6 layers")
    cfg_path.write_text(json.dumps({**good, "num_hidden_layers": 4}))
    _raises(bad, "n_layers: config.json says 4, the weights hold 6 layers")
    cfg_path.write_text(json.dumps({**good, "vocab_size": 400}))
    _raises(bad, "vocab_size: config.json says 400", f"has {VOCAB} rows")


def test_index_and_manifest_problems(tmp_path):
    hf = make_hf_model("gemma1-mqa")
    out = save_hf(twin_of(hf), tmp_path / "out", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = out / index["weight_map"][first]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(raw))
    load_model(out)  # sizes agree: loads without hashing
    _raises_verify = pytest.raises(CheckpointError, match="sha256")
    with _raises_verify:
        load_model(out, verify=True)
    shard.write_bytes(bytes(raw) + b"\0")
    _raises(out, shard.name, "size expected")
    index["weight_map"][first] = "../escape.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    _raises(out, "model.safetensors.index.json", "outside its directory")


def test_detect_format_by_content(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "x.bin")
    torch.save({"a": torch.zeros(2)}, tmp_path / "y.safetensors")
    assert detect_format(tmp_path / "x.bin") == "safetensors"
    assert detect_format(tmp_path / "y.safetensors") == "torch_zip"
    (tmp_path / "z").write_bytes(b"GGUF\x03\x00\x00\x00" * 4)
    with pytest.raises(CheckpointError, match="unknown format"):
        detect_format(tmp_path / "z")
