"""Decontamination: planted 13-gram overlaps (other case and punctuation) are hit, 12-gram overlaps are
not; per-eval-set names and reasons; flag action; short texts; agreement with a naive Python-set
reference on random planted spans; file errors naming file:line; globs; config errors."""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest

from gemmakit.config import dataclass_from_table
from gemmakit.data.decontam import DecontamConfig, DecontamError, build_index, decontam_filter
from gemmakit.data.sources import Doc


def _vocab(rng: random.Random, size: int) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))))
    return sorted(words)


RNG = random.Random(99)
VOCAB = _vocab(RNG, 3000)


def _sentence(n: int) -> list[str]:
    return [RNG.choice(VOCAB) for _ in range(n)]


def _shout(words: list[str]) -> str:
    """The words with other case and punctuation, as a web page might quote them."""
    return " ".join(w.upper() + ("," if i % 4 == 3 else "") for i, w in enumerate(words)) + "?!"


def _write(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture()
def evals(tmp_path: Path) -> dict:
    mmlu = [{"question": " ".join(_sentence(25)), "choices": [" ".join(_sentence(9)), "yes", "no", "maybe"],
             "answer": "A"} for _ in range(30)]  # fmt: skip
    gsm = [{"question": " ".join(_sentence(40)), "answer": " ".join(_sentence(20))} for _ in range(30)]
    _write(tmp_path / "mmlu.jsonl", mmlu)
    _write(tmp_path / "gsm8k.jsonl", gsm)
    return {"dir": tmp_path, "mmlu": mmlu, "gsm8k": gsm,
            "cfg": DecontamConfig(evals=(str(tmp_path / "mmlu.jsonl"), str(tmp_path / "gsm8k.jsonl")))}  # fmt: skip


def _filler(n: int) -> str:
    return " ".join(_sentence(n))


def test_planted_13_gram_hit_12_gram_not(evals: dict) -> None:
    index = build_index(evals["cfg"])
    assert index.names == ("gsm8k", "mmlu")
    q = evals["mmlu"][3]["question"].split()
    hit = f"{_filler(50)} {_shout(q[5:18])} {_filler(50)}"
    miss = f"{_filler(50)} {_shout(q[5:17])} {_filler(50)}"
    assert index.hits(hit) == ["mmlu"]
    assert index.hits(miss) == []
    both = f"{_shout(q[:13])} {_filler(5)} {evals['gsm8k'][0]['answer']}"
    assert index.hits(both) == ["gsm8k", "mmlu"]
    assert index.hits("") == [] and index.hits(_filler(300)) == []


def test_filter_drop_and_flag(evals: dict) -> None:
    q = evals["gsm8k"][7]["question"].split()
    both = Doc("d1", f"{_shout(q[10:30])} and {_shout(evals['mmlu'][0]['question'].split())}", {"src": 1})
    clean = Doc("d2", _filler(100), {"src": 2})
    drop = decontam_filter(evals["cfg"])
    assert drop(both) == (None, "decontam_gsm8k")  # the first eval set in sorted order
    assert drop(clean) == (clean, "")
    flag = decontam_filter(DecontamConfig(evals=evals["cfg"].evals, action="flag"))
    flagged, reason = flag(both)
    assert reason == "decontam_flag_gsm8k"
    assert flagged.meta == {"src": 1, "contamination": ["gsm8k", "mmlu"]} and flagged.text == both.text
    assert both.meta == {"src": 1}  # the input is never mutated
    assert flag(clean) == (clean, "")


def test_short_texts_and_fields(evals: dict) -> None:
    choice = evals["mmlu"][2]["choices"][0].split()  # 9 words: shorter than n = 13, indexed whole
    index = build_index(evals["cfg"])
    assert index.hits(f"{_filler(20)} {_shout(choice)} {_filler(20)}") == ["mmlu"]
    assert index.hits(f"{_filler(20)} {_shout(choice[:8])} {_filler(20)}") == []  # part of a whole text
    assert index.hits("the answer is maybe yes or no") == []  # 1-word choices: below min_words, skipped
    only_q = build_index(DecontamConfig(evals=evals["cfg"].evals, fields=("question",)))
    assert only_q.hits(f"{_filler(20)} {_shout(choice)} {_filler(20)}") == []
    strict = build_index(DecontamConfig(evals=evals["cfg"].evals, min_words=13))
    assert strict.hits(_shout(choice)) == []


def _reference_words(text: str) -> list[str]:
    """Independent normaliser: NFKC, lowercase, apostrophes deleted, every non-alphanumeric separates."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join("" if c in "'\u2019\u02bc" else c if c.isalnum() else " " for c in text).split()


def test_agrees_with_naive_set_reference(evals: dict) -> None:
    """Random spans of 9..16 words from random records, pasted into filler: the index's hits equal
    those of Python sets of 13-gram tuples (plus whole texts of 8..12 words) built independently."""
    cfg = evals["cfg"]
    grams: dict[str, set[tuple[str, ...]]] = {"gsm8k": set(), "mmlu": set()}
    for name in grams:
        for record in evals[name]:
            for v in record.values():
                for text in v if isinstance(v, list) else [v]:
                    w = _reference_words(text)
                    if len(w) >= 13:
                        grams[name] |= {tuple(w[i : i + 13]) for i in range(len(w) - 12)}
                    elif len(w) >= 8:
                        grams[name].add(tuple(w))
    index, rng = build_index(cfg), random.Random(5)
    n_hit = 0
    for _ in range(200):
        parts = [_filler(rng.randint(0, 30))]
        for _ in range(rng.randint(0, 2)):
            name = rng.choice(["gsm8k", "mmlu"])
            record = rng.choice(evals[name])
            words = rng.choice(
                [record["question"], record.get("answer", ""), *record.get("choices", [])]
            ).split()
            start = rng.randrange(max(1, len(words) - 8))
            parts += [_shout(words[start : start + rng.randint(9, 16)]), _filler(rng.randint(0, 5))]
        text = " ".join(parts)
        w = _reference_words(text)
        spans = {tuple(w[i : i + n]) for n in range(8, 14) for i in range(len(w) - n + 1)}
        want = sorted(name for name, g in grams.items() if g & spans)
        assert index.hits(text) == want, text
        n_hit += bool(want)
    assert 40 < n_hit < 200  # both outcomes exercised


def test_globs_names_and_gzip(tmp_path: Path) -> None:
    words = _sentence(20)
    (tmp_path / "sets").mkdir()
    _write(tmp_path / "sets" / "arc-challenge.test.jsonl", [{"q": " ".join(words)}])
    with gzip.open(tmp_path / "sets" / "hella.swag.jsonl.gz", "wt", encoding="utf-8") as f:  # gzip by magic
        f.write(json.dumps({"ctx": {"text": " ".join(words[::-1])}}) + "\n")
    cfg = DecontamConfig(evals=(str(tmp_path / "sets" / "*.jsonl*"), str(tmp_path / "sets" / "arc-*")))
    index = build_index(cfg)
    assert index.names == ("arc_challenge_test", "hella_swag")
    assert index.hits(" ".join(words)) == ["arc_challenge_test"]
    assert index.hits(" ".join(words[::-1])) == ["hella_swag"]  # strings nested in objects are indexed
    drop = decontam_filter(cfg)
    assert drop(Doc("x", " ".join(words[2:17])))[1] == "decontam_arc_challenge_test"


def test_file_errors_name_file_and_line(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jsonl", [{"question": _filler(20)}])
    with pytest.raises(DecontamError, match=r"<recipe>: decontam\.evals: .*missing\.jsonl: no such file"):
        build_index(DecontamConfig(evals=(str(tmp_path / "missing.jsonl"),)))
    with pytest.raises(
        DecontamError, match=r"r\.toml: decontam\.evals: pattern .*nothing-\*\.jsonl.* matched no files"
    ):
        build_index(DecontamConfig(evals=(str(tmp_path / "nothing-*.jsonl"),)), source="r.toml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a b c"}\n\n{"question": "unterminated\n', encoding="utf-8")
    with pytest.raises(DecontamError, match=rf"^{re.escape(str(bad))}:3: invalid JSON"):
        build_index(DecontamConfig(evals=(str(good), str(bad))))
    bad.write_text('{"question": "a"}\n["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(DecontamError, match=rf"^{re.escape(str(bad))}:2: expected a JSON object, got list"):
        build_index(DecontamConfig(evals=(str(bad),)))
    bad.write_bytes(b'{"question": "a"}\n{"question": "\xff"}\n')
    with pytest.raises(DecontamError, match=rf"^{re.escape(str(bad))}:2: invalid UTF-8"):
        build_index(DecontamConfig(evals=(str(bad),)))
    with pytest.raises(
        DecontamError, match=rf"^{re.escape(str(good))}:1: none of the fields qestion holds a string"
    ):
        build_index(DecontamConfig(evals=(str(good),), fields=("qestion",)))
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DecontamError, match=rf"^{re.escape(str(corrupt))}:1: cannot read"):
        build_index(DecontamConfig(evals=(str(corrupt),)))
    bad.write_text('{"question": "a"}\nnull\n', encoding="utf-8")
    with pytest.raises(
        DecontamError, match=rf"^{re.escape(str(bad))}:2: expected a JSON object, got NoneType"
    ):
        build_index(DecontamConfig(evals=(str(bad),)))
    (tmp_path / "sub").mkdir()
    twin = _write(tmp_path / "sub" / "good.jsonl", [{"question": _filler(20)}])
    with pytest.raises(DecontamError, match=r"both give the eval set name 'good'"):
        build_index(DecontamConfig(evals=(str(good), str(twin))))
    with pytest.raises(DecontamError, match=r"decontam\.evals is empty"):
        build_index(DecontamConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [({"action": "erase"}, r"decontam\.action: expected one of drop, flag"), ({"n": 0}, r"decontam\.n: expected"),
     ({"min_words": 14}, r"decontam\.min_words: expected an integer in \[1, n=13\]"),
     ({"evals": ["a.jsonl"]}, r"decontam\.evals: expected a tuple"), ({"fields": ("",)}, r"decontam\.fields")],
)  # fmt: skip
def test_config_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(DecontamError, match=message):
        DecontamConfig(**kwargs)


def test_config_from_toml_table() -> None:
    table = {"evals": ["evals/*.jsonl"], "fields": ["question", "choices"], "action": "flag", "n": 10}
    cfg = dataclass_from_table(DecontamConfig, table, "r.toml", "decontam", DecontamError)
    assert cfg == DecontamConfig(
        evals=("evals/*.jsonl",), fields=("question", "choices"), action="flag", n=10
    )
    with pytest.raises(DecontamError, match=r"r\.toml: decontam\.n: expected int"):
        dataclass_from_table(DecontamConfig, {"n": "13"}, "r.toml", "decontam", DecontamError)
