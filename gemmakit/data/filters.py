"""Document filters: one recipe stage -> one pure function Doc -> (Doc | None, reason).

Where it sits: sources -> **filters** -> dedup -> decontamination -> outputs (`data.pipeline`). The
pipeline calls `build_filter(kind, params)` once per stage and per worker, then the filter once per
document. Kinds (`FILTERS`, each with its config dataclass; unknown keys are errors):
- "quality": Gopher / C4 heuristics (`data.quality`); reason = the failing rule, e.g. "gopher_min_words";
- "language": py3langid on the first `max_chars` characters; reason "language";
- "toxicity": lexicon, alt-profanity-check classifier, user scorer hook (`data.safety_filters`);
- "pii": drop on sensitive findings ("pii_<kind>"), redact personal ones ("pii_redacted", `data.pii`);
- "self_identification": model turns claiming to be another assistant (`data.safety_filters`).
Chat documents (`read_jsonl(chat=True)`: turns in `meta["messages"]`) are judged per turn where the
kind cares about speakers (toxicity with turns="model", self_identification, pii rewrites every turn);
quality and language judge `doc.text`. A rewritten document is a new `Doc` with a copied `meta`; the
input is never mutated.

Key trade-off: filters are pure per-document functions with no state shared across documents or
processes, so the pipeline may run them in spawn workers or Ray tasks in any order and a rerun gives
the same verdicts. The price is that every worker holds its own copy of the heavy models (py3langid:
~0.8 s and ~75 MB; alt-profanity-check with scikit-learn: ~1.5 s and ~90 MB), loaded when the filter
is built, so a pipeline builds once per worker, never per document.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from gemmakit.config import dataclass_from_table
from gemmakit.data.pii import SENSITIVE, SEVERITY, PiiConfig, apply_pii_policy
from gemmakit.data.quality import QualityConfig, quality
from gemmakit.data.safety_filters import (
    Filter,
    FilterError,
    SelfIdConfig,
    ToxicityConfig,
    build_self_id,
    build_toxicity,
    chat_turns,
    toxicity_reasons,
)
from gemmakit.data.sources import Doc, chat_text

log = logging.getLogger(__name__)

__all__ = ["FILTERS", "Filter", "FilterError", "LanguageConfig", "build_filter", "reason_codes"]

# Every reason `quality.quality` can return (tests/test_data_filters.py checks this against its source).
QUALITY_REASONS = (
    ("gopher_min_words", "gopher_max_words", "gopher_mean_word_length", "gopher_symbol_ratio",
     "gopher_bullet_lines", "gopher_ellipsis_lines", "gopher_alpha_words", "gopher_stop_words",
     "gopher_dup_lines", "gopher_dup_line_chars", "gopher_dup_paragraphs")
    + tuple(f"gopher_top_{k}gram" for k in (2, 3, 4))
    + tuple(f"gopher_dup_{k}gram" for k in range(5, 11))
    + ("c4_terminal_punctuation", "c4_boilerplate")
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LanguageConfig:
    """Which languages to keep, judged by py3langid's naive Bayes model (140 labels in py3langid 0.4)."""

    languages: tuple[str, ...] = ("en",)  # ISO 639 codes to keep, as py3langid labels them
    # Keep when any kept language has at least this probability. py3langid 0.4 normalises with a
    # temperature of sqrt(bytes), so probabilities are comparable across lengths: the test paragraphs
    # score >= 0.99, fragments of a few words < 0.5 ("The cat sat." 0.12 en, "Merci beaucoup" 0.48 fr).
    # 0.5 (a majority of the mass) drops text too short to tell. Mixed text goes to its majority
    # language (half English, half German scores 0.98 de).
    min_confidence: float = 0.5
    # Characters classified (a prefix). Cost grows with length (~0.1 ms per KB, pure-Python DFA walk)
    # while accuracy saturates after a few hundred characters: 2,000 bounds a 1 MB document at ~0.3 ms.
    max_chars: int = 2000


@functools.cache
def _langid() -> Any:
    """py3langid's identifier with probabilities, loaded once per process and never mutated (`rank` only).

    Loading runs no pickle: py3langid >= 0.4 stores its model as LZMA-compressed .npz and reads it with
    np.load(allow_pickle=False) (py3langid/modelio.py). Versions up to 0.3.0 run pickle.load on
    data/model.plzma (`from_pickled_model`) and lack `from_model_file`; they are refused, not used."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    if not hasattr(LanguageIdentifier, "from_model_file"):
        raise ImportError("py3langid < 0.4 loads its model with pickle")
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def _build_language(cfg: LanguageConfig, where: str) -> Filter:
    try:
        identifier = _langid()
    except ImportError as e:
        raise FilterError(f"{where}: needs py3langid >= 0.4 ({e}); install the data extra "
                          "(pip install 'gemmakit[data]')") from None  # fmt: skip
    unknown = sorted(set(cfg.languages) - set(identifier.labels))
    if not cfg.languages or unknown:
        raise FilterError(f"{where}.languages: unknown code(s) {unknown or '(none given)'}; "
                          f"expected py3langid codes such as {', '.join(identifier.labels[:8])}, ...")  # fmt: skip
    if not 0.0 <= cfg.min_confidence <= 1.0 or cfg.max_chars < 1:
        raise FilterError(f"{where}: min_confidence must be in [0, 1] and max_chars >= 1, got "
                          f"{cfg.min_confidence} and {cfg.max_chars}")  # fmt: skip
    keep = frozenset(cfg.languages)

    def language(doc: Doc) -> tuple[Doc | None, str]:
        for lang, p in identifier.rank(doc.text[: cfg.max_chars]):  # best first
            if p < cfg.min_confidence:
                break
            if lang in keep:
                return doc, ""
        return None, "language"

    return language


def _build_quality(cfg: QualityConfig, where: str) -> Filter:
    def quality_filter(doc: Doc) -> tuple[Doc | None, str]:
        keep, reason = quality(doc.text, cfg)
        return (doc, "") if keep else (None, reason)

    return quality_filter


def _pii_config(cfg: PiiConfig, where: str) -> PiiConfig:
    """`cfg` with `severity` completed from pii.SEVERITY, checked. A TOML table names only the kinds it
    changes; `apply_pii_policy` treats a kind missing from `severity` as sensitive, so without the merge
    `severity = {ip = "sensitive"}` would silently start dropping every document with an email."""
    bad_kinds = sorted(set(cfg.kinds) - set(SEVERITY))
    if bad_kinds:
        raise FilterError(f"{where}.kinds: unknown {bad_kinds}; expected some of {', '.join(SEVERITY)}")
    severity = {**SEVERITY, **cfg.severity}
    for kind, level in severity.items():
        if kind not in SEVERITY or level not in ("sensitive", "personal"):
            raise FilterError(f"{where}.severity.{kind}: {level!r}; expected a kind among {', '.join(SEVERITY)} "
                              "with 'sensitive' or 'personal'")  # fmt: skip
    if "phone" in cfg.kinds:
        try:
            import phonenumbers
        except ImportError:
            raise FilterError(f"{where}.kinds: 'phone' needs phonenumbers; install the data extra "
                              "(pip install 'gemmakit[data]')") from None  # fmt: skip
        if cfg.phone_region not in phonenumbers.SUPPORTED_REGIONS:
            raise FilterError(
                f"{where}.phone_region: {cfg.phone_region!r}; expected an ISO 3166 alpha-2 code such as 'US'"
            )
    return dataclasses.replace(cfg, severity=severity)


def _build_pii(cfg: PiiConfig, where: str) -> Filter:
    cfg = _pii_config(cfg, where)

    def pii(doc: Doc) -> tuple[Doc | None, str]:
        turns = chat_turns(doc)
        if turns is None:
            text, reason, _ = apply_pii_policy(doc.text, cfg)
            if text is None:
                return None, reason
            return (Doc(doc.id, text, dict(doc.meta)), reason) if reason else (doc, "")
        new_turns, changed = [], False
        for turn in turns:  # every speaker: users paste personal data too
            text, reason, _ = apply_pii_policy(turn["content"], cfg)
            if text is None:
                return None, reason
            changed |= bool(reason)
            new_turns.append({**turn, "content": text})
        if not changed:
            return doc, ""
        return Doc(doc.id, chat_text(new_turns), {**doc.meta, "messages": new_turns}), "pii_redacted"

    return pii


FILTERS: dict[str, type] = {
    "quality": QualityConfig,
    "language": LanguageConfig,
    "toxicity": ToxicityConfig,
    "pii": PiiConfig,
    "self_identification": SelfIdConfig,
}
_BUILDERS = {
    "quality": _build_quality,
    "language": _build_language,
    "toxicity": build_toxicity,
    "pii": _build_pii,
    "self_identification": build_self_id,
}


def _config(kind: str, params: dict[str, Any], source: str) -> Any:
    if kind not in FILTERS:
        raise FilterError(f"{source}: unknown filter kind {kind!r}; valid kinds: {', '.join(FILTERS)}")
    return dataclass_from_table(FILTERS[kind], params, source, f"stage.{kind}", FilterError)


def build_filter(kind: str, params: dict[str, Any], source: str = "<recipe>") -> Filter:
    """The filter of one recipe stage (`params`: the stage's keys without "kind"); models load here, once.

    Raises FilterError (one line naming `source`, the key `stage.<kind>.<field>` and what was expected)
    for an unknown kind or key, a wrongly typed value, or a value the filter cannot use."""
    cfg = _config(kind, params, source)
    log.debug("building filter %s from %s", kind, source)
    return _BUILDERS[kind](cfg, f"{source}: stage.{kind}")


def reason_codes(kind: str, params: dict[str, Any], source: str = "<recipe>") -> tuple[str, ...]:
    """Every reason code the filter built from (kind, params) can return (kept-unchanged "" excluded)."""
    cfg = _config(kind, params, source)
    if kind == "quality":
        return QUALITY_REASONS
    if kind == "toxicity":
        return toxicity_reasons(cfg)
    if kind == "pii":
        cfg = _pii_config(cfg, f"{source}: stage.pii")
        redacts = any(cfg.severity[k] != SENSITIVE for k in cfg.kinds)
        return ("pii_redacted",) * redacts + tuple(
            f"pii_{k}" for k in cfg.kinds if cfg.severity[k] == SENSITIVE
        )
    return ("language",) if kind == "language" else ("self_identification",)
