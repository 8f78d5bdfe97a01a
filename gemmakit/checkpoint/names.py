"""Name and shape tables: HF transformers and google/gemma_pytorch tensor names <-> gemmakit's.

Where it sits: the bottom of the `checkpoint` package, used by `load` (rename and check stored
tensors) and `save` (name tensors on the way out); `tests/conftest.py` uses
`hf_state_dict_to_internal` to build twins of HF reference models. Reference checkpoint names
appear only in tables like these (STYLE.md), never scattered through the loaders.

Key trade-off: `file_names` / `file_shapes` derive the expected tensors from a `Gemma(cfg)` built
on the `meta` device rather than from a hand-written list, so they can never drift from the model's
parameters; the price is building a meta model per call (no memory, a few ms per call).
"""

from __future__ import annotations

import torch

from gemmakit.config import ModelConfig
from gemmakit.model import Gemma

FORMATS = ("hf", "gemma_pytorch")

# ---- name mapping: HF transformers <-> gemmakit ------------------------------------------------
# Reference checkpoint names appear only in tables like these (STYLE.md).

_HF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "wq.weight",
    "self_attn.k_proj.weight": "wk.weight",
    "self_attn.v_proj.weight": "wv.weight",
    "self_attn.o_proj.weight": "wo.weight",
    "self_attn.q_norm.weight": "q_norm.weight",
    "self_attn.k_norm.weight": "k_norm.weight",
    "pre_feedforward_layernorm.weight": "mlp_norm.weight",
    "post_feedforward_layernorm.weight": "post_mlp_norm.weight",
    "mlp.gate_proj.weight": "w_gate.weight",
    "mlp.up_proj.weight": "w_up.weight",
    "mlp.down_proj.weight": "w_down.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
# Gemma 3 multimodal repos: text tensors under one of these prefixes (older Hub / transformers 5.x).
_HF_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_HF_IGNORED = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def hf_layer_table(cfg: ModelConfig) -> dict[str, str]:
    """Per-layer HF suffix -> gemmakit suffix. Gemma 1's `post_attention_layernorm` is its PRE-MLP norm."""
    table = dict(_HF_LAYER)
    table["post_attention_layernorm.weight"] = (
        "post_attn_norm.weight" if cfg.sandwich_norm else "mlp_norm.weight"
    )
    return table


def hf_name_to_internal(name: str, cfg: ModelConfig) -> str | None:
    """Map one HF tensor name to ours; None for names we do not know (callers report them)."""
    if name in _HF_TOP:
        return _HF_TOP[name]
    if name == "lm_head.weight" and not cfg.tie_embeddings:
        return "lm_head.weight"
    parts = name.split(".", 3)  # model . layers . {i} . suffix
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        suffix = hf_layer_table(cfg).get(parts[3])
        if suffix is not None:
            return f"blocks.{int(parts[2])}.{suffix}"
    return None


def internal_name_to_hf(name: str, cfg: ModelConfig) -> str:
    """Inverse of `hf_name_to_internal` for every parameter name of `Gemma(cfg)`."""
    for hf, ours in _HF_TOP.items():
        if name == ours:
            return hf
    if name == "lm_head.weight":
        return name
    _, i, suffix = name.split(".", 2)
    inverse = {v: k for k, v in hf_layer_table(cfg).items()}
    return f"model.layers.{i}.{inverse[suffix]}"


def hf_state_dict_to_internal(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF Gemma state dict (tied `lm_head.weight` dropped); unknown names raise KeyError."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        ours = hf_name_to_internal(name, cfg)
        if ours is None:
            raise KeyError(name)
        out[ours] = t
    return out


# ---- name mapping: google/gemma_pytorch <-> gemmakit (reference §3.2) ----------------------------
# Same per-layer names as HF except a FUSED qkv_proj (rows q, then k, then v) and query/key_norm.

_GP_TOP = {"embedder.weight": "embed.weight", "model.norm.weight": "final_norm.weight"}
_GP_QKV = "self_attn.qkv_proj.weight"
_GP_RENAMED = {
    "self_attn.q_norm.weight": "self_attn.query_norm.weight",
    "self_attn.k_norm.weight": "self_attn.key_norm.weight",
}
_GP_BUFFERS = ("freqs_cis", "local_freqs_cis", "global_freqs_cis")  # RoPE tables, recomputed by us


def file_names(cfg: ModelConfig, layout: str) -> dict[str, str]:
    """gemmakit parameter name -> tensor name in `layout` ("hf" or "gemma_pytorch"); wq/wk/wv share qkv."""
    with torch.device("meta"):
        names = [n for n, _ in Gemma(cfg).named_parameters()]
    if layout == "hf":
        return {n: internal_name_to_hf(n, cfg) for n in names}
    out = {}
    for n in names:
        hf = internal_name_to_hf(n, cfg)
        if n.split(".")[-2] in ("wq", "wk", "wv"):
            out[n] = hf.rsplit(".", 3)[0] + "." + _GP_QKV
        else:
            out[n] = {"model.embed_tokens.weight": "embedder.weight"}.get(hf, hf)
            for old, new in _GP_RENAMED.items():
                out[n] = out[n].replace(old, new)
    return out


def file_shapes(cfg: ModelConfig, layout: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete `layout` checkpoint of `cfg` holds, with its shape (qkv fused)."""
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Gemma(cfg).named_parameters()}
    out: dict[str, tuple[int, ...]] = {}
    for n, f in file_names(cfg, layout).items():
        fused = f.endswith(_GP_QKV)
        out[f] = ((cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, cfg.dim) if fused else shapes[n]
    return out
