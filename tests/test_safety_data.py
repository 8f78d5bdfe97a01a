"""The safety classifier's data and metrics: harm rows (labels, splits), pre-tokenized SFT rows, and
precision / recall / AUC against scikit-learn."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from gemmakit.data import harms
from gemmakit.safety.scoring import binary_report, roc_auc
from gemmakit.train.sft import PreTokenized, SFTDataError, encode_conversations, read_chat_jsonl


def test_rows_are_labelled_by_their_own_harm_only() -> None:
    rows = harms.examples(3000, 0)
    assert 0.25 < sum(r["label"] for r in rows) / len(rows) < 0.45
    for r in rows:
        assert r["policy"] in harms.HARM_TYPES
        assert r["label"] == int(r["kind"] == "violation" and r["policy"] == r["harm"])
        assert (r["harm"], r["policy"]) not in harms.AMBIGUOUS or r["kind"] != "violation"
    kinds = {(r["kind"], r["response"] is None) for r in rows}
    assert len(kinds) == 6  # every kind in both forms


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+".join(re.escape(p) for p in parts) + "$", re.IGNORECASE)


def test_held_out_split_uses_other_templates_and_fillers() -> None:
    train, held = harms.examples(3000, 0), harms.examples(1500, 1)
    text = lambda rows: " ".join(r["prompt"] + " " + (r["response"] or "") for r in rows)  # noqa: E731
    held_text, train_text = text(held), text(train)
    for pool in (harms.GROUPS, harms.INSULTS, harms.DANGEROUS_ACTS, harms.EVENTS):
        held_half = pool[1::2]
        for x in pool[0::2]:
            assert x in train_text
            if not any(x in y for y in held_half):
                assert x not in held_text, x
    for r in held:
        if r["kind"] == "violation" and r["response"] is None:
            table = harms.VIOLATING_PROMPTS[r["harm"]]
            assert any(_pattern(t).match(r["prompt"]) for t in table[1::2]), r["prompt"]
    seen = {r["prompt"] for r in train}
    violations = [r for r in held if r["kind"] == "violation"]
    assert sum(r["prompt"] in seen for r in violations) == 0


def test_same_seed_same_rows() -> None:
    assert harms.examples(200, 4) == harms.examples(200, 4)
    assert harms.examples(200, 4) != harms.examples(200, 6)


def test_pre_tokenized_sft_rows(tmp_path: Path, tok) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"input_ids": [2, 10, 11, 12], "completion_mask": [0, 0, 0, 1]}) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "yo"}]})
                 + "\n")  # fmt: skip
    rows = read_chat_jsonl(f)
    assert rows[0] == PreTokenized([2, 10, 11, 12], [0, 0, 0, 1], f"{f}:1")
    encoded = encode_conversations(rows, tok)
    assert encoded[0] == ([2, 10, 11, 12], [0, 0, 0, 1]) and sum(encoded[1][1]) > 0


@pytest.mark.parametrize(
    "row, words",
    [
        ({"input_ids": [2, 3], "completion_mask": [0]}, "completion_mask: expected 2 values of 0 or 1"),
        ({"input_ids": [2, 3], "completion_mask": [0, 2]}, "completion_mask: expected 2 values"),
        (
            {"input_ids": [2, "x"], "completion_mask": [0, 1]},
            "input_ids: expected a non-empty list of integers",
        ),
        ({"input_ids": [2, 3], "completion_mask": [0, 1], "labels": [1]}, "exactly the keys"),
    ],
)
def test_bad_pre_tokenized_rows_name_file_and_line(tmp_path: Path, row: dict, words: str) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text("\n" * 0 + json.dumps(row) + "\n")
    with pytest.raises(SFTDataError) as e:
        read_chat_jsonl(f)
    assert f"{f}:1" in str(e.value) and words in str(e.value)


def test_pre_tokenized_ids_are_checked_against_the_tokenizer(tmp_path: Path, tok) -> None:
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"input_ids": [2, 99999], "completion_mask": [0, 1]}) + "\n"
                 + json.dumps({"input_ids": [2, 5], "completion_mask": [0, 0]}) + "\n")  # fmt: skip
    rows = read_chat_jsonl(f)
    with pytest.raises(SFTDataError, match=r"rows.jsonl:1: input_ids: 99999 is outside"):
        encode_conversations(rows[:1], tok)
    with pytest.raises(SFTDataError, match=r"rows.jsonl:2: completion_mask has no 1"):
        encode_conversations(rows[1:], tok)


def test_auc_and_precision_recall_match_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for trial in range(20):
        n = rng.randint(5, 300)
        labels = [rng.random() < 0.3 for _ in range(n)]
        labels[0], labels[1] = True, False
        # coarse scores make ties common, which the rank statistic must average
        scores = [round(rng.random() * (0.5 + 0.5 * y), 1 + trial % 3) for y in labels]
        assert roc_auc(scores, labels) == pytest.approx(sk.roc_auc_score(labels, scores), abs=1e-12)
        pred = [s > 0.5 for s in scores]
        r = binary_report(scores, labels)
        if any(pred):
            assert r["precision"] == pytest.approx(sk.precision_score(labels, pred))
        assert r["recall"] == pytest.approx(sk.recall_score(labels, pred))
    assert roc_auc([0.1, 0.2], [1, 1]) != roc_auc([0.1, 0.2], [1, 1])  # NaN with one class


def test_violent_acts_share_words_but_not_pairs_across_splits() -> None:
    train, held = set(harms.violent_acts(False)), set(harms.violent_acts(True))
    assert not train & held and len(held) > 0.2 * (len(train) + len(held))
    for words in (harms.VIOLENT_VERBS, harms.VICTIMS, harms.PLACE_VERBS, harms.PLACES):
        for w in words:  # every verb and object is in both splits
            assert any(w in a for a in train), w
            assert any(w in a for a in held), w
    held_rows = [
        r for r in harms.examples(1500, 1) if r["kind"] == "violation" and r["harm"] == "dangerous_content"
    ]
    train_text = " ".join(r["prompt"] for r in harms.examples(3000, 0))
    pairs = [a.format(name="") for a in held if "{name}" not in a]
    assert sum(a in r["prompt"] for r in held_rows for a in pairs) > 20  # held-out rows do use held-out pairs
    assert not [a for a in pairs if a in train_text]  # and no training row does
    # a verb with an everyday object is a hard negative, never a violation
    verbs = {a.split(" ")[0] for a in harms.EVERYDAY_ACTS}
    assert verbs & set(harms.VIOLENT_VERBS) >= {"kill", "shoot", "beat", "attack", "burn", "hit", "drown"}
