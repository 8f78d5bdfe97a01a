"""GGUF export: a `Gemma` plus its `Tokenizer` -> one .gguf file that llama.cpp runs.

Where it sits: after `checkpoint` (layering rank 4); it reads a loaded model and tokenizer, is called
by `cli export-gguf`, and re-checks every file it writes with `reader.read_gguf` before renaming it
into place. Writing uses the optional `gguf` package (extra `gemmakit[gguf]`), imported lazily so the
rest of gemmakit works without it. Facts: reference §3.5 (names, +1 on norms, no Q/K permute) and
§6.4; llama.cpp `src/models/gemma{,2,3}.cpp` and `src/llama-vocab.cpp` (as vendored in
llama-cpp-python 0.3.36).

Tensor types per `qtype`: 1-D norms are always f32 (llama.cpp's converter and quantizer do the same).
f32/f16/bf16 store every matrix in that type. q8_0 stores every matrix as Q8_0. q4_0 stores matrices
as Q4_0 except the output projection (the tied embedding), kept at Q8_0: llama.cpp's own q4_0
quantizer uses Q6_K there, which gguf-py cannot write, and logits are the most quantization-sensitive
product. A matrix whose rows are not a multiple of 32 falls back to f16. Dequantized values are
within one quantization step of the source: |err| <= amax_block/127 (Q8_0), amax_block/8 (Q4_0), per
block of 32 along a row (the fp16 block scale adds at most 2^-11 relative).

Key trade-off: refuse rather than approximate. GGUF cannot carry everything a ModelConfig can say,
and llama.cpp fills the gaps from hard-coded rules: the attention scale is 1/sqrt(head_dim) except
for 27B-shaped layer counts (46 for gemma2, 62 for gemma3: 1/sqrt(dim // n_heads)), since GGUF has
no query_pre_attn_scalar; the local/global layer pattern is fixed per arch (gemma: all global, gemma2:
every 2nd, gemma3: every 6th global); Gemma 3's local RoPE base is 10000 in llama.cpp builds older
than the `rope.freq_base_swa` key; Gemma 2 always soft-caps (50/30 by default); gemma/gemma2 ignore
an untied output matrix. `check_exportable` rejects any config that llama.cpp would compute
differently, so a GGUF we write is never silently wrong; official checkpoints all pass.

The chat template stored in the file renders exactly `chat.render_text(..., system="fold")`. Note that
llama.cpp tokenizes that rendered text with special-token parsing, so "<end_of_turn>" typed by a user
becomes a real turn marker there (gemmakit's own `chat.render` never does this).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gemmakit.artifact import ArtifactError, discard, place_file
from gemmakit.config import LOCAL, ModelConfig, layer_pattern
from gemmakit.export_gguf.reader import GGUFError, GGUFFile, read_gguf
from gemmakit.tokenizer import Tokenizer, layout_for_generation

if TYPE_CHECKING:
    import numpy as np

    from gemmakit.model import Gemma

log = logging.getLogger(__name__)

QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
_ARCH = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
_PATTERN = {"gemma1": 1, "gemma2": 2, "gemma3": 6}  # llama.cpp's hard-coded "every Nth layer is global"
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}  # layer counts for which llama.cpp scales by dim // n_heads
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}  # gguf LlamaFileType
_GGUF_LAYER = {  # gemmakit block suffix -> GGUF tensor name (reference §3.5)
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "post_attn_norm": "post_attention_norm",
    "mlp_norm": "ffn_norm", "post_mlp_norm": "post_ffw_norm",
    "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}  # fmt: skip
_GGUF_TOP = {"embed.weight": "token_embd.weight", "final_norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}  # fmt: skip

# Equivalent to chat.render_text(messages, layout, add_generation_prompt, system="fold").
CHAT_TEMPLATE = r"""{%- if messages | length == 0 -%}
{{- raise_exception('no messages: a conversation needs at least one user message') -}}
{%- endif -%}
{%- set ns = namespace(prefix='', start=0) -%}
{%- if messages[0]['role'] == 'system' -%}
{%- if messages | length == 1 -%}
{{- raise_exception('a system message must be followed by a user message') -}}
{%- endif -%}
{%- if messages[0]['content'] is not string -%}
{{- raise_exception('message content must be a string') -}}
{%- endif -%}
{%- set ns.prefix = messages[0]['content'] + '\n\n' -%}
{%- set ns.start = 1 -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in messages -%}
{%- if loop.index0 >= ns.start -%}
{%- set want = 'user' if (loop.index0 - ns.start) % 2 == 0 else 'model' -%}
{%- if message['role'] == 'user' -%}{%- set role = 'user' -%}
{%- elif message['role'] == 'assistant' or message['role'] == 'model' -%}{%- set role = 'model' -%}
{%- else -%}{%- set role = '' -%}
{%- endif -%}
{%- if role != want -%}
{{- raise_exception('roles must alternate user/assistant, starting with user') -}}
{%- endif -%}
{%- if message['content'] is not string -%}
{{- raise_exception('message content must be a string') -}}
{%- endif -%}
{{- '<start_of_turn>' + role + '\n' -}}
{%- if loop.index0 == ns.start -%}{{- ns.prefix -}}{%- endif -%}
{{- message['content'] | trim -}}
{{- '<end_of_turn>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError(
            "GGUF export needs the optional 'gguf' package: pip install 'gemmakit[gguf]'"
        ) from None
    return gguf


# ---- what llama.cpp can represent --------------------------------------------------------------


def llama_cpp_attention_scalar(cfg: ModelConfig) -> float:
    """The query_pre_attn_scalar llama.cpp will use for `cfg` (it reads none from the file)."""
    if _LAYERS_27B.get(cfg.generation) == cfg.n_layers:
        return float(cfg.dim // cfg.n_heads)  # C integer division, as in llama.cpp
    return float(cfg.head_dim)


def check_exportable(cfg: ModelConfig) -> None:
    """Raise GGUFError if llama.cpp would compute `cfg` differently from gemmakit (see module doc)."""
    gen, arch, problems = cfg.generation, _ARCH[cfg.generation], []
    if cfg.sandwich_norm != (gen != "gemma1") or cfg.qk_norm != (gen == "gemma3"):
        problems.append(f"sandwich_norm={cfg.sandwich_norm}, qk_norm={cfg.qk_norm} do not match arch {arch}")
    if cfg.layer_types != layer_pattern(cfg.n_layers, _PATTERN[gen]):
        problems.append(f"layer_types: llama.cpp's {arch} makes every layer i with (i + 1) % {_PATTERN[gen]} "
                        "== 0 global and the rest local; this model's pattern differs")  # fmt: skip
    want = llama_cpp_attention_scalar(cfg)
    if cfg.query_pre_attn_scalar != want:
        problems.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar:g}: llama.cpp's {arch} uses {want:g} "
                        f"for a {cfg.n_layers}-layer model (GGUF cannot store it)")  # fmt: skip
    caps = (cfg.attn_softcap, cfg.final_softcap)
    if gen == "gemma2" and None in caps:
        problems.append(f"attn_softcap/final_softcap={caps}: llama.cpp's gemma2 always soft-caps")
    if gen != "gemma2" and caps != (None, None):
        problems.append(f"attn_softcap/final_softcap={caps}: only gemma2 soft-caps")
    if gen == "gemma2" and (cfg.rope_local_theta != cfg.rope_theta or cfg.rope_scaling != 1.0):
        problems.append("rope: llama.cpp's gemma2 uses one RoPE base and no scaling for all layers")
    if gen == "gemma3" and LOCAL in cfg.layer_types and cfg.rope_local_theta != 10_000.0:
        problems.append(f"rope_local_theta={cfg.rope_local_theta:g}: llama.cpp's gemma3 fixes 10000")
    if not cfg.tie_embeddings and gen != "gemma3":
        problems.append(f"tie_embeddings=False: llama.cpp's {arch} always reuses the embedding as output")
    if problems:
        raise GGUFError(f"cannot export to GGUF for llama.cpp: {'; '.join(problems)}")


# ---- export ------------------------------------------------------------------------------------


def _gguf_name(name: str) -> str:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    _, i, suffix, _ = name.split(".")  # blocks . {i} . {suffix} . weight
    return f"blk.{i}.{_GGUF_LAYER[suffix]}.weight"


def _tensor_type(name: str, shape: tuple[int, ...], qtype: str, output_name: str) -> str:
    """The ggml type name one tensor is stored as (see the module doc for the rules)."""
    if len(shape) == 1 or qtype == "f32":
        return "F32"
    kind = "q8_0" if (qtype == "q4_0" and name == output_name) else qtype
    if kind in ("q8_0", "q4_0") and shape[-1] % 32:
        log.info("%s: row length %d is not a multiple of 32; stored as f16", name, shape[-1])
        return "F16"
    return kind.upper()


def _vocab(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and SentencePiece types (the same numbers as GGUF token types) of `n_vocab` ids.

    Types come from the tokenizer's in-memory model, where reserved pieces (<start_of_turn>, <unusedN>,
    ...) are CONTROL: llama.cpp then matches them only with special-token parsing, as gemmakit does.
    """
    return tokenizer.vocab(n_vocab)


def _add_metadata(w: Any, gguf: Any, cfg: ModelConfig, qtype: str, name: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)  # Gemma 3: the global base
    if LOCAL in cfg.layer_types:
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_freq_base_swa(cfg.rope_local_theta)
    if cfg.generation == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_softcap)
        w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.rope_scaling != 1.0:  # gemma3: global layers only; gemma (all global): every layer
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling)


def _add_tokenizer(w: Any, tokenizer: Tokenizer, n_vocab: int) -> None:
    tokens, scores, types = _vocab(tokenizer, n_vocab)
    w.add_tokenizer_model("llama")  # SentencePiece
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_eot_token_id(tokenizer.end_of_turn_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHAT_TEMPLATE)


def _tensor_data(gguf: Any, name: str, t: Any, ggml_type: str, n_vocab: int) -> np.ndarray:
    """One tensor as the bytes (numpy array) to store: float32, rows trimmed, norms + 1, quantized."""
    import numpy as np
    import torch

    x = t.detach().to("cpu", torch.float32)
    if name in ("embed.weight", "lm_head.weight"):
        x = x[:n_vocab]
    if name.endswith("norm.weight"):
        x = x + 1.0  # GGUF stores (1 + w); llama.cpp multiplies by the stored weight (reference §3.5)
    arr = x.contiguous().numpy()
    if not np.isfinite(arr).all():
        raise GGUFError(f"{name}: contains NaN or infinity; refusing to export")
    if ggml_type == "F16" and float(np.abs(arr).max(initial=0.0)) > 65504.0:
        raise GGUFError(f"{name}: values exceed the float16 range (65504); use --type f32 or bf16")
    return gguf.quants.quantize(arr, gguf.GGMLQuantizationType[ggml_type])


def export_gguf(model: Gemma, tokenizer: Tokenizer, out: str | Path, qtype: str = "f16",
                name: str | None = None, overwrite: bool = False) -> GGUFFile:  # fmt: skip
    """Write `model` + `tokenizer` as a llama.cpp GGUF at `out`; return the re-validated file summary.

    Atomic: written to a temp file beside `out`, fsynced, checked with `read_gguf`, then renamed.
    Peak extra memory is about one tensor in float32 plus its quantized copy.
    """
    gguf = _gguf()
    if qtype not in QTYPES:
        raise GGUFError(f"qtype: expected one of {QTYPES}, got {qtype!r}")
    cfg, out = model.config, Path(out)
    check_exportable(cfg)
    if tokenizer.generation_layout != layout_for_generation(cfg.generation):
        raise GGUFError(f"{tokenizer.source}: a {tokenizer.generation_layout} tokenizer does not fit a "
                        f"{cfg.generation} model")  # fmt: skip
    n_vocab = tokenizer.vocab_size
    if cfg.vocab_size < n_vocab:
        raise GGUFError(f"{tokenizer.source}: tokenizer has {n_vocab} pieces but the model only "
                        f"{cfg.vocab_size} embedding rows; llama.cpp needs them equal")  # fmt: skip
    if cfg.vocab_size > n_vocab:  # as llama.cpp's converter: rows no token can name are dropped
        log.warning("dropping embedding rows %d..%d beyond the tokenizer", n_vocab, cfg.vocab_size - 1)
    if out.exists() and not overwrite:
        raise GGUFError(f"{out}: exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise GGUFError(f"{out}: directory {out.parent} does not exist")
    state = dict(model.state_dict())
    plan = _plan(cfg, state, qtype, n_vocab)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        _write(gguf, tmp, cfg, tokenizer, n_vocab, qtype, name or f"gemmakit {_ARCH[cfg.generation]}",
               plan, state)  # fmt: skip
        info = read_gguf(tmp)
        place_file(tmp, out, overwrite=overwrite)  # exclusive without overwrite: a racing writer loses
    except ArtifactError as e:
        raise GGUFError(str(e)) from None
    except OSError as e:  # disk full, permissions, read-only: one line, not a traceback
        raise GGUFError(f"{out}: cannot write ({(e.strerror or str(e)).lower()})") from None
    finally:
        discard(tmp)  # never raises: on a read-only filesystem unlinking even a missing file fails
    info.path = str(out)
    log.info("wrote %s: %d tensors, %s, %d bytes", out, len(info.tensors), qtype, out.stat().st_size)
    return info


def _plan(
    cfg: ModelConfig, state: dict[str, Any], qtype: str, n_vocab: int
) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(gemmakit name, GGUF name, shape, ggml type) of every tensor, in file order."""
    output_name = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
    order = ["embed.weight", *[k for k in state if k.startswith("blocks.")], "final_norm.weight"]
    order += [] if cfg.tie_embeddings else ["lm_head.weight"]
    plan = []
    for key in order:
        shape = (n_vocab, cfg.dim) if key in ("embed.weight", "lm_head.weight") else tuple(state[key].shape)
        plan.append((key, _gguf_name(key), shape, _tensor_type(key, shape, qtype, output_name)))
    return plan


def _write(gguf: Any, tmp: Path, cfg: ModelConfig, tokenizer: Tokenizer, n_vocab: int, qtype: str,
           name: str, plan: list[tuple[str, str, tuple[int, ...], str]], state: dict[str, Any]) -> None:  # fmt: skip
    """Stream the file: header, metadata and tensor infos first, then one tensor at a time."""
    import numpy as np

    w = gguf.GGUFWriter(tmp, _ARCH[cfg.generation])
    _add_metadata(w, gguf, cfg, qtype, name)
    _add_tokenizer(w, tokenizer, n_vocab)
    for _, gguf_name, shape, ggml_type in plan:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
        n = 1
        for d in shape:
            n *= d
        w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), n // block * size,
                          raw_dtype=gguf.GGMLQuantizationType[ggml_type])  # fmt: skip
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for key, _, _, ggml_type in plan:
            w.write_tensor_data(_tensor_data(gguf, key, state[key], ggml_type, n_vocab))
        w.flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()
