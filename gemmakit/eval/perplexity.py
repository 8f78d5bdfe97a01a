"""Perplexity and bits per byte of a model on any text set (lm-eval's wikitext metrics, on your files).

Where it sits: `gemmakit eval --tasks ppl:PATH` and `eval.runner` call `perplexity(lm, texts)`; texts
come from `read_texts` (JSONL, gzip/zstd JSONL, Parquet or a directory of .txt files, through the data
pipeline's readers). Each document is scored whole with `LM.loglikelihood_rolling` (windows of the
model's context, every token predicted once, the first from BOS), and the totals give:
- token_perplexity = exp(-sum(ll) / sum(tokens)): depends on the tokenizer, comparable within a family;
- word_perplexity = exp(-sum(ll) / sum(words)), words = whitespace-separated pieces (lm-eval's rule);
- byte_perplexity = exp(-sum(ll) / sum(UTF-8 bytes)) and bits_per_byte = -sum(ll) / sum(bytes) / ln 2:
  tokenizer-independent, so models with different vocabularies compare.

Key trade-off: corpus-level ratios of sums (as lm-eval's weighted_perplexity), not means of per-document
perplexities, so long documents weigh by their length; a per-document spread is not reported.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemmakit.eval.lm import LM, RollingRequest


def read_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a text set (any source format the data pipeline reads), first `limit` only."""
    from gemmakit.data.sources import read_source

    texts = []
    for doc in read_source(path, text_field=text_field):
        if doc.text.strip():
            texts.append(doc.text)
        if limit is not None and len(texts) >= limit:
            break
    return texts


def perplexity(lm: LM, texts: Sequence[str]) -> dict[str, Any]:
    """Corpus perplexities (token, word, byte) and bits per byte of `texts` under `lm`."""
    lls = lm.loglikelihood_rolling([RollingRequest(t) for t in texts])
    ll = float(sum(lls))
    tokens = sum(lm.token_count(t) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"docs": len(texts), "tokens": tokens, "words": words, "bytes": n_bytes, "loglikelihood": ll,
            "token_perplexity": math.exp(-ll / tokens), "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / n_bytes), "bits_per_byte": -ll / n_bytes / math.log(2)}  # fmt: skip
