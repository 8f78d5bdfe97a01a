"""Model configuration: one frozen dataclass for every text Gemma generation, plus named presets.

Where it sits: first in the data flow. Everything else (model, checkpoint, infer) reads a
`ModelConfig`; nothing here imports torch, so configs can be built and validated anywhere.

Gemma's generational differences are *values* here, not code paths elsewhere: Gemma 1 is
pre-norm only with every layer global; Gemma 2 adds sandwich norms, soft-caps and alternating
4096-token sliding windows; Gemma 3 drops the soft-caps, adds QK-norm and a 5:1 local:global
pattern with two RoPE bases. Facts and sources: shared/reference/gemma-architecture.md §1-§2.

Key trade-off: `layer_types` is stored explicitly (one entry per layer) instead of a pattern
integer, so a config read from any HF `config.json` (which may list arbitrary layer types) is
represented exactly; presets build it from the official pattern with `layer_pattern()`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemmakit.errors import UserError

GLOBAL = "global"  # full causal attention
LOCAL = "local"  # causal attention limited to the last `sliding_window` keys
GENERATIONS = ("gemma1", "gemma2", "gemma3")


class ConfigError(UserError):
    """A configuration value or file is invalid; the message names the field and what was expected."""


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one text Gemma model. Every official size is a preset below."""

    # Which Gemma generation this is; decides chat-format token ids, not model maths.
    generation: str = "gemma1"
    # Rows of the (tied) embedding: 256000 for Gemma 1/2, 262144 for Gemma 3 text.
    vocab_size: int = 256000
    # Residual stream width H; the embedding is scaled by fp32(sqrt(H)) cast to the weight dtype.
    dim: int = 2048
    # Number of transformer blocks.
    n_layers: int = 18
    # Query heads.
    n_heads: int = 8
    # Key/value heads: 1 = multi-query (Gemma 1 2B), == n_heads = multi-head (7B), else grouped.
    n_kv_heads: int = 1
    # Per-head width; NOT always dim // n_heads (Gemma 1 7B: 256 vs 192, Gemma 3 1B: 256 vs 288).
    head_dim: int = 256
    # GeGLU width per branch (gate and up each project to this).
    hidden_dim: int = 16384
    # RMSNorm epsilon; 1e-6 in every official config.
    norm_eps: float = 1e-6
    # Gemma 2/3 "sandwich": extra RMSNorms after attention and after the MLP (Gemma 1: pre-norm only).
    sandwich_norm: bool = False
    # Gemma 3: (1+w) RMSNorm over head_dim on q and k, applied before RoPE.
    qk_norm: bool = False
    # One entry per layer, GLOBAL or LOCAL (sliding window). Gemma 2: layer 0 local, alternating.
    layer_types: tuple[str, ...] = field(default_factory=lambda: (GLOBAL,) * 18)
    # Keys visible to a LOCAL layer's query, itself included (HF semantics: j > i - W). None = no local layers.
    sliding_window: int | None = None
    # Gemma 2: scores -> cap * tanh(scores / cap) before masking (50.0); None disables.
    attn_softcap: float | None = None
    # Gemma 2: logits -> cap * tanh(logits / cap) (30.0); None disables.
    final_softcap: float | None = None
    # Attention scale is query_pre_attn_scalar ** -0.5 (Gemma 1: head_dim; Gemma 2 27B: 144; Gemma 3 27B: 168).
    query_pre_attn_scalar: float = 256.0
    # RoPE base of GLOBAL layers (Gemma 1/2: 10k on every layer; Gemma 3: 1M).
    rope_theta: float = 10_000.0
    # RoPE base of LOCAL layers (Gemma 3: 10k).
    rope_local_theta: float = 10_000.0
    # Linear RoPE scaling on GLOBAL layers: inv_freq / factor (Gemma 3 4B/12B/27B: 8.0; else 1.0).
    rope_scaling: float = 1.0
    # Context length the model was trained for (max_position_embeddings).
    max_seq_len: int = 8192
    # Output projection shares the embedding matrix (true for every official Gemma).
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # -- derived values -------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        """Attention score multiplier, a Python float applied after QK^T as in HF eager."""
        return self.query_pre_attn_scalar**-0.5

    @property
    def n_rep(self) -> int:
        """Query heads served by each kv head."""
        return self.n_heads // self.n_kv_heads

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        need(
            self.generation in GENERATIONS,
            f"generation: expected one of {GENERATIONS}, got {self.generation!r}",
        )
        for name in (
            "vocab_size",
            "dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "hidden_dim",
            "max_seq_len",
        ):
            v = getattr(self, name)
            need(
                isinstance(v, int) and not isinstance(v, bool) and v > 0,
                f"{name}: expected a positive integer, got {v!r}",
            )
        need(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        need(self.head_dim % 2 == 0, f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
        need(
            len(self.layer_types) == self.n_layers,
            f"layer_types: expected {self.n_layers} entries, got {len(self.layer_types)}",
        )
        bad = sorted({t for t in self.layer_types if t not in (GLOBAL, LOCAL)})
        need(not bad, f"layer_types: expected {GLOBAL!r} or {LOCAL!r}, got {bad}")
        if LOCAL in self.layer_types:
            need(
                self.sliding_window is not None and self.sliding_window > 0,
                "sliding_window: local layers need a positive window",
            )
        for name in ("attn_softcap", "final_softcap"):
            v = getattr(self, name)
            need(v is None or v > 0, f"{name}: expected a positive number or None, got {v!r}")
        need(
            self.query_pre_attn_scalar > 0,
            f"query_pre_attn_scalar: expected > 0, got {self.query_pre_attn_scalar}",
        )
        need(self.rope_scaling > 0, f"rope_scaling: expected > 0, got {self.rope_scaling}")
        need(self.norm_eps > 0, f"norm_eps: expected > 0, got {self.norm_eps}")

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; unknown field names are errors."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are errors (a typo must not silently fall back to a default)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelConfig key(s) {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if "layer_types" in d:
            d["layer_types"] = tuple(d["layer_types"])
        return cls(**d)


def layer_pattern(n_layers: int, every: int) -> tuple[str, ...]:
    """Layer i is GLOBAL iff (i + 1) % every == 0, else LOCAL (HF's rule; every=1: all global)."""
    return tuple(GLOBAL if (i + 1) % every == 0 else LOCAL for i in range(n_layers))


def _gemma1(dim: int, n_layers: int, n_heads: int, n_kv: int, hidden: int) -> ModelConfig:
    # fmt: off
    return ModelConfig(
        generation="gemma1", vocab_size=256000, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=256, hidden_dim=hidden, layer_types=layer_pattern(n_layers, 1),
        query_pre_attn_scalar=256.0, max_seq_len=8192,
    )
    # fmt: on


def _gemma2(
    dim: int, n_layers: int, n_heads: int, n_kv: int, head_dim: int, hidden: int, qpas: float
) -> ModelConfig:
    # fmt: off
    return ModelConfig(
        generation="gemma2", vocab_size=256000, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=hidden, sandwich_norm=True,
        layer_types=layer_pattern(n_layers, 2), sliding_window=4096, attn_softcap=50.0,
        final_softcap=30.0, query_pre_attn_scalar=qpas, max_seq_len=8192,
    )
    # fmt: on


def _gemma3(dim: int, n_layers: int, n_heads: int, n_kv: int, head_dim: int, hidden: int,
            qpas: float, window: int, scaling: float, ctx: int) -> ModelConfig:  # fmt: skip
    # fmt: off
    return ModelConfig(
        generation="gemma3", vocab_size=262144, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=hidden, sandwich_norm=True, qk_norm=True,
        layer_types=layer_pattern(n_layers, 6), sliding_window=window, query_pre_attn_scalar=qpas,
        rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=scaling, max_seq_len=ctx,
    )
    # fmt: on


# Exact official shapes (reference §2). Gemma 1.1 and CodeGemma share Gemma 1's shapes.
PRESETS: dict[str, ModelConfig] = {
    "gemma-2b": _gemma1(2048, 18, 8, 1, 16384),
    "gemma-7b": _gemma1(3072, 28, 16, 16, 24576),
    "gemma-1.1-2b": _gemma1(2048, 18, 8, 1, 16384),
    "gemma-1.1-7b": _gemma1(3072, 28, 16, 16, 24576),
    "codegemma-2b": _gemma1(2048, 18, 8, 1, 16384),
    "codegemma-7b": _gemma1(3072, 28, 16, 16, 24576),
    "gemma-2-2b": _gemma2(2304, 26, 8, 4, 256, 9216, 256.0),
    "gemma-2-9b": _gemma2(3584, 42, 16, 8, 256, 14336, 256.0),  # 256, not the first release's 224
    "gemma-2-27b": _gemma2(4608, 46, 32, 16, 128, 36864, 144.0),  # 144 = dim / n_heads
    "gemma-3-270m": _gemma3(640, 18, 4, 1, 256, 2048, 256.0, 512, 1.0, 32768),
    "gemma-3-1b": _gemma3(1152, 26, 4, 1, 256, 6912, 256.0, 512, 1.0, 32768),
    "gemma-3-4b": _gemma3(2560, 34, 8, 4, 256, 10240, 256.0, 1024, 8.0, 131072),
    "gemma-3-12b": _gemma3(3840, 48, 16, 8, 256, 15360, 256.0, 1024, 8.0, 131072),
    "gemma-3-27b": _gemma3(5376, 62, 32, 16, 128, 21504, 168.0, 1024, 8.0, 131072),  # 168 = dim / n_heads
    # A few-hundred-kB Gemma 3-style model for tests: GQA, a window shorter than test sequences.
    # fmt: off
    "tiny": ModelConfig(
        generation="gemma3",
        vocab_size=512,
        dim=64,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        sandwich_norm=True,
        qk_norm=True,
        layer_types=layer_pattern(6, 3),
        sliding_window=8,
        query_pre_attn_scalar=24.0,
        rope_theta=1_000_000.0,
        rope_scaling=8.0,
        max_seq_len=256,
    ),
    # fmt: on
}

# Official text-parameter counts (reference §2 table; equal to keras-hub preset metadata).
OFFICIAL_PARAM_COUNTS: dict[str, int] = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2-27b": 27_227_128_320,
    "gemma-3-270m": 268_098_176,
    "gemma-3-1b": 999_885_952,
    "gemma-3-4b": 3_880_099_328,
    "gemma-3-12b": 11_765_788_416,
    "gemma-3-27b": 27_009_002_240,
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; an unknown name is an error listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


# ---- reading Hugging Face config.json ---------------------------------------------------------

_HF_MODEL_TYPES = {"gemma": "gemma1", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_HF_LAYER_TYPES = {"full_attention": GLOBAL, "sliding_attention": LOCAL}


_MISSING = object()
_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
          list: "a list"}  # fmt: skip
# Sizes are bounded so no single field can describe a tensor past int32 indexing (2**31 - 1); the
# context length is bounded by what the KV cache can hold (checked against memory when allocated).
_SIZE_MAX = 2**31 - 1


def _field(d: dict[str, Any], key: str, kind: type, default: Any = _MISSING, *, nullable: bool = False,
           positive: bool = False) -> Any:  # fmt: skip
    """`d[key]` checked to be of JSON type `kind` (bool is not an int, an int is a float); a missing
    key (or null, where `nullable`) gives `default`; a missing required key, a wrong type, a
    non-finite or (with `positive`) non-positive number is a ConfigError naming the field."""
    value = d.get(key, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise ConfigError(f"config.json is missing required key {key!r}")
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ConfigError(f"{key}: expected {_KINDS[kind]}, got {value!r}")
    if kind in (int, float):
        if not math.isfinite(value) or (positive and value <= 0):
            raise ConfigError(
                f"{key}: expected a {'positive ' if positive else ''}finite number, got {value!r}"
            )
        if kind is int and positive and value > _SIZE_MAX:
            raise ConfigError(f"{key}: expected at most {_SIZE_MAX}, got {value!r}")
    return value


def _hf_rope(hf: dict[str, Any], generation: str) -> tuple[float, float, float]:
    """(global theta, local theta, global linear factor) from new `rope_parameters` or legacy keys."""
    params = _field(hf, "rope_parameters", dict, None, nullable=True)
    if generation != "gemma3":
        legacy = _field(hf, "rope_theta", float, 10_000.0, positive=True)
        return (theta := _field(params or {}, "rope_theta", float, legacy, positive=True)), theta, 1.0
    if params is not None and "full_attention" in params:
        full = _field(params, "full_attention", dict, {}, nullable=True)
        slide = _field(params, "sliding_attention", dict, {}, nullable=True)
        scaling = full if _field(full, "rope_type", str, "default") != "default" else None
        g = _field(full, "rope_theta", float, 1e6, positive=True)
        lt = _field(slide, "rope_theta", float, 1e4, positive=True)
    else:  # legacy Hub keys: rope_theta (global), rope_local_base_freq, rope_scaling (global only)
        scaling = _field(hf, "rope_scaling", dict, None, nullable=True)
        g = _field(hf, "rope_theta", float, 1e6, positive=True)
        lt = _field(hf, "rope_local_base_freq", float, 1e4, positive=True)
    factor = 1.0
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "linear":
            raise ConfigError(f"rope_scaling: only 'linear' RoPE scaling is used by Gemma, got {kind!r}")
        factor = _field(scaling, "factor", float, positive=True)
    return g, lt, factor


def from_hf_dict(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face Gemma/Gemma2/Gemma3 config dict onto `ModelConfig`.

    Handles the multimodal Gemma 3 `text_config` nesting (vision is ignored, and the 64 extra
    image-token embedding rows beyond `image_token_index` are dropped), legacy Gemma 3 RoPE keys,
    and Gemma 1's legacy `hidden_act: gelu`, which always means tanh-GELU for Gemma. Every field is
    type-checked (`hidden_size: "32"`, `num_hidden_layers: 2.5` or `true` are errors, not coerced).
    """
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in _HF_MODEL_TYPES:
        raise ConfigError(f"model_type: expected one of {sorted(_HF_MODEL_TYPES)}, got {model_type!r}")
    generation = _HF_MODEL_TYPES[model_type]
    top = hf
    if model_type == "gemma3":
        if not isinstance(hf.get("text_config"), dict):
            raise ConfigError("text_config: a multimodal gemma3 config.json needs a 'text_config' object")
        hf = hf["text_config"]
    act = _field(hf, "hidden_activation", str, None, nullable=True)
    act = act or _field(hf, "hidden_act", str, None, nullable=True) or "gelu_pytorch_tanh"
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation: Gemma uses tanh-GELU, got {act!r}")
    n_layers = _field(hf, "num_hidden_layers", int, positive=True)
    dim = _field(hf, "hidden_size", int, positive=True)
    n_heads = _field(hf, "num_attention_heads", int, positive=True)
    vocab = _field(hf, "vocab_size", int, positive=True)
    hidden = _field(hf, "intermediate_size", int, positive=True)
    image_token = top.get("image_token_index", top.get("image_token_id"))
    if model_type == "gemma3" and isinstance(image_token, int) and 0 < image_token < vocab:
        vocab = image_token  # rows >= image_token_index are image soft tokens, not text
    head_dim = _field(hf, "head_dim", int, None, nullable=True, positive=True) or max(dim // n_heads, 1)
    n_kv = _field(hf, "num_key_value_heads", int, n_heads, nullable=True, positive=True)
    if generation == "gemma1":
        types, window = layer_pattern(n_layers, 1), None
    elif layer_types := _field(hf, "layer_types", list, None, nullable=True):
        try:
            types = tuple(_HF_LAYER_TYPES[t] for t in layer_types)
        except (KeyError, TypeError):
            raise ConfigError(
                f"layer_types: expected {sorted(_HF_LAYER_TYPES)} entries, got {layer_types!r}"
            ) from None
        window = _field(hf, "sliding_window", int, None, nullable=True, positive=True)
    else:
        pattern = 2 if generation == "gemma2" else _field(hf, "sliding_window_pattern", int, 6, positive=True)
        types = layer_pattern(n_layers, pattern)
        window = _field(hf, "sliding_window", int, None, nullable=True, positive=True)
        window = window or _field(hf, "sliding_window_size", int, 4096, positive=True)
    g_theta, l_theta, factor = _hf_rope(hf, generation)
    later = generation != "gemma1"  # soft-capping and the query scalar arrived with Gemma 2
    qpas = _field(hf, "query_pre_attn_scalar", float, None, nullable=True, positive=True) if later else None
    attn_cap = (
        _field(hf, "attn_logit_softcapping", float, None, nullable=True, positive=True) if later else None
    )
    final_cap = (
        _field(hf, "final_logit_softcapping", float, None, nullable=True, positive=True) if later else None
    )
    tie = _field(hf, "tie_word_embeddings", bool, _field(top, "tie_word_embeddings", bool, True))
    # fmt: off
    return ModelConfig(
        generation=generation, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, hidden_dim=hidden,
        norm_eps=_field(hf, "rms_norm_eps", float, 1e-6, positive=True), sandwich_norm=later,
        qk_norm=generation == "gemma3", layer_types=types,
        sliding_window=window if LOCAL in types else None,
        attn_softcap=attn_cap, final_softcap=final_cap,
        query_pre_attn_scalar=float(qpas if qpas is not None else head_dim),
        rope_theta=g_theta, rope_local_theta=l_theta, rope_scaling=factor,
        max_seq_len=_field(hf, "max_position_embeddings", int, 8192, positive=True),
        tie_embeddings=tie,
    )
    # fmt: on


def from_hf_config(path: str | Path) -> ModelConfig:
    """Read a Hugging Face `config.json` (a file or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: config.json not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    try:
        return from_hf_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json that transformers reads back as the same model (text-only classes)."""
    # fmt: off
    common: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False,
        "torch_dtype": "float32",
    }
    # fmt: on
    if cfg.generation == "gemma1":
        return {"architectures": ["GemmaForCausalLM"], "model_type": "gemma",
                "hidden_act": "gelu_pytorch_tanh", "rope_theta": cfg.rope_theta, **common}  # fmt: skip
    hf_types = ["full_attention" if t == GLOBAL else "sliding_attention" for t in cfg.layer_types]
    # fmt: off
    out = {
        **common, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": _int_if_whole(cfg.query_pre_attn_scalar),
        "sliding_window": cfg.sliding_window or 4096, "layer_types": hf_types,
        "attn_logit_softcapping": cfg.attn_softcap, "final_logit_softcapping": cfg.final_softcap,
    }
    # fmt: on
    if cfg.generation == "gemma2":
        return {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "rope_theta": cfg.rope_theta,
            **out,
        }
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != 1.0:
        full = {"rope_type": "linear", "factor": cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    out["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
    }
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **out}


def _int_if_whole(x: float) -> int | float:
    """transformers types query_pre_attn_scalar as int; keep a fractional value as float."""
    return int(x) if float(x).is_integer() else x


def human_count(n: float) -> str:
    """1234567 -> '1.23M' (for `info` output)."""
    if n < 1000:
        return str(int(n))
    exp = min(int(math.log10(n) // 3), 4)
    return f"{n / 10 ** (3 * exp):.2f}{' KMGT'[exp]}"


def coerce_value(where: str, value: Any, annotation: Any, error: type[Exception] = ConfigError) -> Any:
    """`value` as a dataclass field's type (TOML ints for floats, lists for tuples), else `error(where: ...)`."""
    hint = annotation
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise error(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise error(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            coerce_value(where, v, args[0] if args[-1] is Ellipsis else args[i], error)
            for i, v in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise error(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint in (int, str, bool, float) and (type(value) is not hint):
        raise error(f"{where}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def dataclass_from_table(cls: type, table: Any, source: str, name: str,
                         error: type[Exception] = ConfigError) -> Any:  # fmt: skip
    """`cls(**table)` for the table `[name]` of `source`, every key checked: unknown keys and wrongly
    typed values raise `error` naming `name.key` and the valid keys (nanoGPT#64: a typo'd key
    silently kept its default)."""
    if not isinstance(table, dict):
        raise error(f"{source}: [{name}] must be a table, got {table!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise error(f"{source}: unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                    f"valid keys of [{name}]: {', '.join(fields)}")  # fmt: skip
    hints = typing.get_type_hints(cls)  # resolves the string annotations `from __future__` leaves
    return cls(**{k: coerce_value(f"{source}: {name}.{k}", v, hints[k], error) for k, v in table.items()})


def read_toml(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A recipe file's parsed TOML; `error` naming the file when it is missing, not UTF-8 or not TOML."""
    import tomllib

    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML ({e})") from None
