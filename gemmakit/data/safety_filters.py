"""Safety filters of the data pipeline: toxicity and mistaken self-identification, plus what every filter
shares (`FilterError`, the `Filter` type, the turns of a chat document).

Where it sits: sources -> filters (`data.filters.build_filter`, the public entry, which re-exports
`FilterError` and `Filter` from here) -> dedup -> decontamination -> outputs. The Gemma report filters
SFT data for "unsafe or toxic model outputs" and "mistaken self-identification data"; these are those
two filters. Both also work on plain text (pretraining), judging the whole text.

Toxicity, three independent checks, the first that fires names the reason:
- lexicon ("toxicity_lexicon"): configured words/phrases, case-insensitive, whole words only;
- classifier ("toxicity_classifier"): alt-profanity-check, a linear SVM over a bag of words trained on
  short comments (tweets, Wikipedia talk). Its bag-of-words vector of a long text dilutes one abusive
  sentence among the benign words around it, so the classifier judges every sentence and line alone
  (cut to <= `chunk_chars`) and the document is dropped if ANY piece scores over `threshold`;
- scorer ("toxicity_scorer"): a user function "package.module:function" (text -> float in [0, 1]), the
  hook for model-based classifiers; it sees each judged text whole (one turn, or the document).

Key trade-off: a bag-of-words model and regular expressions are deterministic and cheap (classifier:
~0.5 ms per document plus ~40 us per sentence, with `_fast_predict`) but blind to context: anatomy words score as
profanity, threats without swear words pass, and third-person mentions can look like first-person
claims. Per-sentence "any" judging keeps recall on long documents at the price of more false positives
on them (every sentence is another chance to misfire); precision and recall on a generated labelled
set are measured in tests/test_data_filters.py.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gemmakit.data.sources import MODEL_ROLES, Doc
from gemmakit.errors import UserError

log = logging.getLogger(__name__)


class FilterError(UserError):
    """A filter's configuration is wrong: one line naming the recipe key (stage.<kind>.<field>) and what
    was expected. Public home: `gemmakit.data.filters` (defined here so this lower module can raise it)."""


# (doc, "") kept; (new_doc, "<code>") kept but rewritten; (None, "<code>") dropped. Codes are fixed
# snake_case strings per filter (the pipeline counts by them), never free values such as the text.
Filter = Callable[[Doc], tuple[Doc | None, str]]


def chat_turns(doc: Doc) -> list[dict] | None:
    """The conversation of a chat document (`meta["messages"]`, set by `read_jsonl(chat=True)`), else None."""
    turns = doc.meta.get("messages")
    if (
        isinstance(turns, list)
        and turns
        and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns)
    ):
        return turns
    return None


def judged_texts(doc: Doc, model_only: bool) -> list[str]:
    """The texts a filter judges: each turn's content (only model turns if `model_only`), or the text."""
    turns = chat_turns(doc)
    if turns is None:
        return [doc.text]
    return [t["content"] for t in turns if not model_only or t.get("role") in MODEL_ROLES]


def _phrase_regex(terms: tuple[str, ...], end: str = r"(?!\w)") -> str:
    """An alternation of literal terms, longest first (so "GPT-4o" wins over "GPT-4"), spaces as \\s+."""
    uniq = sorted({t.strip() for t in terms if t.strip()}, key=lambda t: (-len(t), t.lower()))
    return "(?:" + "|".join(r"\s+".join(map(re.escape, t.split())) for t in uniq) + ")" + end


# ---- toxicity ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToxicityConfig:
    """The toxicity filter; every check can be switched off independently."""

    # "profanity-check" (alt-profanity-check's linear SVM, shipped in the package) or "" to disable.
    classifier: str = "profanity-check"
    # Drop when a chunk's probability is over this. 0.7, measured on the generated set of the tests:
    # per sentence P 0.945 / R 0.825 (0.5: 0.885 / 0.921; 0.9: 0.969 / 0.746; 0.8 is no more precise
    # than 0.7); per document P 0.99 / R 0.81. Misses are threats without swear words ("I will find
    # you and hurt you": 0.43); false positives are anatomy words ("penis": 0.84) and "Dick Van Dyke".
    threshold: float = 0.7
    lexicon: tuple[str, ...] = ()  # extra words/phrases, case-insensitive, on word boundaries
    lexicon_file: str = ""  # one term per line, "#" starts a comment; relative to the working directory
    max_lexicon_hits: int = 0  # drop when the lexicon matches more often than this
    # "package.module:function" taking (text: str) -> float in [0, 1]; "" disables. Importing it runs
    # its code, so a recipe naming a scorer is trusted like code.
    scorer: str = ""
    scorer_threshold: float = 0.5  # drop when the scorer returns more than this
    turns: str = "all"  # chat documents: "all" turns are judged, or "model" (the SFT "unsafe outputs" filter)
    # The classifier judges each sentence (or line) alone; one longer than this is cut at spaces into
    # pieces of at most this many characters. 200: one insult scores 1.0 alone, 0.98 with 130 benign
    # characters after it and 0.63 with 260, so longer pieces hide abuse (tests: packing sentences into
    # 300-character chunks cut document recall from 0.81 to 0.12).
    chunk_chars: int = 200


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_chunks(text: str, chunk_chars: int) -> list[str]:
    """The pieces the classifier judges: every sentence and line of `text`, a longer one cut at its last
    space before `chunk_chars` (hard at the limit when it has none). Empty pieces are dropped."""
    chunks: list[str] = []
    for piece in _SENTENCE_END.split(text):
        piece = piece.strip()
        while len(piece) > chunk_chars:
            cut = piece.rfind(" ", 0, chunk_chars + 1)
            cut = cut if cut > 0 else chunk_chars
            chunks.append(piece[:cut])
            piece = piece[cut:].strip()
        if piece:
            chunks.append(piece)
    return chunks


def load_profanity_check(where: str) -> Callable[[list[str]], Any]:
    """A function (list of texts -> array of probabilities of being offensive) equal to alt-profanity-
    check's `predict_prob`, through `_fast_predict` when that reproduces it on probe texts.

    Trust: importing profanity_check runs `joblib.load` (that is, unpickling) on model.joblib and
    vectorizer.joblib shipped INSIDE the installed package. That is the package's own data, trusted
    exactly as far as its code, which the import runs anyway; no user-supplied path ever reaches
    joblib, so the project rule (user files only via torch.load(weights_only=True)) is kept. This
    function is the only place that imports it. Python caches the module: the model loads once per
    process (~1.7 s with scikit-learn)."""
    try:
        from profanity_check import profanity_check as package
    except ImportError:
        raise FilterError(
            f"{where}.classifier: 'profanity-check' needs the alt-profanity-check package; "
            "install the data extra (pip install 'gemmakit[data]')"
        ) from None
    fast = _fast_predict(package)
    if fast is not None:
        probe = list(_PROBE)
        if np.allclose(fast(probe), package.predict_prob(probe), rtol=0.0, atol=1e-9):
            return fast
    log.warning("profanity_check: model layout not recognised; using its predict_prob (~4 ms per document)")
    return package.predict_prob


_PROBE = ("You are a stupid idiot.", "Kill the process and restart it.", "The meeting moved to Thursday.",
          "Fuck off.", "", "Scunthorpe United won on Saturday.")  # fmt: skip


def _fast_predict(package: Any) -> Callable[[list[str]], Any] | None:
    """The same probabilities without scikit-learn's per-call input validation, which costs ~4 ms per
    call (a document) against ~0.4 ms for the arithmetic. The model is CalibratedClassifierCV over
    LinearSVC with sigmoid calibration: p = mean_k 1 / (1 + exp(a_k * (x . w_k + c_k) + b_k)), x the
    TF-IDF vector. None when the layout differs (the caller checks equality on probe texts anyway)."""
    from scipy.special import expit  # scikit-learn's own dependency, so present with profanity_check

    model, vectorizer = getattr(package, "model", None), getattr(package, "vectorizer", None)
    try:
        if model.method != "sigmoid" or len(model.classes_) != 2:
            return None
        parts = [(c.estimator.coef_.ravel(), float(c.estimator.intercept_[0]), float(c.calibrators[0].a_),
                  float(c.calibrators[0].b_)) for c in model.calibrated_classifiers_]  # fmt: skip
    except (AttributeError, IndexError, TypeError):
        return None
    weights = np.stack([w for w, _, _, _ in parts], axis=1)  # (vocab, n_models)
    intercept, a, b = (np.array([p[i] for p in parts]) for i in (1, 2, 3))  # (n_models,) each

    def predict(texts: list[str]) -> Any:
        decision = np.asarray(vectorizer.transform(texts) @ weights) + intercept  # (n_texts, n_models)
        return expit(-(a * decision + b)).mean(axis=1)  # expit: no overflow warning at extreme scores

    return predict


def _read_lexicon(path: str, where: str) -> tuple[str, ...]:
    if not path:
        return ()
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FilterError(f"{where}.lexicon_file: {path}: no such file; expected one term per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FilterError(f"{where}.lexicon_file: {path}: cannot read as UTF-8 text ({e})") from None
    return tuple(t for t in (line.split("#", 1)[0].strip() for line in raw.splitlines()) if t)


def _load_scorer(spec: str, where: str) -> Callable[[str], Any]:
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise FilterError(f"{where}.scorer: {spec!r} is not of the form 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing while it imports
        raise FilterError(
            f"{where}.scorer: {spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise FilterError(f"{where}.scorer: {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _score(scorer: Callable[[str], Any], text: str, spec: str, where: str) -> float:
    s = scorer(text)
    if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s <= 1.0 or math.isnan(s):
        raise FilterError(f"{where}.scorer: {spec} returned {s!r}; expected a float in [0, 1]")
    return float(s)


def _check_toxicity(cfg: ToxicityConfig, where: str) -> None:
    if cfg.classifier not in ("", "profanity-check"):
        raise FilterError(f"{where}.classifier: {cfg.classifier!r}; expected 'profanity-check' or '' (off)")
    if cfg.turns not in ("all", "model"):
        raise FilterError(f"{where}.turns: {cfg.turns!r}; expected 'all' or 'model'")
    for name in ("threshold", "scorer_threshold"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise FilterError(f"{where}.{name}: {getattr(cfg, name)!r}; expected a probability in [0, 1]")
    if cfg.chunk_chars < 1 or cfg.max_lexicon_hits < 0:
        raise FilterError(f"{where}: chunk_chars must be >= 1 and max_lexicon_hits >= 0, got "
                          f"{cfg.chunk_chars} and {cfg.max_lexicon_hits}")  # fmt: skip


def build_toxicity(cfg: ToxicityConfig, where: str) -> Filter:
    """The toxicity filter (module docstring); models and files are loaded here, once."""
    _check_toxicity(cfg, where)
    terms = cfg.lexicon + _read_lexicon(cfg.lexicon_file, where)
    lexicon = (
        re.compile(r"(?<!\w)" + _phrase_regex(terms), re.IGNORECASE) if any(map(str.strip, terms)) else None
    )
    predict = load_profanity_check(where) if cfg.classifier else None
    scorer = _load_scorer(cfg.scorer, where) if cfg.scorer else None
    model_only = cfg.turns == "model"
    log.debug(
        "toxicity filter: %d lexicon terms, classifier %r, scorer %r", len(terms), cfg.classifier, cfg.scorer
    )

    def toxicity(doc: Doc) -> tuple[Doc | None, str]:
        texts = judged_texts(doc, model_only)
        if lexicon is not None and sum(len(lexicon.findall(t)) for t in texts) > cfg.max_lexicon_hits:
            return None, "toxicity_lexicon"
        if predict is not None:
            chunks = [c for t in texts for c in split_chunks(t, cfg.chunk_chars)]
            if chunks and float(max(predict(chunks))) > cfg.threshold:
                return None, "toxicity_classifier"
        if scorer is not None and any(
            _score(scorer, t, cfg.scorer, where) > cfg.scorer_threshold for t in texts
        ):
            return None, "toxicity_scorer"
        return doc, ""

    return toxicity


def toxicity_reasons(cfg: ToxicityConfig) -> tuple[str, ...]:
    return tuple(code for code, on in (("toxicity_lexicon", bool(cfg.lexicon or cfg.lexicon_file)),
                                       ("toxicity_classifier", bool(cfg.classifier)),
                                       ("toxicity_scorer", bool(cfg.scorer))) if on)  # fmt: skip


# ---- mistaken self-identification --------------------------------------------------------------------


@dataclass(frozen=True)
class SelfIdConfig:
    """Which first-person identity claims mark a model turn as mistaken self-identification.

    Gemma is made by Google DeepMind, so "I was trained by Google" is correct and Google / DeepMind are
    not companies here. Gemini and Bard are other Google systems: a Gemma model calling itself Gemini is
    exactly the mistake (SFT data distilled from other assistants says it), so they are names here.
    Names need no article ("I am Claude"), or one plus a model word ("I'm a Gemini model"), so role-play
    such as "I am a bard from the north" is kept."""

    # Other assistants and model families (case-insensitive).
    names: tuple[str, ...] = ("ChatGPT", "GPT-3", "GPT-3.5", "GPT-4", "GPT-4o", "Claude", "Bard", "Gemini",
                              "LLaMA", "Copilot", "Bing Chat", "Grok", "Mistral", "Ernie Bot")  # fmt: skip
    # Makers of other assistants (case-insensitive; "Meta-learning" is not "Meta").
    companies: tuple[str, ...] = ("OpenAI", "Anthropic", "Meta", "Meta AI", "Facebook", "Microsoft",
                                  "Mistral AI", "xAI", "Baidu")  # fmt: skip
    # Extra regular expressions (case-insensitive, multiline), each a mistaken claim when it matches.
    patterns: tuple[str, ...] = ()


# "I am" / "I'm", not inside "if I am" / "whether I am" (reported questions: "you asked if I am ChatGPT").
_I_AM = r"(?<![\w'’])(?<!\bif )(?<!\bwhether )I(?:\s+am|['’]m)"
_CLAUSE = r"(?:^|(?<=[.!?,;:]\s))\s*"  # "As a ..." only where a clause starts
_MADE = r"(?:created|developed|trained|built|made|designed|programmed|fine-?tuned|engineered|produced)"
# Up to 6 words between "I am" and the verb, none of them a verb or negation that would start another
# clause ("I am sure ChatGPT was made by ..."; "I am not made by ...").
_GAP = r"(?:(?!(?:is|was|are|were|not|never|and|but|that|which|who|if)\b)[\w,'’-]+\s+){0,6}?"
_AI_WORD = r"(?:[\w-]+\s+){0,2}?(?:model|assistant|AI|chatbot|bot|system)\b"


def _self_id_patterns(cfg: SelfIdConfig) -> list[str]:
    out: list[str] = []
    if any(n.strip() for n in cfg.names):
        name = _phrase_regex(cfg.names)
        out += [
            rf"{_I_AM}\s+{name}",  # I am ChatGPT
            rf"{_I_AM}\s+(?:an?\s+)?{name}\s+{_AI_WORD}",  # I'm a Gemini model
            rf"\bmy\s+name\s+is\s+{name}",
            rf"\b(?:call\s+me|I\s+go\s+by)\s+{name}",
            rf"{_I_AM}\s+{_GAP}(?:called|named|known\s+as)\s+{name}",  # I'm an AI assistant called Claude
            rf"{_CLAUSE}as\s+{name}\s*,",  # As ChatGPT, I ...
        ]
    if any(c.strip() for c in cfg.companies):
        org = _phrase_regex(cfg.companies, end=r"(?![\w-])")
        subject = rf"(?:{_I_AM}|\bI\s+was|\bI(?:\s+have|['’]ve)\s+been|{_CLAUSE}as\s+an?)"
        by = rf"(?:by|at)\s+(?:the\s+)?(?:(?:team|researchers|engineers|people)\s+(?:at|from)\s+)?{org}"
        out += [
            # I'm an AI assistant developed by OpenAI / As a language model trained by Anthropic
            rf"{subject}\s+{_GAP}(?:(?:that|which|who)\s+(?:was|is|has\s+been)\s+)?{_MADE}\s+{by}",
            rf"(?<![\w-]){org}\s+(?:has\s+)?{_MADE}\s+me\b",  # OpenAI created me
            rf"\bmy\s+(?:creators?|developers?|makers?)\s+(?:is|are|was|were|at)\s+{org}",
            rf"{_I_AM}\s+(?:an?\s+)?{org}(?:['’]s)?\s+{_AI_WORD}",  # I am an OpenAI language model
        ]
    return out


def build_self_id(cfg: SelfIdConfig, where: str) -> Filter:
    """Drops a document whose model turns (or, for plain text, whose text) claim another identity."""
    flags = re.IGNORECASE | re.MULTILINE
    rx = [re.compile(p, flags) for p in _self_id_patterns(cfg)]  # built from escaped terms: always valid
    for p in cfg.patterns:
        try:
            rx.append(re.compile(p, flags))
        except re.error as e:
            raise FilterError(f"{where}.patterns: {p!r} is not a valid regular expression ({e})") from None

    def self_identification(doc: Doc) -> tuple[Doc | None, str]:
        for text in judged_texts(doc, model_only=True):
            if any(r.search(text) for r in rx):
                return None, "self_identification"
        return doc, ""

    return self_identification
