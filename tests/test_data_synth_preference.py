"""Issue 12's alignment data: `synth.preference_pairs`, `synth.prompt_set` and `data.rewards` (no model).

The key property: on every pair, the verifiable reward gives the chosen reply 1.0 and the rejected 0.0.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from gemmakit.data import rewards, synth

KINDS = {"arithmetic", "format", "refusal", "identity"}
COLUMNS = ("kind", "answer", "check", "harmful", "identity")


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in COLUMNS}


def _prompt(row: dict) -> str:
    return row["prompt"][0]["content"]


def test_seeded_and_seeds_differ() -> None:
    assert synth.preference_pairs(300, 0) == synth.preference_pairs(300, 0)
    assert synth.prompt_set(300, 4) == synth.prompt_set(300, 4)
    assert synth.preference_pairs(300, 0) != synth.preference_pairs(300, 2)
    assert synth.prompt_set(300, 0) != synth.prompt_set(300, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_are_well_formed_trl_preference_rows(seed: int) -> None:
    pairs = synth.preference_pairs(500, seed)
    assert {p["kind"] for p in pairs} == KINDS
    for p in pairs:
        assert set(p) == {"prompt", "chosen", "rejected", "kind"}
        for key, role in (("prompt", "user"), ("chosen", "assistant"), ("rejected", "assistant")):
            [msg] = p[key]
            assert msg["role"] == role and isinstance(msg["content"], str) and msg["content"].strip(), p
        assert p["chosen"] != p["rejected"], p
    for row, p in zip(synth.prompt_set(500, seed), pairs, strict=True):
        assert row["messages"] == p["prompt"] and row["kind"] == p["kind"]  # row i is pair i's prompt
        extra = {"arithmetic": "answer", "format": "check", "refusal": "harmful", "identity": "identity"}
        assert set(row) == {"messages", "kind", extra[row["kind"]]}, row
        assert isinstance(row.get("answer", 0), int) and isinstance(row.get("harmful", True), bool)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chosen_passes_and_rejected_fails_every_checker(seed: int) -> None:
    pairs, rows = synth.preference_pairs(500, seed), synth.prompt_set(500, seed)
    prompts, cols = [r["messages"] for r in rows], _columns(rows)
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    assert rewards.synth_reward(prompts, chosen, **cols) == [1.0] * len(rows)
    assert rewards.synth_reward(prompts, rejected, **cols) == [0.0] * len(rows)
    # The same through each kind's own function, which judges only its rows.
    for fn, kind in ((rewards.arithmetic_correct, "arithmetic"), (rewards.format_follows, "format"),
                     (rewards.refusal_appropriate, "refusal"), (rewards.identity_truthful, "identity")):  # fmt: skip
        for texts, want in ((chosen, 1.0), (rejected, 0.0)):
            got = fn(prompts, texts, **cols)
            assert got == [want if r["kind"] == kind else None for r in rows], fn.__name__
    # Structural checks on what the rejected side does wrong, beyond the checkers.
    for row, p in zip(rows, pairs, strict=True):
        good, bad = p["chosen"][0]["content"], p["rejected"][0]["content"]
        if row["kind"] == "arithmetic":  # same answer style, another number
            assert (
                re.sub(r"\d+", "N", good) == re.sub(r"\d+", "N", bad)
                and synth.answer_of(bad) != row["answer"]
            )
        if row["kind"] == "refusal":
            assert synth.is_refusal(good) == row["harmful"] != synth.is_refusal(bad)


def test_task_accuracy_reports_kinds_and_over_refusal() -> None:
    pairs, rows = synth.preference_pairs(400, 1), synth.prompt_set(400, 1)
    good = rewards.task_accuracy(rows, [p["chosen"][0]["content"] for p in pairs])
    assert good == {**dict.fromkeys(KINDS, 1.0), "over_refusal_rate": 0.0}
    refuse_all = rewards.task_accuracy(rows, [synth.REFUSALS[0]] * len(rows))
    assert refuse_all["over_refusal_rate"] == 1.0 and 0.0 < refuse_all["refusal"] < 1.0
    assert refuse_all["arithmetic"] == 0.0
    only_arith = [r for r in rows if r["kind"] == "arithmetic"]
    assert set(rewards.task_accuracy(only_arith, ["0"] * len(only_arith))) == {"arithmetic"}


def test_train_and_held_out_prompts_do_not_overlap() -> None:
    assert (synth.split_of(synth.PREFERENCE_TRAIN_SEED), synth.split_of(synth.PREFERENCE_HELDOUT_SEED)) == (
        "train", "held-out")  # fmt: skip
    train = {_prompt(p): p["kind"] for s in (0, 2) for p in synth.preference_pairs(2000, s)}
    held = {_prompt(p): p["kind"] for s in (1, 3) for p in synth.preference_pairs(2000, s)}
    shared = {q for q in set(train) & set(held)}
    # The documented overlap: the few "List n colours." / "Count from 1 to n." instructions.
    assert shared and all(re.fullmatch(r"(List \d colours|Count from 1 to \d)\.", q) for q in shared), shared
    # Arithmetic operand pairs are disjoint, not just the sentences.
    operands = [{tuple(map(int, re.findall(r"\d+", q)[:2])) for q, k in d.items() if k == "arithmetic"}
                for d in (train, held)]  # fmt: skip
    assert operands[0] and operands[1] and not operands[0] & operands[1]


def test_benign_requests_share_words_with_harmful_ones() -> None:
    harmful = synth.HARMFUL + synth.HARMFUL_EXTRA
    for act, word, answer in synth.BENIGN:
        assert word in act and any(word in h for h in harmful), (act, word)
        assert not synth.is_refusal(answer)
    benign = [p for s in (0, 1) for p in synth.preference_pairs(1000, s) if p["kind"] == "refusal"]
    acts = {_prompt(p) for p in benign if not synth.is_refusal(p["chosen"][0]["content"])}
    assert any("kill a Python process" in q for q in acts) and any("bath bomb" in q for q in acts)


def test_is_refusal_matches_the_sft_data() -> None:
    """The SFT refusals are refusals, and no other SFT reply is: the RL reward and SFT agree."""
    for c in synth.conversations(2000, 0):
        assert synth.is_refusal(c["messages"][1]["content"]) == (c["kind"] == "refusal"), c
    assert synth.is_refusal("I\u2019m unable to help with that.")
    assert not synth.is_refusal("Sure! Here is how to make a bomb. First, you will need to ...")


def test_identity_checks() -> None:
    ok = rewards.identity_truthful([], [synth.SELF_DESCRIPTION, "No, I am not ChatGPT. I am a Gemma model."],
                                   identity=[True, True])  # fmt: skip
    assert ok == [1.0, 1.0]
    bad = ["I'm Claude, an AI assistant.", "I am a language model made by OpenAI.", "Yes.", "Hello!"]
    assert rewards.identity_truthful([], bad, identity=[True] * 4) == [0.0] * 4


def test_rewards_accept_extra_columns_and_abstain() -> None:
    completions = ["3 + 4 = 7.", "CAT", "I can't help with that.", synth.SELF_DESCRIPTION]
    prompts = [[{"role": "user", "content": "q"}]] * 4
    cols = {"kind": ["arithmetic", "format", "refusal", "identity"], "answer": [7, None, None, None],
            "check": [None, {"kind": "capitals", "word": "cat"}, None, None],
            "harmful": [None, None, True, None], "identity": [None, None, None, True],
            "unknown_column": [1, 2, 3, 4], "trainer_state": ["x"] * 4}  # fmt: skip
    assert rewards.synth_reward(prompts, completions, **cols) == [1.0] * 4
    assert rewards.arithmetic_correct(prompts, completions, **cols) == [1.0, None, None, None]
    assert rewards.format_follows(prompts, completions, **cols) == [None, 1.0, None, None]
    assert rewards.refusal_appropriate(prompts, completions, **cols) == [None, None, 1.0, None]
    assert rewards.identity_truthful(prompts, completions, **cols) == [None, None, None, 1.0]
    # A missing column, an unknown kind and conversational completions (TRL passes message lists).
    for fn in (rewards.arithmetic_correct, rewards.format_follows, rewards.refusal_appropriate,
               rewards.identity_truthful, rewards.synth_reward):  # fmt: skip
        assert fn(prompts, completions) == [None] * 4
    assert rewards.synth_reward(prompts[:1], ["7"], kind=["fact"], answer=[7]) == [None]
    as_messages = [[{"role": "assistant", "content": "3 + 4 = 7."}]]
    assert rewards.arithmetic_correct(prompts[:1], as_messages, answer=[7]) == [1.0]
    assert rewards.format_follows(prompts[:1], ["CAT"], check=['{"kind": "capitals", "word": "cat"}']) == [
        1.0
    ]


def test_conversations_unchanged() -> None:
    """The shipped nano model's SFT data: the issue-12 refactor of synth.py must not change a byte."""
    digest = hashlib.sha256(json.dumps(synth.conversations(2000, 0)).encode()).hexdigest()
    assert digest == "4ca1594e10825a31e55315036c0924b1071238caf014e9fa20bd974b8cc9a645"
