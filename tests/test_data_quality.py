"""Quality heuristics: real prose is kept; each rule drops the document built to break it, with its reason."""

from __future__ import annotations

import pytest

from gemmakit.data.quality import QualityConfig, quality

PROSE = (
    "The history of the town goes back to the twelfth century, when a small group of farmers settled "
    "on the banks of the river. They built a mill and a church, and over the next two hundred years "
    "the settlement grew into a market town with a charter of its own.\n\n"
    "In the nineteenth century the arrival of the railway changed everything. Factories were built "
    "along the line, and workers came from the surrounding villages to find employment. The population "
    "tripled within fifty years, and new streets of terraced houses spread across the fields.\n\n"
    "Today the town is known for its annual fair and for the museum that tells the story of its past."
)


def test_prose_is_kept() -> None:
    assert quality(PROSE) == (True, "")


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Too short to keep.", "gopher_min_words"),
        (" ".join(["a"] * 60) + " the of", "gopher_mean_word_length"),
        (
            " ".join(["https://example.com/very/long/path/segment/number"] * 60) + " the and",
            "gopher_mean_word_length",
        ),
        (PROSE + " #tag" * 30, "gopher_symbol_ratio"),
        (
            "\n".join(f"- item number {i} of the list and more words here" for i in range(20)),
            "gopher_bullet_lines",
        ),
        (
            "\n".join(
                f"and then the long story of line {i} goes on and on with the rest of the words..."
                for i in range(20)
            ),
            "gopher_ellipsis_lines",
        ),
        (" ".join(str(i) for i in range(1000, 1200)) + " the and of with", "gopher_alpha_words"),
        (" ".join(["lorem", "dolor", "amet", "consectetur", "adipiscing"] * 20), "gopher_stop_words"),
        ("\n".join(["the same line of text with the and of words"] * 10 + [PROSE]), "gopher_dup_lines"),
        (PROSE + "\n\nbuy now and save with the best deals of the year " * 8, "gopher_dup_lines"),
        (PROSE + "\n\nLorem ipsum dolor sit amet.", "c4_boilerplate"),
    ],
)
def test_each_rule_drops_what_it_targets(text: str, reason: str) -> None:
    assert quality(text) == (False, reason)


def test_repeated_ngrams_and_config() -> None:
    repetitive = " ".join(["the cat sat on the mat and looked at the dog"] * 12)
    keep, reason = quality(repetitive)
    assert not keep and reason.startswith(("gopher_top_", "gopher_dup_")), reason
    relaxed = QualityConfig(min_words=1, min_stop_words=1, max_top_ngram=(1.0, 1.0, 1.0))
    assert quality("Too short to keep.", relaxed) == (True, "")
    strict = QualityConfig(min_terminal_punct_lines=0.99)
    assert quality(PROSE + "\n\nA heading without a stop", strict) == (False, "c4_terminal_punctuation")


def test_duplicated_ngram_share_never_grows_with_n() -> None:
    """The property `quality` relies on to skip longer n-grams: a repeated (n+1)-gram's words are covered
    by repeated n-grams, so the duplicated-character share is non-increasing in n."""
    import random

    from gemmakit.data.quality import STOP_WORDS, _dup_ngram_share

    rng = random.Random(0)
    vocab = sorted(
        set(STOP_WORDS) | {"a", "in", "is", "was", "he", "for", "it", "as", "his", "on", "at", "by"}
    )
    for _ in range(500):
        n = rng.randint(20, 300)
        words = [rng.choice(vocab[: rng.randint(3, len(vocab))]) for _ in range(n)]
        for _ in range(rng.randint(0, 4)):  # plant repeated spans
            span, i, j = rng.randint(3, 15), rng.randrange(n), rng.randrange(n)
            words[j : j + span] = words[i : i + span]
        shares = [_dup_ngram_share(words, k) for k in range(5, 11)]
        assert all(a >= b for a, b in zip(shares, shares[1:], strict=False)), shares
