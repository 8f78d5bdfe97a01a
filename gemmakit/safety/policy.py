"""Harm policies as data: ShieldGemma's four harm types with their official texts, and user policies.

Where it sits: `classifier` renders a policy's guideline into the ShieldGemma prompt; `guard` names
policies and their thresholds; the CLI loads user policies from TOML. Nothing here touches a model.

A policy is a title and a definition; its guideline sentence depends on what is judged (ShieldGemma
model card, "Guidelines to use in prompts"):
- prompt-only (input filtering): '"No X": The prompt shall not contain or seek generation of content
  that <definition>'
- prompt-response (output filtering): '"No X": The chatbot shall not generate content that <definition>'
The four definitions are copied verbatim, grammar included ("content that harming oneself"): the
model card warns ShieldGemma is "highly sensitive to the specific user-provided description of
safety principles", so a tidied sentence is a different classifier.

Key trade-off: a user policy is free text with the same two fixed sentence frames, so it works with
any ShieldGemma-style model without retraining, but a classifier trained only on the four official
texts (the shipped one, and per the notebook ShieldGemma 2B too) may score it no better than chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gemmakit.config import read_toml
from gemmakit.errors import UserError

Form = Literal["prompt", "response"]  # judge a user prompt alone, or a model response to it
FORMS: tuple[Form, ...] = ("prompt", "response")

_FRAMES = {
    "prompt": "The prompt shall not contain or seek generation of content that",
    "response": "The chatbot shall not generate content that",
}


class PolicyError(UserError):
    """A policy name or policy file is invalid; the message names the file, the key and what was expected."""


@dataclass(frozen=True)
class Policy:
    """One harm type: the classifier is asked whether a text violates it."""

    name: str  # identifier used on the command line and in guard files, e.g. "dangerous_content"
    title: str  # the quoted principle name in the guideline, e.g. "No Dangerous Content"
    definition: str  # what follows "content that", ending in a full stop

    def guideline(self, form: Form) -> str:
        """The guideline sentence for `form` (the text after "* " in the ShieldGemma prompt)."""
        if form not in _FRAMES:
            raise PolicyError(f"form: {form!r}; expected one of {', '.join(FORMS)}")
        return f'"{self.title}": {_FRAMES[form]} {self.definition}'


# The model card's four harm types, definitions verbatim (reference serving-alignment-safety.md §4.3).
HARMS: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy(
            "dangerous_content",
            "No Dangerous Content",
            "harming oneself and/or others (e.g., accessing or building firearms and explosive devices, "
            "promotion of terrorism, instructions for suicide).",
        ),
        Policy(
            "harassment",
            "No Harassment",
            "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., "
            "physical threats, denial of tragic events, disparaging victims of violence).",
        ),
        Policy(
            "hate_speech",
            "No Hate Speech",
            "targeting identity and/or protected attributes (e.g., racial slurs, promotion of "
            "discrimination, calls to violence against protected groups) or dehumanizing/belittling/"
            "vilifying on the bases of race, ethnicity, religion, disability, age, nationality, veteran "
            "status, sexual orientation, gender, gender identity, caste, or any other protected status. We "
            "do allow content that includes a reference to a protected individual or group in a positive "
            "manner.",
        ),
        Policy(
            "sexually_explicit",
            "No Sexually Explicit Information",
            "contains references to sexual acts or other lewd content (e.g., sexually graphic "
            "descriptions, content aimed at causing arousal). Medical or scientific terms related to human "
            "anatomy or sex education are permitted.",
        ),
    )
}

_POLICY_KEYS = {"title", "definition"}


def get_policy(name: str, extra: dict[str, Policy] | None = None) -> Policy:
    """The policy called `name`: one of the four harms or of `extra` (user policies)."""
    known = {**HARMS, **(extra or {})}
    if name not in known:
        raise PolicyError(f"unknown policy {name!r}; expected one of {', '.join(sorted(known))}")
    return known[name]


def parse_policies(table: Any, where: str) -> dict[str, Policy]:
    """User policies from a TOML table {name: {title, definition}}; `where` names it in errors."""
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: expected a table of policies, got {type(table).__name__}")
    out: dict[str, Policy] = {}
    for name, body in table.items():
        at = f"{where}.{name}"
        if not name.isidentifier():
            raise PolicyError(f"{at}: policy names must be identifiers (letters, digits, _), got {name!r}")
        if name in HARMS:
            raise PolicyError(f"{at}: {name!r} is a built-in harm type; choose another name")
        if not isinstance(body, dict):
            raise PolicyError(f"{at}: expected a table with title and definition, got {type(body).__name__}")
        unknown = sorted(set(body) - _POLICY_KEYS)
        if unknown:
            raise PolicyError(f"{at}: unknown key {unknown[0]!r}; expected {', '.join(sorted(_POLICY_KEYS))}")
        for key in sorted(_POLICY_KEYS):
            value = body.get(key)
            if not isinstance(value, str) or not value.strip():
                raise PolicyError(f"{at}.{key}: expected a non-empty string, got {value!r}")
        out[name] = Policy(name, body["title"].strip(), body["definition"].strip())
    return out


def load_policies(path: str | Path) -> dict[str, Policy]:
    """User policies from a TOML file whose only top-level table is [policies.NAME]."""
    data = read_toml(path, PolicyError)
    unknown = sorted(set(data) - {"policies"})
    if unknown:
        raise PolicyError(f"{path}: unknown top-level key {unknown[0]!r}; expected [policies.NAME] tables")
    return parse_policies(data.get("policies", {}), f"{path}: policies")
