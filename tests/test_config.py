"""Configs: presets have the official shapes and parameter counts; HF config.json maps onto ModelConfig."""

from __future__ import annotations

import json

import pytest

from gemmakit.config import (
    GLOBAL,
    LOCAL,
    OFFICIAL_PARAM_COUNTS,
    PRESETS,
    ConfigError,
    ModelConfig,
    from_hf_config,
    from_hf_dict,
    get_preset,
    to_hf_dict,
)
from gemmakit.model import param_count


@pytest.mark.parametrize("name", list(OFFICIAL_PARAM_COUNTS))
def test_preset_param_count_is_official(name: str) -> None:
    assert param_count(PRESETS[name]) == OFFICIAL_PARAM_COUNTS[name]


def test_every_official_family_has_presets() -> None:
    for name in ("gemma-1.1-2b", "gemma-1.1-7b", "codegemma-2b", "codegemma-7b"):
        base = "gemma-2b" if name.endswith("2b") else "gemma-7b"
        assert PRESETS[name] == PRESETS[base]  # same shapes, only weights differ
    assert "tiny" in PRESETS and param_count(PRESETS["tiny"]) < 1_000_000


def test_layer_patterns() -> None:
    g2 = PRESETS["gemma-2-2b"].layer_types
    assert g2[0] == LOCAL and g2[1] == GLOBAL and g2.count(GLOBAL) == 13
    g3 = PRESETS["gemma-3-1b"].layer_types
    assert [i for i, t in enumerate(g3) if t == GLOBAL] == [5, 11, 17, 23]
    assert set(PRESETS["gemma-7b"].layer_types) == {GLOBAL}


def test_unknown_preset_and_keys_are_errors() -> None:
    with pytest.raises(ConfigError, match="gemma-2b"):
        get_preset("gemma-5b")
    with pytest.raises(ConfigError, match="unknown ModelConfig key"):
        ModelConfig.from_dict({**PRESETS["tiny"].to_dict(), "dimm": 3})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        PRESETS["tiny"].replace(n_kv_heads=3)


def test_dict_round_trip() -> None:
    for cfg in PRESETS.values():
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# Hub-style config.json contents (keys as the official repos carry them).
# fmt: off
HUB_GEMMA_7B = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_act": "gelu",
    "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28, "num_attention_heads": 16,
    "num_key_value_heads": 16, "head_dim": 256, "vocab_size": 256000, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1,
}
# fmt: on
# fmt: off
HUB_GEMMA2_27B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 4608, "intermediate_size": 36864, "num_hidden_layers": 46, "num_attention_heads": 32,
    "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 256000, "query_pre_attn_scalar": 144,
    "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "rope_theta": 10000.0, "max_position_embeddings": 8192, "cache_implementation": "hybrid",
}
# fmt: on
# fmt: off
HUB_GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "query_pre_attn_scalar": 256,
    "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1000000, "rope_local_base_freq": 10000,
    "rope_scaling": None, "attn_logit_softcapping": None, "final_logit_softcapping": None,
    "max_position_embeddings": 32768,
}
# fmt: on
# fmt: off
HUB_GEMMA3_27B_MM = {
    "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "image_token_index": 262144,
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
        "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 262208,
        "query_pre_attn_scalar": 168, "sliding_window": 1024, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "max_position_embeddings": 131072,
    },
    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
}
# fmt: on


# fmt: off
@pytest.mark.parametrize(
    "hub, preset",
    [(HUB_GEMMA_7B, "gemma-7b"), (HUB_GEMMA2_27B, "gemma-2-27b"), (HUB_GEMMA3_1B, "gemma-3-1b"),
     (HUB_GEMMA3_27B_MM, "gemma-3-27b")],
)
# fmt: on
def test_hub_config_json_gives_the_preset(hub: dict, preset: str, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert from_hf_config(tmp_path) == PRESETS[preset]


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_transformers_reads_our_config_json_back(name: str) -> None:
    """to_hf_dict -> transformers config class -> its to_dict -> from_hf_dict is the identity."""
    import transformers

    cfg = PRESETS[name]
    d = to_hf_dict(cfg)
    cls = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig}[d["model_type"]]  # fmt: skip
    hf = cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert from_hf_dict(hf.to_dict()) == cfg


def test_transformers_legacy_gemma3_keys_agree_with_ours() -> None:
    """transformers' own conversion of legacy rope keys matches our reading of them."""
    import transformers

    legacy = {k: v for k, v in HUB_GEMMA3_27B_MM["text_config"].items() if k != "model_type"}
    hf = transformers.Gemma3TextConfig(**legacy)
    ours = from_hf_dict({**legacy, "model_type": "gemma3_text"})
    assert from_hf_dict(hf.to_dict()) == ours
    assert ours.rope_scaling == 8.0 and ours.rope_local_theta == 10000.0 and ours.rope_theta == 1e6


def test_bad_config_json_errors_name_the_file(tmp_path) -> None:
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        from_hf_config(p)
    p.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_config(p)
    p.write_text(json.dumps({**HUB_GEMMA3_1B, "rope_scaling": {"rope_type": "yarn", "factor": 2}}))
    with pytest.raises(ConfigError, match="linear"):
        from_hf_config(p)
    with pytest.raises(ConfigError, match="not found"):
        from_hf_config(tmp_path / "nope")
