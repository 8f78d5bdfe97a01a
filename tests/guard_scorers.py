"""Classifier functions for the guard tests, named in guard files as "guard_scorers:NAME" (the guard's
`module:function` classifier form; tests put this directory on PYTHONPATH). They stand in for the
classifier only: the guard, the thing under test, runs for real around them."""

from __future__ import annotations


def crash(items, policies):
    raise RuntimeError("classifier backend returned HTTP 500")


def garbage(items, policies):
    return [{p.name: "Yes" for p in policies} for _ in items]


def word_bad(items, policies):
    """P(violation) 0.99 for every policy when the judged text (response, else prompt) says BAD."""
    out = []
    for it in items:
        text = it.response if it.response is not None else it.prompt
        out.append({p.name: 0.99 if "BAD" in text else 0.01 for p in policies})
    return out


def word_paris(items, policies):
    """P(violation) 0.99 when a model's RESPONSE mentions Paris (prompts always pass): an output check."""
    return [{p.name: 0.99 if it.response is not None and "Paris" in it.response else 0.01 for p in policies}
            for it in items]  # fmt: skip
