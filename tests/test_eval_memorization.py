"""The memorization evaluator (issue 6 point 5) on a tiny model trained to memorize planted documents.

The ground truth is the construction itself: which documents the model was trained on, which suffix
tokens were changed in the shards afterwards (checked against nltk's edit distance where installed), and
what personal data the planted text holds. Wilson intervals are checked against scipy's
`binomtest(...).proportion_ci(method="wilson")`. scipy comes with the test extra, through
alt-profanity-check -> scikit-learn. They are also checked against closed forms from the definition.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from spm_helpers import train_gemma_spm

from gemmakit.config import get_preset
from gemmakit.data.shards import ShardError, Shards, ShardWriter
from gemmakit.eval.memorization import (
    MemConfig,
    MemorizationError,
    MemResult,
    SourceLabels,
    edit_distance,
    edit_distances,
    memorization,
    sources_of_run,
    wilson_interval,
)
from gemmakit.model import Gemma
from gemmakit.tokenizer import Tokenizer

try:  # an independent Levenshtein; not a declared test dependency, so used where installed
    from nltk import edit_distance as nltk_distance
except ImportError:
    nltk_distance = None

VOCAB = 640  # the spm_helpers tokenizer's size
DOC = 100  # planted documents: 50 prompt + 50 suffix tokens
EDITS = (3, 5, 6)  # substitutions in the shards' copy of three trained suffixes; 5 of 50 is the 10% limit
PII_TEXT = " mail ann@data.com card 4111111111111111. "  # one email (personal), one card (sensitive)
FILLER = (
    "the a of and to in is it that was for on with as he she they you we this be at by not are from "
    "or have an but what all were when there can more if no out so up said about which time user model "
    "system hello world Gemma token piece start end turn data text code print def return import class"
)


def _random_doc(rng: np.random.Generator, n: int, bos: int) -> list[int]:
    return [bos, *rng.integers(108, VOCAB, n - 1).tolist()]  # above the reserved ids of the layout


def _pii_doc(tok: Tokenizer) -> list[int]:
    """A 100-token document whose 50-token suffix starts with PII_TEXT (one email, one payment card)."""
    filler = tok.encode(FILLER, bos=False)
    text = tok.encode(PII_TEXT, bos=False)
    assert len(text) <= DOC // 2, len(text)
    return ([tok.bos_id] + filler)[: DOC // 2] + (text + filler)[: DOC // 2]


def _train(docs: list[list[int]]) -> Gemma:
    """Train the "tiny" preset on `docs` (full batch) until it predicts every token after the first.

    The first token after BOS is left out: all documents share that context, so no model can know it
    (it would hold the loss at ln(12) / 99 = 0.025). About 60 AdamW steps, a few seconds on 2 cores.
    """
    torch.manual_seed(0)
    model = Gemma(get_preset("tiny").replace(vocab_size=VOCAB)).init_weights(std=0.02, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batch = torch.tensor(docs)
    for _ in range(300):
        logits = model(batch[:, :-1])[:, 1:]  # predictions of tokens 2..T-1
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 2:].reshape(-1))
        if loss.item() < 0.01 and bool((logits.argmax(-1) == batch[:, 2:]).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01, f"the tiny model did not memorize its documents (loss {loss.item():.3f})"
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained model, the tokenizer and a 4-source shard set; ids of the planted documents."""
    tmp = tmp_path_factory.mktemp("mem")
    tok = Tokenizer.load(train_gemma_spm(tmp, "gemma3", VOCAB))
    rng = np.random.default_rng(0)
    planted = [_random_doc(rng, DOC, tok.bos_id) for _ in range(8)]
    edited_trained = [_random_doc(rng, DOC, tok.bos_id) for _ in EDITS]
    pii = _pii_doc(tok)
    model = _train(planted + edited_trained + [pii])
    edited = []
    for doc, k in zip(edited_trained, EDITS, strict=True):
        copy = list(doc)
        for pos in rng.choice(np.arange(DOC // 2, DOC), size=k, replace=False):
            copy[pos] = 108 + (copy[pos] - 108 + 1 + int(rng.integers(0, 100))) % (VOCAB - 108)  # never equal
        edited.append(copy)
    docs = [("planted", d) for d in planted] + [("edited", d) for d in edited] + [("pii", pii)]
    docs += [("unseen", _random_doc(rng, DOC + int(rng.integers(0, 20)), tok.bos_id)) for _ in range(40)]
    docs += [("unseen", _random_doc(rng, 60, tok.bos_id)) for _ in range(3)]  # too short: 60 < 100
    order = rng.permutation(len(docs))  # interleave the sources across several shards
    with ShardWriter(tmp / "shards", vocab_size=tok.vocab_size, tokenizer_sha256=tok.sha256,
                     bos_id=tok.bos_id, shard_tokens=1500) as w:  # fmt: skip
        for i in order:
            w.add(docs[i][1])
    at = {int(i): j for j, i in enumerate(order)}  # index into docs -> global document index in the shards
    return {"tok": tok, "model": model, "dir": tmp / "shards", "labels": [docs[i][0] for i in order],
            "lengths": [len(docs[i][1]) for i in order], "planted": sorted(at[i] for i in range(8)),
            "edited": [(trained, docs[8 + k][1], at[8 + k]) for k, trained in enumerate(edited_trained)],
            "pii": at[8 + len(EDITS)]}  # fmt: skip


def test_planted_documents_are_found_and_unseen_ones_are_not(world: dict) -> None:
    res = memorization(world["model"], world["dir"], sources=world["labels"], tokenizer=world["tok"],
                       per_source=100, batch_size=16)  # fmt: skip
    by = {s.name: s for s in res.sources}
    assert list(by) == ["edited", "pii", "planted", "unseen"]
    planted, unseen, edited = by["planted"], by["unseen"], by["edited"]
    assert (planted.exact.k, planted.exact.n, planted.exact.rate, planted.approximate.k) == (8, 8, 1.0, 8)
    assert (unseen.n_docs, unseen.too_short, unseen.exact.n) == (43, 3, 40)
    assert unseen.exact.k == 0 and unseen.approximate.k == 0 and unseen.approx_to_exact is None
    assert by["pii"].exact.k == 1
    # The shards' suffixes differ from the trained ones by 3, 5 and 6 substitutions (and, with random
    # tokens, by that edit distance: nltk checks it where installed), so the first two are approximately
    # but not exactly memorized and the third is neither.
    mem = {m.doc: (m.source, m.distance) for m in res.memorized}
    for (trained, shard_copy, d), k in zip(world["edited"], EDITS, strict=True):
        assert sum(x != y for x, y in zip(trained, shard_copy, strict=True)) == k
        if nltk_distance is not None:
            assert nltk_distance(trained[DOC // 2 :], shard_copy[DOC // 2 :]) == k
        assert mem.get(d) == (("edited", k) if k <= 5 else None)
    assert (edited.exact.k, edited.approximate.k) == (0, 2)
    assert {d for d, (s, dist) in mem.items() if s == "planted" and dist == 0} == set(world["planted"])
    assert mem[world["pii"]] == ("pii", 0) and len(mem) == 8 + 2 + 1
    overall = res.overall
    assert (overall.n_docs, overall.too_short, overall.exact.n) == (55, 3, 52)
    assert (overall.exact.k, overall.approximate.k) == (9, 11) and overall.approx_to_exact == 11 / 9
    # the planted suffix holds one email (personal) and one payment card (sensitive)
    assert res.pii is not None and res.pii.scanned == 11
    assert res.pii.outputs == {"personal": 1, "sensitive": 1} == res.pii.findings
    assert res.pii.by_kind == {"card": 1, "email": 1} and res.notes == ()
    out = json.loads(json.dumps(res.as_dict()))
    assert out["protocol"]["max_edits"] == 5 and out["protocol"]["approximate_includes_exact"] is True
    assert out["sources"]["planted"]["exact"]["rate"] == 1.0 and "ann@" not in json.dumps(out)
    md = res.to_markdown()
    assert "| planted | 8 | 0 | 8 | 100.00% [" in md and "| **overall** | 55 | 3 | 52 |" in md


def test_sampling_is_seeded_stratified_and_skips_short_documents(world: dict) -> None:
    def run(seed: int) -> MemResult:
        return memorization(world["model"], world["dir"], sources=world["labels"], per_source=5, seed=seed,
                            batch_size=8)  # fmt: skip

    a, b, c = run(0), run(0), run(1)
    assert a.as_dict() == b.as_dict() and a.sampled == b.sampled
    assert a.sampled != c.sampled
    assert [s.exact.n for s in a.sources] == [3, 1, 5, 5]  # edited, pii, planted, unseen: min(5, eligible)
    labels = np.array(world["labels"])
    for s, lo in zip(a.sources, np.cumsum([0] + [s.exact.n for s in a.sources]), strict=False):
        picked = list(a.sampled[lo : lo + s.exact.n])
        assert picked == sorted(picked) and set(labels[picked]) == {s.name}
        assert all(world["lengths"][d] >= DOC for d in picked)
    assert a.pii is None and "not scanned for personal data" in a.notes[0]


def test_wilson_interval_matches_scipy_and_its_definition() -> None:
    from scipy.stats import binomtest

    for k, n in [(0, 1), (0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (999, 1000), (0, 10000), (7, 52)]:
        for conf in (0.9, 0.95, 0.99):
            ref = binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
            low, high = wilson_interval(k, n, conf)
            assert low == pytest.approx(ref.low, abs=1e-12) and high == pytest.approx(ref.high, abs=1e-12)
    z = 1.959963984540054  # the standard normal's 97.5% quantile
    for n in (1, 10, 52, 10_000):  # from the definition: at k = 0 the interval is [0, z²/(n + z²)]
        assert wilson_interval(0, n) == (0.0, pytest.approx(z * z / (n + z * z), rel=1e-12))
        assert wilson_interval(n, n) == (pytest.approx(n / (n + z * z), rel=1e-12), 1.0)
    # k = n/2: centred on 1/2, half-width z / (2 sqrt(n + z²))
    low, high = wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5, abs=1e-15)
    assert high - low == pytest.approx(z / math.sqrt(100 + z * z), rel=1e-12)
    for bad in [(1, 0), (-1, 10), (11, 10)]:
        with pytest.raises(MemorizationError):
            wilson_interval(*bad)


def test_edit_distance_textbook_values_and_reference() -> None:
    def ids(s: str) -> list[int]:
        return [ord(c) for c in s]

    cases = {("kitten", "sitting"): 3, ("flaw", "lawn"): 2, ("saturday", "sunday"): 3, ("", "abc"): 3,
             ("abc", ""): 3, ("", ""): 0, ("gumbo", "gambol"): 2, ("intention", "execution"): 5}  # fmt: skip
    for (a, b), want in cases.items():
        assert edit_distance(ids(a), ids(b)) == want == edit_distance(ids(b), ids(a))
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 4, (64, 12)), rng.integers(0, 4, (64, 9))  # small alphabet: many matches
    batch = edit_distances(a, b)
    assert batch.tolist() == [edit_distance(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    if nltk_distance is not None:
        assert batch.tolist() == [nltk_distance(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]


def test_threshold_convention() -> None:
    assert MemConfig().max_edits == 5  # 10% of 50: distance 5 is still approximate (see the planted test)
    assert MemConfig(suffix=100, edit_fraction=0.29).max_edits == 29  # 0.29 * 100 = 28.999999999999996
    assert MemConfig(edit_fraction=0.0).max_edits == 0  # approximate = exact


def test_bad_input_is_one_line_errors(world: dict, tmp_path: Path) -> None:
    model, d = world["model"], world["dir"]
    cases = [
        (dict(prefix=0), "prefix: expected an integer >= 1, got 0"),
        (dict(edit_fraction=1.5), "edit_fraction: expected a number in [0, 1], got 1.5"),
        (dict(batch_size=True), "batch_size: expected an integer >= 1, got True"),
        (dict(sources=["a"] * 3), "sources: 3 labels for the 55 documents"),
        (dict(prefix=200, suffix=100), "prefix 200 + suffix 100 exceeds the model's max_seq_len 256"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(MemorizationError, match=re.escape(msg)) as e:
            memorization(model, d, **kwargs)
        assert "\n" not in str(e.value)
    with ShardWriter(tmp_path / "big", vocab_size=VOCAB + 1, tokenizer_sha256="x", bos_id=2) as w:
        w.add([2] * 120)
    with pytest.raises(MemorizationError, match="vocab_size 641 exceeds the model's 640"):
        memorization(model, tmp_path / "big")
    other = Tokenizer.load(train_gemma_spm(tmp_path, "gemma2", VOCAB))
    with pytest.raises(ShardError, match="tokenizer mismatch"):
        memorization(model, d, tokenizer=other)
    with pytest.raises(ShardError, match="index.json"):
        memorization(model, tmp_path)
    with pytest.raises(MemorizationError, match="meta.sources"):
        sources_of_run(_fake_run(tmp_path, d))


def _fake_run(tmp_path: Path, shards_dir: Path) -> Path:
    """A directory that looks like a run (tokens/) but whose tokens were not written by the pipeline."""
    run = tmp_path / "notrun"
    shutil.copytree(shards_dir, run / "tokens")
    return run


def test_data_pipeline_run_brings_its_sources(world: dict, tmp_path: Path) -> None:
    """A real data-pipeline run: sources_of_run labels each document of tokens/ with the source it came
    from, and memorization on the run directory reports the recipe's sources with the kept counts."""
    from gemmakit.data.pipeline import run
    from gemmakit.data.recipe import load_recipe

    texts = {"alpha": [f"Alpha note {i}: the model was in the data {i * 7}." for i in range(12)],
             "beta": [f"Beta page {i} of the code and the text, number {i * 13}." for i in range(7)]}  # fmt: skip
    for name, rows in texts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    tok_path = train_gemma_spm(tmp_path, "gemma3", VOCAB)
    (tmp_path / "r.toml").write_text(
        '[pipeline]\nshards = 3\nworkers = 1\n[[source]]\nname = "beta"\npaths = ["beta.jsonl"]\n'
        '[[source]]\nname = "alpha"\npaths = ["alpha.jsonl"]\n[[stage]]\nkind = "dedup"\nmethod = "exact"\n'
        f'[output]\ntokenizer = "{tok_path}"\n'
    )
    stats = run(load_recipe(tmp_path / "r.toml"), tmp_path / "out")
    labels = sources_of_run(tmp_path / "out")
    assert labels.names == ("beta", "alpha") and len(labels.codes) == 19
    tokens = Shards.open(tmp_path / "out" / "tokens")
    for j in range(tokens.n_docs):
        assert world["tok"].decode(tokens.doc(j).tolist()) in texts[labels.names[labels.codes[j]]]
    res = memorization(world["model"], tmp_path / "out", prefix=4, suffix=4, tokenizer=world["tok"])
    assert [(s.name, s.n_docs, s.exact.n) for s in res.sources] == [
        (name, stats["by_source"][name]["kept"], len(texts[name])) for name in ("beta", "alpha")
    ]
    other = SourceLabels.from_labels(["b", "a", "b"])
    assert other.names == ("a", "b") and other.codes.tolist() == [1, 0, 1]
