"""A verifiable reward for the RL tests (`rl.reward_fn = "align_rewards:reverse_words"`)."""

from __future__ import annotations


def reverse_words(prompts: list, completions: list[str], answer: list | None = None, **columns: list) -> list:
    """Fraction of the answer's words the completion has at the right positions; None without an answer."""
    out: list[float | None] = []
    for text, want in zip(completions, answer or [None] * len(completions), strict=True):
        if want is None:
            out.append(None)
            continue
        got, ref = text.split(), want.split()
        hits = sum(a == b for a, b in zip(got, ref, strict=False))
        out.append(hits / max(len(ref), len(got), 1))
    return out


def short(prompts: list, completions: list[str], **columns: list) -> list:
    """1 for an empty answer down to 0 at 8 words: a dense reward whose optimum (stop at once) a tiny
    policy can find in a few RL steps, so a test can see the reward rise and the length fall."""
    return [1.0 - min(len(text.split()), 8) / 8 for text in completions]
