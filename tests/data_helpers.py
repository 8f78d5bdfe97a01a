"""Corpora and recipes for the data-pipeline tests: generated web-like documents with known labels
(gemmakit.data.webgen) written as plain, gzip and zstd JSONL, plus an evaluation set planted in some."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

from gemmakit.data.webgen import EVAL_ITEMS, web_docs

EVAL_QUESTIONS = EVAL_ITEMS[:2]  # the demo corpus's eval set, two of its questions


def write_corpus(root: Path, n_web: int = 1500, n_books: int = 300, seed: int = 0) -> dict[str, dict]:
    """corpus/web-0.jsonl (plain), corpus/web-1.jsonl.zst, corpus/books.jsonl.gz and evals/quiz.jsonl;
    returns {id: record} (with "kind" and "of") for every document. Every 97th web document quotes an
    eval question."""
    import zstandard

    corpus, evals = root / "corpus", root / "evals"
    corpus.mkdir(parents=True, exist_ok=True)
    evals.mkdir(parents=True, exist_ok=True)
    with open(evals / "quiz.jsonl", "w", encoding="utf-8") as f:
        for q in EVAL_QUESTIONS:
            f.write(json.dumps({"question": q, "choices": ["a", "b"], "answer": 0}) + "\n")
    kinds: dict[str, dict] = {}
    web = list(web_docs(n_web, seed))
    rng = random.Random(seed)
    for i, d in enumerate(web):
        if i % 97 == 50 and d["kind"] == "prose":
            d["text"] += "\n\n" + rng.choice(EVAL_QUESTIONS).upper() + "?"
            d["kind"] = "contaminated"
        kinds[d["id"]] = d
    half = len(web) // 2
    lines = [json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in web]
    (corpus / "web-0.jsonl").write_text("".join(lines[:half]), encoding="utf-8")
    (corpus / "web-1.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress("".join(lines[half:]).encode())
    )
    books = list(web_docs(n_books, seed + 1, kinds={"prose": 0.9, "near_dup": 0.1}))
    with gzip.open(corpus / "books.jsonl.gz", "wt", encoding="utf-8") as f:
        for d in books:
            d["id"], d["of"] = "book-" + d["id"], "book-" + d["of"] if d["of"] else ""
            kinds[d["id"]] = d
            f.write(json.dumps({"id": d["id"], "text": d["text"], "title": f"Book {d['id']}"}) + "\n")
    return kinds


RECIPE = """
[pipeline]
shards = {shards}
workers = {workers}

[[source]]
name = "web"
paths = ["corpus/web-*"]

[[source]]
name = "books"
paths = ["corpus/books.jsonl.gz"]

[[stage]]
kind = "language"

[[stage]]
kind = "quality"

[[stage]]
kind = "pii"

[[stage]]
kind = "dedup"
method = "minhash"
threshold = 0.8

[[stage]]
kind = "decontam"
evals = ["evals/*.jsonl"]

[output]
tokenizer = "nano"

[mixture]
tokens = 40000
seed = 3

[[mixture.phase]]
fraction = 0.75
weights = {{ web = 0.8, books = 0.2 }}

[[mixture.phase]]
fraction = 0.25
weights = {{ web = 0.2, books = 0.8 }}
"""


def write_recipe(root: Path, shards: int = 3, workers: int = 1, text: str = RECIPE) -> Path:
    path = root / "recipe.toml"
    path.write_text(text.format(shards=shards, workers=workers), encoding="utf-8")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (the run's whole visible output)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def kept_ids(out: Path) -> list[str]:
    ids = []
    for part in sorted((out / "kept").glob("part-*.jsonl")):
        ids += [json.loads(line)["id"] for line in part.read_text(encoding="utf-8").splitlines()]
    return ids
