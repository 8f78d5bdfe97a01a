"""The model against HF transformers' eager Gemma, Gemma 2 and Gemma 3 on tiny random configs.

Bit-identical float32 logits (torch.equal) on the eager path; the SDPA path within 1e-5; greedy
continuations equal to transformers' `generate` live in test_infer.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HF_CASES, make_hf_model, random_tokens, twin_of


@pytest.mark.parametrize("case", list(HF_CASES))
def test_eager_logits_bit_identical(case: str) -> None:
    hf = make_hf_model(case)
    model = twin_of(hf)
    tokens = random_tokens(2, 23)  # 23 > sliding window (5 or 7): local layers really slide
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        got = model(tokens)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected), f"max |diff| {(got - expected).abs().max().item():.3e}"


@pytest.mark.parametrize("case", list(HF_CASES))
def test_sdpa_within_1e5_of_eager(case: str) -> None:
    # std 0.1 keeps logits in the single digits, like real checkpoints; the error is relative to that size.
    hf = make_hf_model(case, std=0.1)
    model = twin_of(hf)
    tokens = random_tokens(2, 23)
    with torch.no_grad():
        eager = model(tokens)
        fast = model.set_attn_impl("sdpa")(tokens)
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-5)


def test_last_only_matches_full() -> None:
    model = twin_of(make_hf_model("gemma3"))
    tokens = random_tokens(3, 11)
    with torch.no_grad():
        last, full = model(tokens, last_only=True), model(tokens)[:, -1:]
        h, w = model.hidden(tokens)[:, -1:].double(), model.embed.weight.double()
    # The same hidden states through the (tied, not soft-capped) head as 3 rows vs 33 rows: BLAS sums
    # the K = 64 terms in a shape-dependent order (GEMV vs GEMM kernels), so bit equality is not
    # promised. Any two fp32 orders of a K-term dot product differ by at most K * eps * sum |x w|
    # (measured: 1.1 eps * sum |x w|); a wrong row or column would be off by O(|logit|).
    bound = h.shape[-1] * torch.finfo(torch.float32).eps * (h.abs() @ w.abs().T)
    assert last.shape == full.shape and torch.all((last.double() - full.double()).abs() <= bound)


def test_eager_detects_a_wrong_op_order() -> None:
    """The bit-exactness check is sharp: scaling q before QK^T (a common shortcut) breaks equality."""
    hf = make_hf_model("gemma2")  # no QK-norm, so a scale folded into wq reaches the scores unchanged
    model = twin_of(hf)
    tokens = random_tokens(1, 17)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits
        for block in model.blocks:  # fold the non-power-of-two scale (24 ** -0.5) into wq instead
            block.wq.weight.mul_(model.config.scaling)
        object.__setattr__(model.config, "query_pre_attn_scalar", 1.0)
        got = model(tokens)
    assert not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["gemma1-mqa", "gemma2", "gemma3"])
def test_bfloat16_forward_close_to_hf_bfloat16(case: str) -> None:
    hf = make_hf_model(case, std=0.1)
    model = twin_of(hf).to(torch.bfloat16)
    hf = hf.to(torch.bfloat16)
    tokens = random_tokens(2, 19)
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.float()
        got = model(tokens).float()
    assert model.embed.weight.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    # Same op order in bf16 too; matmul kernels may still round differently, so compare loosely.
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


def test_padding_positions_do_not_change_real_rows() -> None:
    """Left padding (position -1) leaves the real tokens' logits as if unpadded."""
    model = twin_of(make_hf_model("gemma2"))
    tokens = random_tokens(1, 9)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), tokens], dim=1)
    positions = torch.cat([torch.full((1, 4), -1), torch.arange(9)[None]], dim=1)
    with torch.no_grad():
        alone = model(tokens)
        with_pad = model(padded, positions=positions)[:, 4:]
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)
