"""Shared test fixtures: tiny random HF transformers Gemma models (the parity oracle) and their gemmakit twins.

Every weight is randomised, norms included (HF initialises norms and embedding row 0 to zero, which
would hide (1+w) and row-0 bugs). Configs use a sliding window shorter than test sequences, a
non-power-of-two query_pre_attn_scalar (24) and GQA / MQA, as reference §6 advises.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch
from spm_helpers import train_gemma_spm

from gemmakit.checkpoint import hf_state_dict_to_internal, save_hf
from gemmakit.config import PRESETS, from_hf_dict
from gemmakit.model import Gemma

VOCAB = 320

# name -> (HF config class name, HF model class name, config kwargs)
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
               num_attention_heads=4, head_dim=16, max_position_embeddings=256)  # fmt: skip
# fmt: off
HF_CASES: dict[str, tuple[str, str, dict]] = {
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, num_key_value_heads=1)),
    "gemma1-mha": ("GemmaConfig", "GemmaForCausalLM", dict(_COMMON, num_key_value_heads=4)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        _COMMON, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _COMMON, num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=5,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})),
    "gemma3-mqa": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _COMMON, num_key_value_heads=1, query_pre_attn_scalar=24, sliding_window=7, num_hidden_layers=7)),
}
# fmt: on


def make_hf_model(case: str, seed: int = 0, std: float = 0.3):
    """A random float32 HF model (eager attention) for one of HF_CASES."""
    import transformers

    cfg_cls, model_cls, kwargs = HF_CASES[case]
    hf_cfg = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)._from_config(hf_cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


def twin_of(hf_model) -> Gemma:
    """The gemmakit model with the same config and weights as an HF model."""
    cfg = from_hf_dict(hf_model.config.to_dict())
    model = Gemma(cfg).eval()
    model.load_state_dict(hf_state_dict_to_internal(hf_model.state_dict(), cfg))
    return model


# conftest's default std 0.3 makes the sandwich-norm models (Gemma 2/3) repeat one token forever
# whatever the prompt (1 distinct id in 32 greedy steps), which would make generation parity blind;
# std 0.07 gives 3-14 distinct ids per 32 tokens with top-2 logit margins >= 1e-3 (errors ~1e-6).
GEN_STD = {"gemma1-mqa": 0.3, "gemma1-mha": 0.3, "gemma2": 0.07, "gemma3": 0.07, "gemma3-mqa": 0.07}


@functools.cache
def generation_models(case: str):
    """(HF model, gemmakit twin) with GEN_STD weights, built once per case; tests must not modify them."""
    hf = make_hf_model(case, std=GEN_STD[case])
    return hf, twin_of(hf)


@pytest.fixture(params=list(HF_CASES))
def hf_case(request) -> str:
    return request.param


def random_tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    """Ids in [1, VOCAB): never pad id 0."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (b, t), generator=g)


# Tokenizer fixtures shared by the tokenizer and chat tests: one tiny SentencePiece model per layout
# (Gemma 1/2: turn markers 106/107; Gemma 3: 105/106), trained offline by spm_helpers.
@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def generation(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(generation, tmp_path_factory):
    from spm_helpers import train_gemma_spm

    return train_gemma_spm(tmp_path_factory.mktemp("spm"), generation)


@pytest.fixture(scope="module")
def tok(model_path):
    from gemmakit.tokenizer import Tokenizer

    return Tokenizer.load(model_path)


def pytest_addoption(parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma 3 saved by gemmakit as an HF directory, with a trained tokenizer.model."""
    root = tmp_path_factory.mktemp("cli")
    cfg = PRESETS["tiny"].replace(vocab_size=640)
    model = Gemma(cfg).init_weights(std=0.3, seed=0)
    out = save_hf(model, root / "model")
    shutil.copy(train_gemma_spm(root / "tok", "gemma3"), out / "tokenizer.model")
    return out
