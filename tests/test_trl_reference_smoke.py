"""Smoke tests of the TRL reference harness (tests/trl_reference.py): TRL's own invariants on a tiny random Gemma 3.

These check that the harness feeds TRL correctly (not gemmakit): DPO at policy == reference gives ln 2 and zero
rewards, the reward loss matches -logsigmoid(r_c - r_r) from the model's own forward, and RLOO's advantages at
beta = 0 are the leave-one-out differences.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")
from trl_reference import tiny_hf_gemma3, trl_dpo_loss, trl_reward_loss, trl_rloo  # noqa: E402

EOT = 106  # <end_of_turn> in the Gemma 3 layout
PROMPTS = [[2, 105, 30, 31, 32], [2, 105, 40]]
CHOSEN = [[50, 51, EOT, 108], [60, EOT, 108]]
REJECTED = [[52, EOT, 108], [61, 62, 63, 64, EOT, 108]]


@pytest.fixture(scope="module")
def policy():
    return tiny_hf_gemma3(seed=1)


@pytest.fixture(scope="module")
def ref():
    return tiny_hf_gemma3(seed=2)


def test_dpo_policy_equals_ref_gives_ln2_and_zero_rewards(policy) -> None:
    loss, m = trl_dpo_loss(policy, policy, PROMPTS, CHOSEN, REJECTED, beta=0.1)
    assert abs(loss - math.log(2)) < 1e-6
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[key] == 0.0, key
    assert m["logps/chosen"] < 0 and m["logps/rejected"] < 0


def test_dpo_ipo_at_policy_equals_ref(policy) -> None:
    # Delta = 0, so IPO's loss is (0 - 1/(2 beta))^2 for every pair.
    loss, m = trl_dpo_loss(policy, policy, PROMPTS, CHOSEN, REJECTED, beta=0.1, loss_type="ipo")
    assert loss == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)
    assert m["rewards/margins"] == 0.0


def test_dpo_with_distinct_ref_is_not_ln2(policy, ref) -> None:
    loss, m = trl_dpo_loss(policy, ref, PROMPTS, CHOSEN, REJECTED, beta=0.1)
    assert abs(loss - math.log(2)) > 1e-4
    assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-5)


def test_reward_loss_matches_model_forward() -> None:
    rm = tiny_hf_gemma3(seed=3, seq_cls=True)
    chosen = [p + c for p, c in zip(PROMPTS, CHOSEN, strict=True)]
    rejected = [p + r for p, r in zip(PROMPTS, REJECTED, strict=True)]
    loss, m = trl_reward_loss(rm, chosen, rejected)

    # Own forward: right padding with pad id 0, the HF head pools at the rightmost non-pad token.
    rows = chosen + rejected
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    rm.config.pad_token_id = 0
    with torch.no_grad():
        r = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    r_c, r_r = r[:2], r[2:]
    assert loss == pytest.approx(float(-torch.nn.functional.logsigmoid(r_c - r_r).mean()), abs=1e-6)
    assert m["accuracy"] == float((r_c > r_r).float().mean())
    assert m["margin"] == pytest.approx(float((r_c - r_r).mean()), abs=1e-6)
    assert m["min_reward"] == pytest.approx(float(r.min()), abs=1e-6)
    assert m["max_reward"] == pytest.approx(float(r.max()), abs=1e-6)

    # A margin column shifts the logit; the centring term adds coef * mean((r_c + r_r)^2).
    loss_m, _ = trl_reward_loss(rm, chosen, rejected, margin=[0.5, -1.0], center_rewards_coefficient=0.01)
    want = (
        -torch.nn.functional.logsigmoid(r_c - r_r - torch.tensor([0.5, -1.0])).mean()
        + 0.01 * ((r_c + r_r) ** 2).mean()
    )
    assert loss_m == pytest.approx(float(want), abs=1e-6)


def test_rloo_advantages_beta0_are_leave_one_out(policy, ref) -> None:
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    completions = [[50, 51, EOT], [52, EOT], [53, 54, 55], [60, EOT], [61, 62, EOT], [63, 64, 65]]
    rewards = [1.0, 0.0, 0.5, 2.0, -1.0, 3.0]
    out = trl_rloo(policy, ref, prompts, completions, rewards, num_generations=3, beta=0.0, eos_id=EOT)
    g = 3
    want = []
    for i, r in enumerate(rewards):
        group = rewards[(i // g) * g : (i // g + 1) * g]
        want.append(r - (sum(group) - r) / (g - 1))
    assert out["advantages"] == pytest.approx(want, abs=1e-6)
    assert out["kl"] is None and out["kl_per_seq"] is None
    # rho = 1 with num_iterations = 1, so the loss is -mean(A) (0 here: LOO advantages sum to 0 per group).
    assert out["loss"] == pytest.approx(-sum(want) / len(want), abs=1e-6)
    assert out["clip_ratio/region_mean"] == 0.0
    # TRL's completion mask covers tokens up to and including the first EOS, not the padding after it.
    assert out["completion_mask"] == [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]


def test_rloo_kl_shaping_and_temperature(policy, ref) -> None:
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    completions = [[50, 51, EOT], [52, EOT], [60, EOT], [61, 62, 63]]
    rewards = [1.0, 0.0, 0.5, 2.0]
    beta = 0.05
    out = trl_rloo(policy, ref, prompts, completions, rewards, beta=beta, eos_id=EOT)
    kl = out["kl_per_seq"]
    shaped = [r - beta * k for r, k in zip(rewards, kl, strict=True)]
    want = [shaped[0] - shaped[1], shaped[1] - shaped[0], shaped[2] - shaped[3], shaped[3] - shaped[2]]
    assert out["advantages"] == pytest.approx(want, abs=1e-5)
    n_tokens = sum(map(sum, out["completion_mask"]))
    assert out["kl"] == pytest.approx(sum(kl) / n_tokens, abs=1e-5)  # logged kl: token mean of old - ref

    hot = trl_rloo(policy, ref, prompts, completions, rewards, beta=beta, temperature=2.0, eos_id=EOT)
    assert hot["old_logps"] != pytest.approx(out["old_logps"], abs=1e-3)  # logits are divided by temperature
